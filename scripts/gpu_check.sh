#!/usr/bin/env bash
# shellcheck disable=SC2317  # the step functions are called by name: "step_$STEP"
# The GPU session, in steps that each fit one call to a lent GPU machine (at most 10 minutes; a
# session has 30 minutes of device time in all), each writing only under OUT_DIR:
#
#   scripts/gpu_check.sh [--dry-run] STEP OUT_DIR [WHEEL_DIR]
#
#   install    build and install fastkd (CUDA part for this GPU) and the peers' wheels from WHEEL_DIR;
#              environment to OUT_DIR/env.txt                                          (<= 8 min)
#   tests      the whole test suite on the GPU; OUT_DIR/tests.log, tests.xml (JUnit)    (<= 9 min)
#   sanitizer  the native backend's kernel tests under compute-sanitizer memcheck       (<= 9 min)
#   bench      every benchmark at the GPU suite's sizes, one op at a time; bench.tar.gz (<= 9 min)
#   quick      the target sizes only: kd_loss forward_kl and jsd at N=8192, V=128256 bf16, fused linear
#              at N=8192, H=4096, V=128256, Sinkhorn WKD at B=256, C=1000; quick.tar.gz (<= 7 min)
#   report     no GPU needed: unpacks OUT_DIR's bench.tar.gz (else quick.tar.gz) into
#              benchmarks/results/<device>/ and rewrites the README's GPU table from it
#
# Every step but report installs first when this machine has not built this tree yet (a lent machine
# starts bare, and goes back 30 s after a call), stops what it runs at the step's bound, the install
# included (SIGINT first, so pytest and the benchmarks still write what they have), and records
# OUT_DIR/STEP.status (exit code, seconds, device, time). A step can be run again at any time: it
# redoes its work and overwrites its files. One step per call; in a 30-minute session (machine starts
# count): tests, then quick, then report on your own machine with the files that came back;
# sanitizer and bench when time is left.
# --dry-run prints what each step would run, and runs nothing (no GPU needed).
# Environment: PYTHON (default python3), FASTKD_CUDA_ARCHS (default: this machine's GPUs), MAX_JOBS.
set -euo pipefail

STEPS="install tests sanitizer bench quick report"
DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then
    DRY_RUN=1
    shift
