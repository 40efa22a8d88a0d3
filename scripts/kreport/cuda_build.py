"""Compiles one CUDA source for one architecture with nvcc (``-cubin -Xptxas -v``) and reads, per
kernel, ptxas' resource report and the SASS of the cubin (nvdisasm). Runs in a worker process."""

import re
import subprocess
import tempfile
from pathlib import Path

from triton import knobs

from . import sass
from .cuda_sources import NVCC_FLAGS, include_dirs
from .triton_build import loop_record, ptxas_resources

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_\d+\w*'")


def nvcc_version(nvcc="nvcc"):
    done = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 else None


def command(source, arch, output, nvcc="nvcc"):
    includes = [f"-I{folder}" for folder in include_dirs()]
    return [nvcc, "-cubin", f"-arch=sm_{arch}", *NVCC_FLAGS, *includes, "-Xptxas", "-v", "-o", str(output),
            str(source)]


def split_log(log):
    """{mangled entry name: its ptxas -v lines} of one compile's log."""
    entries = {}
    current = None
    for line in log.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = entry.group(1)
            entries[current] = []
        elif current is not None:
            entries[current].append(line)
    return {name: "\n".join(lines) for name, lines in entries.items()}


def compile_unit(source, arch, nvcc="nvcc"):
    """{"ok", "error", "functions": {mangled name: resources, threads, loops}} for one .cu file."""
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "unit.cubin"
        done = subprocess.run(command(source, arch, cubin, nvcc), capture_output=True, text=True)
        if done.returncode != 0:
            message = " ".join((done.stderr or done.stdout).split())
            return {"ok": False, "error": message[:400], "functions": {}}
        listing = subprocess.run([knobs.nvidia.nvdisasm.path, str(cubin)], check=True, capture_output=True,
                                 text=True).stdout
    functions = sass.parse(listing)
    results = {}
    for name, lines in split_log(done.stderr).items():
        function = functions.get(name)
        results[name] = {
            **ptxas_resources(lines),
            "threads": function.threads if function else 0,
            "loops": [loop_record(loop) for loop in sass.streaming_loops(function)] if function else [],
        }
    return {"ok": True, "error": "", "functions": results}
