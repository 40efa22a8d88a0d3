#!/usr/bin/env bash
# One command on a CUDA machine without network: build and install fastkd, run the test suite on
# the GPU, run the benchmarks, keep every log and result in OUT_DIR, print a short summary last.
#
#   scripts/gpu_check.sh OUT_DIR [WHEEL_DIR]
#
# WHEEL_DIR: wheels of peers (liger-kernel, POT, ...) installed first, offline.
# Environment: PYTHON (default python3); FASTKD_CUDA_ARCHS (default: this machine's GPUs, 9.0 -> 90).
# Exits non-zero if any step failed; a failed step does not stop the ones after it.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 OUT_DIR [WHEEL_DIR]" >&2
    exit 2
fi
mkdir -p "$1"
OUT_DIR=$(cd "$1" && pwd)
WHEEL_DIR=${2:-}
PYTHON=${PYTHON:-python3}
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "nvidia-smi not found: this script is for a CUDA machine" >&2
    exit 2
fi
# The interpreter would run the Triton kernels on the CPU instead of the GPU.
unset TRITON_INTERPRET
if [[ -z "${FASTKD_CUDA_ARCHS:-}" ]]; then
    FASTKD_CUDA_ARCHS=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | tr -d '. ' | sort -u | paste -sd';' -)
fi
export FASTKD_CUDA_ARCHS

STEPS=()
FAILED=0

# run_step NAME LOG COMMAND...: runs COMMAND, its output shown and appended to OUT_DIR/LOG.
run_step() {
    local name=$1 log=$OUT_DIR/$2 rc
    shift 2
    echo "== $name: $*" | tee -a "$log"
    set +e
    "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    set -e
    STEPS+=("$name: exit $rc")
    if [[ $rc -ne 0 ]]; then FAILED=1; fi
}

if [[ -n "$WHEEL_DIR" ]]; then
    shopt -s nullglob
    wheels=("$WHEEL_DIR"/*.whl)
    shopt -u nullglob
    if [[ ${#wheels[@]} -gt 0 ]]; then
        run_step "install peers" install.log "$PYTHON" -m pip install --no-index --no-deps "${wheels[@]}"
    else
        echo "no wheels in $WHEEL_DIR" | tee -a "$OUT_DIR/install.log"
    fi
fi
run_step "install fastkd (archs $FASTKD_CUDA_ARCHS)" install.log \
    "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
run_step "nvidia-smi" nvidia-smi.txt nvidia-smi
"$PYTHON" -m pip freeze > "$OUT_DIR/pip-freeze.txt" 2>&1 || true
run_step "backends" backends.txt "$PYTHON" -c \
    'import fastkd; [print(f, s) for f, row in fastkd.available_backends().items() for s in row.values()]'
run_step "tests" tests.log "$PYTHON" -m pytest -q tests
# The CUDA C++ backend's kernel tests under compute-sanitizer (memcheck): out-of-bounds and
# misaligned accesses, reported as failures.
if "$PYTHON" -c 'import fastkd, sys; sys.exit("cuda" not in fastkd.available_backends()["kd_rows"]["native"].devices)' \
        && command -v compute-sanitizer >/dev/null 2>&1; then
    run_step "memcheck (native backend)" memcheck.log compute-sanitizer --tool memcheck --error-exitcode 1 \
        "$PYTHON" -m pytest -q -x tests/test_functional.py tests/kernels/test_logits.py -k native
fi
run_step "benchmarks" bench.log "$PYTHON" -m benchmarks --out "$OUT_DIR/bench"

# Results also go where the repository keeps them, named by device, ready to commit.
if [[ -f "$OUT_DIR/bench/results.json" ]]; then
    slug=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["environment"]["device_slug"])' \
        "$OUT_DIR/bench/results.json")
    mkdir -p "benchmarks/results/$slug"
    cp "$OUT_DIR"/bench/* "benchmarks/results/$slug/"
    echo "copied $OUT_DIR/bench to benchmarks/results/$slug/"
fi

echo
echo "== summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1), archs $FASTKD_CUDA_ARCHS)"
printf '  %s\n' "${STEPS[@]}"
echo "  tests: $(tail -n 1 "$OUT_DIR/tests.log" 2>/dev/null || echo 'no log')"
if [[ -f "$OUT_DIR/bench/results.json" ]]; then
    "$PYTHON" - "$OUT_DIR/bench/results.json" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["measurements"]
for r in rows:
    if r["mode"] == "fwd+bwd" and r["provider"].startswith("fastkd-"):
        ms = "n/a" if r["median_ms"] is None else f"{r['median_ms']:.3f} ms"
        frac = "n/a" if r["floor_fraction"] is None else f"{r['floor_fraction']:.2f}"
        speed = "n/a" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
        print(f"  {r['divergence']:>16} fwd+bwd {r['provider']}: {ms}, floor/time {frac}, vs eager {speed}, check {r['check']}")
EOF
fi
echo "  logs and results: $OUT_DIR"
exit "$FAILED"
