"""Builds the optional compiled extension ``fastkd._C`` with ninja.

The extension does not link against libtorch: its functions take raw pointers, sizes and strides,
so one build serves every PyTorch version. Switches (environment variables):

    FASTKD_BUILD_EXT=0       build nothing (pure Python; the torch and Triton backends still work)
    FASTKD_REQUIRE_EXT=1     fail the install if the extension does not build (CI uses this)
    FASTKD_CUDA_ARCHS="80;90" CUDA architectures when nvcc is found (PTX of the last one is embedded)
    FASTKD_BUILD_CUDA=0|1    0: CPU part only even where nvcc exists; 1: fail if nvcc is missing
                             (default: build the CUDA part when nvcc is found)
    MAX_JOBS=N               parallel compile jobs
    CXX, NVCC                compilers (nvcc also reads NVCC_APPEND_FLAGS, e.g. "-Xptxas=-v" for the
                             register report of scripts/cuda_build_check.sh)
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def _find_nvcc():
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if nvcc is None:
        cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        candidate = Path(cuda_home) / "bin" / "nvcc"
        nvcc = str(candidate) if candidate.exists() else None
    return nvcc


def _find_cuda_lib(nvcc):
    """The folder holding libcudart_static.a. nvcc may be a wrapper script elsewhere on PATH (e.g.
    /usr/local/bin/nvcc), so its own folder is only the first guess."""
    guesses = [Path(nvcc).resolve().parent.parent]
    if os.environ.get("CUDA_HOME"):
        guesses.append(Path(os.environ["CUDA_HOME"]))
    guesses.append(Path("/usr/local/cuda"))
    for root in guesses:
        for lib in (root / "lib64", root / "lib", root / "targets" / "x86_64-linux" / "lib"):
            if (lib / "libcudart_static.a").exists():
                return lib
    raise RuntimeError(f"libcudart_static.a not found next to {nvcc}; set CUDA_HOME")


def _ninja_escape(path):
    return str(path).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


class NinjaBuildExt(build_ext):
    """Compiles csrc/ into one shared object with a generated build.ninja."""

    def build_extension(self, ext):
        if os.environ.get("FASTKD_BUILD_EXT", "1") == "0":
            print("fastkd: FASTKD_BUILD_EXT=0, skipping the compiled extension")
            return
        try:
            self._build_with_ninja(ext)
        except Exception as exc:  # the package works without the extension
            if os.environ.get("FASTKD_REQUIRE_EXT", "0") == "1":
                raise
            print(f"fastkd: WARNING: the compiled extension was not built ({exc}); "
                  "fastkd will run on its Python backends only", file=sys.stderr)

    def _build_with_ninja(self, ext):
        import pybind11

        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if cxx is None:
            raise RuntimeError("no C++ compiler found")
        ninja = shutil.which("ninja")
        if ninja is None:
            import ninja as ninja_pkg  # the PyPI wheel ships the binary

            ninja = str(Path(ninja_pkg.BIN_DIR) / "ninja")

        build_dir = Path(self.build_temp).resolve() / "fastkd_C"
        build_dir.mkdir(parents=True, exist_ok=True)
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)

        includes = [CSRC / "include", pybind11.get_include(), sysconfig.get_paths()["include"]]
        include_flags = " ".join(f"-I{_ninja_escape(p)}" for p in includes)
        # Every .cpp and .cu under csrc/ (csrc/<family>/, csrc/bindings/, csrc/ itself). A build
        # with CUDA compiles the .cu files; one without compiles csrc/cuda_stubs.cpp in their place.
        stubs = CSRC / "cuda_stubs.cpp"
        cuda_sources = sorted(CSRC.rglob("*.cu"))
        build_cuda = os.environ.get("FASTKD_BUILD_CUDA", "")
        nvcc = _find_nvcc() if cuda_sources and build_cuda != "0" else None
        if build_cuda == "1" and nvcc is None:
            raise RuntimeError("FASTKD_BUILD_CUDA=1 but nvcc was not found (set NVCC or CUDA_HOME)")
        cxx_sources = [src for src in sorted(CSRC.rglob("*.cpp")) if not (nvcc and src == stubs)]
        if not nvcc:
            cuda_sources = []

        # -fno-trapping-math lets GCC turn the kernels' float selects into SIMD blends (nothing here
        # relies on floating-point traps); no -march flag: the wheel must run on any x86-64.
        lines = [
            f"cxx = {cxx}",
            f"cxxflags = -O3 -std=c++17 -fPIC -fopenmp -fno-trapping-math -fvisibility=hidden -Wall "
            f"{include_flags}",
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cxxflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "rule link",
            "  command = $cxx -shared $in -o $out $ldflags",
        ]
        ldflags = ["-fopenmp"]
        objects = []
        for src in cxx_sources:
            obj = build_dir / (src.relative_to(CSRC).as_posix().replace("/", "_") + ".o")
            lines.append(f"build {_ninja_escape(obj)}: cxx {_ninja_escape(src)}")
            objects.append(obj)
        if nvcc:
            archs = os.environ.get("FASTKD_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
            archs = [a.strip() for a in archs if a.strip()]
            gencode = " ".join(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs)
            gencode += f" -gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"
            lines += [
                f"nvcc = {nvcc}",
                f"nvccflags = -O3 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fPIC -Xcompiler -fvisibility=hidden "
                f"{gencode} {include_flags}",
                "rule nvcc",
                "  command = $nvcc -MD -MF $out.d $nvccflags -c $in -o $out",
                "  depfile = $out.d",
                "  deps = gcc",
            ]
            for src in cuda_sources:
                obj = build_dir / (src.relative_to(CSRC).as_posix().replace("/", "_") + ".o")
                lines.append(f"build {_ninja_escape(obj)}: nvcc {_ninja_escape(src)}")
                objects.append(obj)
            cuda_lib = _find_cuda_lib(nvcc)
            # cudart is linked statically so the wheel needs only the driver at run time.
            ldflags += [f"-L{cuda_lib}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]
        lines.append(f"ldflags = {' '.join(ldflags)}")
        lines.append(f"build {_ninja_escape(output)}: link {' '.join(_ninja_escape(o) for o in objects)}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")

        cmd = [ninja, "-C", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            cmd += ["-j", os.environ["MAX_JOBS"]]
        subprocess.run(cmd, check=True)


setup(
    ext_modules=[Extension("fastkd._C", sources=[])],
    cmdclass={"build_ext": NinjaBuildExt},
)
