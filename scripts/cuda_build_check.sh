#!/usr/bin/env bash
# Compiles fastkd._C with its CUDA part from this tree into a temporary folder, then checks the
# result: it loads, reports with_cuda and its contract, carries device code for every kernel
# family, and links cudart statically; and ptxas's resource report: no kernel may spill registers
# (the table it prints is the one in docs/csrc.md). No GPU needed (CI runs it through
# `make cuda-build-check`).
#
#   scripts/cuda_build_check.sh [PYTHON]      (default: .venv/bin/python, else python3)
# Environment: FASTKD_CUDA_ARCHS (default here: 90), MAX_JOBS, NVCC / CUDA_HOME.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${1:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
export FASTKD_CUDA_ARCHS=${FASTKD_CUDA_ARCHS:-90}
export FASTKD_BUILD_CUDA=1 FASTKD_REQUIRE_EXT=1  # a missing nvcc or a compile error fails the check
# nvcc reads NVCC_APPEND_FLAGS itself: ptxas prints registers, stack and spills of every kernel.
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -Xptxas=-v"
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
missing = [name for name in ("kd_rows_forward_cuda", "kd_rows_backward_cuda", "dkd_rows_forward_cuda",
                             "dkd_rows_backward_cuda", "kl_div_rows_forward_cuda",
                             "kl_div_rows_backward_cuda", "ce_rows_forward_cuda", "ce_rows_backward_cuda",
                             "sinkhorn_forward_cuda") if not hasattr(module, name)]
assert not missing, missing
# The same contract the package checks at import (fastkd/kernels/native_ext.py), every key and value.
sys.path.insert(0, ".")
from fastkd.kernels.native_ext import check_contract, expected_contract
problem = check_contract(module, expected_contract())
assert problem is None, problem
print("loads: with_cuda=True, CUDA entry points present, contract() equal to the package's")
PY

# Device code: the fat binary section must exist and name the kernels of every family.
objdump -h "$so" | grep -q '\.nv_fatbin' || { echo "no .nv_fatbin section in $so" >&2; exit 1; }
for kernel in kl_forward_kernel two_pass_forward_kernel backward_kernel transformed_backward_kernel dkd_forward_kernel \
              dkd_backward_kernel kl_div_forward_kernel kl_div_backward_kernel \
              ce_forward_kernel ce_backward_kernel sinkhorn_forward_kernel; do
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

# ptxas's report, per kernel template and architecture: instances, registers, stack, spills.
"$PYTHON" - "$TMP/build.log" <<'PY'
import collections, re, subprocess, sys
entries, current = [], None
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
    if m:
        current = {"mangled": m.group(1), "arch": m.group(2)}
        entries.append(current)
    elif current is not None and "stack" not in current and (
            m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
        current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
    elif current is not None and "registers" not in current and (m := re.search(r"Used (\d+) registers", line)):
        current["registers"] = int(m.group(1))
if not entries:
    sys.exit("cuda-build-check: ptxas printed no resource report (is -Xptxas=-v reaching nvcc?)")
names = subprocess.run(["c++filt"], input="\n".join(e["mangled"] for e in entries), capture_output=True,
                       text=True, check=True).stdout.splitlines()
groups = collections.defaultdict(list)
for entry, name in zip(entries, names):
    entry["name"] = name.replace("(anonymous namespace)::", "").removeprefix("void ")
    groups[re.sub(r"<.*", "", entry["name"]).split("(")[0].split("::")[-1], entry["arch"]].append(entry)
print(f"| {'kernel':24} | arch  | instances | registers | stack (B) | spill stores / loads (B) |")
print(f"|{'-' * 26}|-------|-----------|-----------|-----------|--------------------------|")
for (kernel, arch), group in sorted(groups.items()):
    registers = sorted(e["registers"] for e in group)
    spills = f"{max(e['spill_stores'] for e in group)} / {max(e['spill_loads'] for e in group)}"
    print(f"| {kernel:24} | {arch} | {len(group):9} | {registers[0]:>3} - {registers[-1]:<3} | "
          f"{max(e['stack'] for e in group):9} | {spills:>24} |")
spilling = [e for e in entries if e["spill_stores"] or e["spill_loads"]]
for e in spilling:
    print(f"SPILLS {e['spill_stores']}/{e['spill_loads']} B at {e['registers']} registers, {e['arch']}: {e['name']}",
          file=sys.stderr)
if spilling:
    sys.exit(f"cuda-build-check: {len(spilling)} kernel(s) spill registers")
print(f"ptxas: {len(entries)} kernels, none spills")
PY
echo "cuda-build-check: OK (sm_${FASTKD_CUDA_ARCHS//;/, sm_} device code present, cudart static)"
