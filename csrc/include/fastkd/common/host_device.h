// FASTKD_HOST_DEVICE marks the math shared by the CPU (g++) and CUDA (nvcc) kernels.
#pragma once

#if defined(__CUDACC__)
#define FASTKD_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced inlining keeps the element functions inside the `omp simd` loops, where they vectorise.
#define FASTKD_HOST_DEVICE inline __attribute__((always_inline))
#else
#define FASTKD_HOST_DEVICE inline
#endif
