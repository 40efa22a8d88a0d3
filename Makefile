# Two entry points, each setting up .venv on first use:
#   make test    the test suite (Triton kernels run on the CPU interpreter where no GPU exists)
#   make bench   the benchmark suite at default sizes on this machine's device
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Machines with an NVIDIA driver get PyTorch's CUDA build; others its small CPU build.
HAS_NVIDIA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_NVIDIA),torch,torch==2.13.0)
# Pinned where no GPU is: docs/kernel-report.md records this Triton's compiler output, and CI checks it.
TRITON_SPEC ?= $(if $(HAS_NVIDIA),triton,triton==3.9.0)
PYTEST_ARGS ?=

.PHONY: test bench smoke cuda-build-check kernel-report kernel-report-check clean

$(VENV)/.installed: pyproject.toml setup.py requirements-peers.txt $(wildcard csrc/*.cpp csrc/*.cu csrc/*/*.cpp \
		csrc/*/*.cu csrc/bindings/*.h csrc/include/fastkd/*/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)" numpy pytest hypothesis pytest-benchmark matplotlib pot \
		pybind11 ninja setuptools wheel
	# The peers the drop-ins are compared with, without their dependencies and with torch held.
	$(PY) -m pip freeze | grep -E '^(torch|triton)==' > $(VENV)/torch-pin.txt
	$(PY) -m pip install -q --no-deps -c $(VENV)/torch-pin.txt -r requirements-peers.txt
	# The Hugging Face stack of fastkd.integrations (fastkd[hf]; TRL itself comes from the peers
	# above), with its dependencies but torch held at the pin.
	$(PY) -m pip install -q -c $(VENV)/torch-pin.txt "transformers>=5" accelerate datasets jinja2
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) -m benchmarks

smoke: $(VENV)/.installed
	$(PY) -m benchmarks --smoke

# Compiles the CUDA part of fastkd._C (sm_90 unless FASTKD_CUDA_ARCHS says otherwise) into a
# temporary folder and checks the module; needs nvcc, not a GPU. CI runs it.
cuda-build-check: $(VENV)/.installed
	scripts/cuda_build_check.sh $(PY)

# docs/kernel-report.md: every GPU kernel compiled for sm_90 and sm_80 without a GPU (Triton's compiler,
# nvcc), with registers, spills, 16-byte loads, occupancy and static issue ceilings. Results are cached
# by content (~/.cache/fastkd/kernel-report): a rerun compiles only what changed.
kernel-report: $(VENV)/.installed
	$(PY) scripts/kernel_report.py

# CI: the committed report is current (its inputs digest is this tree's) and its gate passes; compiles nothing.
kernel-report-check: $(VENV)/.installed
	$(PY) scripts/kernel_report.py --check

clean:
	rm -rf $(VENV) build *.egg-info fastkd/_C*.so