fi
if [[ $# -lt 2 || $# -gt 3 || " $STEPS " != *" $1 "* ]]; then
    echo "usage: $0 [--dry-run] {${STEPS// /|}} OUT_DIR [WHEEL_DIR]" >&2
    exit 2
fi
STEP=$1
mkdir -p "$2"
OUT_DIR=$(cd "$2" && pwd)
WHEEL_DIR=${3:-}
PYTHON=${PYTHON:-python3}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The interpreter would run the Triton kernels on the CPU instead of the GPU.
unset TRITON_INTERPRET

# Seconds each step may take in all, an install it needs included: a call of at most 10 minutes
# ends in time (commands still running at the bound get SIGINT, then SIGKILL 20 s later).
declare -A BOUND=([install]=480 [tests]=540 [sanitizer]=540 [bench]=540 [quick]=420 [report]=120)
# Within bench and quick, each op's share at most (they run in turn, and all within the step's bound).
declare -A OP_BOUND=([kd_loss]=300 [fused_linear]=180 [sinkhorn]=90)
STARTED=$(date +%s)
DEADLINE=$(( STARTED + BOUND[$STEP] ))

# run CMD...: prints the command; runs it unless --dry-run.
run() {
    printf '+ %s\n' "$*"
    if [[ $DRY_RUN -eq 0 ]]; then "$@"; fi
}

# bounded SECONDS LOG CMD...: CMD with its output shown and appended to LOG, interrupted after
# SECONDS or at the step's deadline, whichever comes first.
bounded() {
    local seconds=$1 log=$2 left
    shift 2
    left=$(( DEADLINE - $(date +%s) ))
    (( left < seconds )) && seconds=$left
    printf '+ timeout -s INT -k 20 %s %s >> %s\n' "$seconds" "$*" "$log"
    if [[ $DRY_RUN -eq 1 ]]; then return 0; fi
    if (( seconds <= 0 )); then
        echo "the step's ${BOUND[$STEP]} s are spent: not run: $*" | tee -a "$log"
        return 124
    fi
    local rc
    set +e
    timeout -s INT -k 20 "$seconds" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    set -e
    if [[ $rc -eq 124 ]]; then echo "interrupted at its bound (${seconds} s): $*" | tee -a "$log"; fi
    return "$rc"
}

# A digest of what the compiled extension is built from (file contents: the copy of the tree a lent
# machine gets need not be a git checkout); a warm machine that built it skips the install.
source_digest() {
    find csrc setup.py pyproject.toml -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}
STAMP=build/.gpu-check-installed

cuda_archs() {
    if [[ -n "${FASTKD_CUDA_ARCHS:-}" ]]; then
        echo "$FASTKD_CUDA_ARCHS"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=compute_cap --format=csv,noheader | tr -d '. ' | sort -u | paste -sd';' -
    else
        echo 90
    fi
}

step_install() {
    local log=$OUT_DIR/install.log
    run truncate -s 0 "$log"
    if [[ -n "$WHEEL_DIR" ]]; then
        shopt -s nullglob
        local wheels=("$WHEEL_DIR"/*.whl)
        shopt -u nullglob
        [[ $DRY_RUN -eq 1 ]] && wheels=("$WHEEL_DIR/*.whl")
        if [[ ${#wheels[@]} -gt 0 ]]; then
            bounded 120 "$log" "$PYTHON" -m pip install --no-index --no-deps "${wheels[@]}"
        fi
    fi
    FASTKD_CUDA_ARCHS=$(cuda_archs) FASTKD_REQUIRE_EXT=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        bounded "${BOUND[install]}" "$log" "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
    run mkdir -p build
    if [[ $DRY_RUN -eq 0 ]]; then source_digest > "$STAMP"; fi
    local env_file=$OUT_DIR/env.txt
    printf '+ nvidia-smi; pip freeze; fastkd.available_backends() > %s\n' "$env_file"
    if [[ $DRY_RUN -eq 0 ]]; then
        {
            nvidia-smi || true
            "$PYTHON" -m pip freeze 2>/dev/null | grep -i -E '^(torch|triton|fastkd|liger|pot|numpy)' || true
            "$PYTHON" -c 'import fastkd
for family, row in fastkd.available_backends().items():
    for status in row.values():
        print(family, status)'
        } > "$env_file" 2>&1
    fi
}

ensure_installed() {
    if [[ $DRY_RUN -eq 0 && -f "$STAMP" && "$(cat "$STAMP")" == "$(source_digest)" ]] \
            && "$PYTHON" -c 'import fastkd._C' >/dev/null 2>&1; then
        echo "fastkd is installed from this tree on this machine"
    else
        echo "installing first (a fresh machine, or csrc/ changed)"
        step_install
    fi
}

step_tests() {
    ensure_installed
    run truncate -s 0 "$OUT_DIR/tests.log"
    bounded "${BOUND[tests]}" "$OUT_DIR/tests.log" "$PYTHON" -m pytest -q -p no:cacheprovider \
        --junitxml="$OUT_DIR/tests.xml" tests
}

step_sanitizer() {
    ensure_installed
    if [[ $DRY_RUN -eq 0 ]] && ! "$PYTHON" -c \
            'import fastkd, sys; sys.exit("cuda" not in fastkd.available_backends()["kd_rows"]["native"].devices)'; then
        echo "the native CUDA backend is not available here: nothing to check" | tee "$OUT_DIR/sanitizer.log"
        return 1
    fi
    # Out-of-bounds and misaligned accesses of the CUDA C++ kernels, reported as failures.
    run truncate -s 0 "$OUT_DIR/sanitizer.log"
    bounded "${BOUND[sanitizer]}" "$OUT_DIR/sanitizer.log" compute-sanitizer --tool memcheck --error-exitcode 1 \
        "$PYTHON" -m pytest -q -p no:cacheprovider -x tests/test_functional.py tests/kernels/test_logits.py -k native
}

# benchmarks SUITE_FLAG NAME: each op in turn into a folder, packed into OUT_DIR/NAME.tar.gz.
benchmarks() {
    local flag=$1 name=$2 folder=$OUT_DIR/$2 rc=0 op
    ensure_installed
    run rm -rf "$folder"
    run truncate -s 0 "$OUT_DIR/$name.log"
    for op in kd_loss fused_linear sinkhorn; do
        # shellcheck disable=SC2086  # $flag is one option or none
        bounded "${OP_BOUND[$op]}" "$OUT_DIR/$name.log" "$PYTHON" -m benchmarks $flag --op "$op" --out "$folder" \
            || rc=1
    done
    run tar -czf "$OUT_DIR/$name.tar.gz" -C "$OUT_DIR" "$name"
    run rm -rf "$folder"
    return "$rc"
}

step_bench() { benchmarks "" bench; }
step_quick() { benchmarks --quick quick; }

step_report() {
    local archive=$OUT_DIR/bench.tar.gz
    [[ -f $archive || $DRY_RUN -eq 1 ]] || archive=$OUT_DIR/quick.tar.gz
    if [[ $DRY_RUN -eq 0 && ! -f $archive ]]; then
        echo "no bench.tar.gz or quick.tar.gz in $OUT_DIR: run the bench or quick step first" >&2
        return 1
    fi
    local unpacked=$OUT_DIR/unpacked
    run rm -rf "$unpacked"
    run mkdir -p "$unpacked"
    run tar -xzf "$archive" -C "$unpacked"
    local folder slug="<device>"
    folder=$(find "$unpacked" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | head -n 1)
    if [[ $DRY_RUN -eq 0 ]]; then
        slug=$("$PYTHON" -c 'import json, pathlib, sys
folder = pathlib.Path(sys.argv[1])
for name in ("results.json", "fused_linear.json", "sinkhorn.json"):
    if (folder / name).exists():
        print(json.loads((folder / name).read_text())["environment"]["device_slug"]); break' "$folder")
    fi
    run mkdir -p "benchmarks/results/$slug"
    run cp -r "${folder:-$unpacked/<bench|quick>}/." "benchmarks/results/$slug/"
    run "$PYTHON" scripts/gpu_readme_table.py "benchmarks/results/$slug"
    run rm -rf "$unpacked"
}

if [[ $STEP != report && $DRY_RUN -eq 0 ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "nvidia-smi not found: the $STEP step is for a CUDA machine (--dry-run shows what it runs)" >&2
    exit 2
fi
echo "== $STEP ($( [[ $DRY_RUN -eq 1 ]] && echo 'dry run, ' )bound ${BOUND[$STEP]} s) -> $OUT_DIR"
set +e
"step_$STEP"
rc=$?
set -e
if [[ $DRY_RUN -eq 0 ]]; then
    device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
    printf 'step=%s rc=%s seconds=%s device=%s date=%s\n' "$STEP" "$rc" "$(( $(date +%s) - STARTED ))" \
        "${device:-none}" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$OUT_DIR/$STEP.status"
    cat "$OUT_DIR/$STEP.status"
fi
exit "$rc"
