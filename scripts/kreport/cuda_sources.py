"""The CUDA C++ sources of fastkd._C as the report compiles them: every ``.cu`` under csrc/ (found
by glob, wherever the tree puts them), the include folder, the flags setup.py gives nvcc, and the
``__global__`` functions each file defines."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"

# setup.py's nvccflags, less what only matters to a shared object (-fPIC, visibility) and the
# gencode list (the report compiles one architecture at a time).
NVCC_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DFASTKD_WITH_CUDA")

_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
# __launch_bounds__ arguments may hold one level of calls: (kMaxThreads, min_resident_blocks(DIV)).
_GLOBAL = re.compile(r"__global__\s+(?:void\s+)?(?:__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)\s*)?(?:void\s+)?"
                     r"([A-Za-z_]\w*)\s*\(")


def sources():
    return sorted(CSRC.rglob("*.cu"))


def include_dirs():
    """setup.py compiles with -I csrc/include; any other include folder under csrc is added too."""
    return sorted(path for path in CSRC.rglob("include") if path.is_dir())


def headers():
    return sorted(path for folder in include_dirs() for path in folder.rglob("*") if path.is_file())


def global_functions(path):
    """Names of the __global__ functions defined in one source file."""
    return sorted(set(_GLOBAL.findall(_COMMENT.sub("", Path(path).read_text()))))


def relative(path):
    return Path(path).resolve().relative_to(ROOT).as_posix()
