"""The kernel report (scripts/kernel_report.py): what the compilers say about every GPU kernel of
fastkd, without a GPU. One module per step: the GPUs' numbers (gpus), finding the kernels and the
launches the launchers make (triton_launches, triton_cases, cuda_sources), compiling them
(triton_build, cuda_build), reading the machine code (sass), the derived numbers (metrics), the
cache, and the markdown (render)."""
