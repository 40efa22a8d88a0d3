#!/usr/bin/env bash
# Compiles fastkd._C with its CUDA part from this tree into a temporary folder, then checks the
# result: it loads, reports with_cuda, carries device code for every kernel file, and links
# cudart statically. No GPU needed (CI runs it through `make cuda-build-check`).
#
#   scripts/cuda_build_check.sh [PYTHON]      (default: .venv/bin/python, else python3)
# Environment: FASTKD_CUDA_ARCHS (default here: 90), MAX_JOBS, NVCC / CUDA_HOME.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${1:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
export FASTKD_CUDA_ARCHS=${FASTKD_CUDA_ARCHS:-90}
export FASTKD_BUILD_CUDA=1 FASTKD_REQUIRE_EXT=1  # a missing nvcc or a compile error fails the check
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

start=$(date +%s)
"$PYTHON" setup.py -q build_ext --build-temp "$TMP/build" --build-lib "$TMP/lib" >"$TMP/build.log" 2>&1 || {
    cat "$TMP/build.log"
    echo "cuda-build-check: FAILED to build (archs $FASTKD_CUDA_ARCHS)" >&2
    exit 1
}
so=$(ls "$TMP"/lib/fastkd/_C*.so)
echo "built $(basename "$so") for sm_${FASTKD_CUDA_ARCHS//;/, sm_} in $(( $(date +%s) - start )) s"

"$PYTHON" - "$so" <<'PY'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("fastkd._C", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
assert module.with_cuda, "fastkd._C was built without its CUDA part"
missing = [name for name in ("kd_rows_forward_cuda", "kd_rows_backward_cuda", "kl_div_rows_forward_cuda",
                             "kl_div_rows_backward_cuda", "sinkhorn_forward_cuda") if not hasattr(module, name)]
assert not missing, missing
print("loads: with_cuda=True, CUDA entry points present")
PY

# Device code: the fat binary section must exist and name the kernels of csrc/cuda/.
objdump -h "$so" | grep -q '\.nv_fatbin' || { echo "no .nv_fatbin section in $so" >&2; exit 1; }
for kernel in kl_forward_kernel two_pass_forward_kernel backward_kernel kl_div_forward_kernel sinkhorn_forward_kernel; do
    grep -aq "$kernel" "$so" || { echo "kernel $kernel missing from $so" >&2; exit 1; }
done
# Each cubin records the ptxas options it was assembled with, "-arch sm_NN" among them.
for arch in ${FASTKD_CUDA_ARCHS//;/ }; do
    grep -aq -- "-arch sm_$arch " "$so" || { echo "no sm_$arch device code in $so" >&2; exit 1; }
done
if ldd "$so" | grep -q 'libcudart'; then
    echo "cudart is linked dynamically into $so" >&2
    exit 1
fi
echo "cuda-build-check: OK (sm_${FASTKD_CUDA_ARCHS//;/, sm_} device code present, cudart static)"
