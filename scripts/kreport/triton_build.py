"""Compiles a recorded Triton launch for a GPU target, as ``JITFunction.run`` would on that GPU.

``specialise`` runs Triton's own argument binder on the launch (the same code the JIT runs before
every launch: alignment of pointers, divisibility of integers by 16, integers equal to 1 become
constants) against a target's backend; ``compile_job`` (in a worker process) compiles that
specialisation with ``triton.compile``, keeps ptxas' resource report, and reads the cubin's SASS
with the nvdisasm Triton ships.
"""

import contextlib
import importlib
import io
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import triton
from triton import knobs
from triton._C.libtriton import get_cache_invalidating_env_vars
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from . import cache, sass


@dataclass(frozen=True)
class Job:
    kernel: str  # "module:name"
    arch: int
    signature: dict = field(hash=False)
    constexprs: dict = field(hash=False)
    attrs: dict = field(hash=False)
    options: dict = field(hash=False)
    key: str = ""  # what the result depends on, hashed (cache.py)


def _kernel(qualified):
    module, name = qualified.split(":")
    return getattr(importlib.import_module(module), name)


def specialise(kernel, launch, arch, code_version):
    """The Job that compiles ``launch`` (triton_launches.Launch) for sm_``arch``."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.kwargs)
    # The options JITFunction.run adds before binding (Triton 3.9, runtime/jit.py).
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    source = ASTSource(kernel, signature, constexprs, attrs)
    key = cache.digest(source.hash(), backend.hash(), options.hash(), triton.__version__,
                       sorted(get_cache_invalidating_env_vars().items()), code_version)
    return Job(launch.kernel, arch, signature, constexprs, attrs, dict(options.__dict__), key)


def describe(job):
    """The specialisation in words: constexprs by name, and the integer arguments Triton specialised."""
    names = list(job.signature)
    parts = [f"{names[path[0]]}={value}" for path, value in job.constexprs.items()
             if job.signature[names[path[0]]] == "constexpr" and value is not None]
    divisible = [names[path[0]] for path, attrs in job.attrs.items()
                 if attrs and job.signature[names[path[0]]].startswith("i")]
    if divisible:
        parts.append("÷16: " + ",".join(divisible))
    return " ".join(parts)


_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_STATIC_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_resources(log):
    """{registers, stack, spill_stores, spill_loads, static_smem} from one function's ptxas -v lines."""
    registers = _REGISTERS.search(log)
    spills = _SPILLS.search(log)
    smem = _STATIC_SMEM.search(log)
    return {
        "registers": int(registers.group(1)) if registers else 0,
        "stack": int(spills.group(1)) if spills else 0,
        "spill_stores": int(spills.group(2)) if spills else 0,
        "spill_loads": int(spills.group(3)) if spills else 0,
        "static_smem": int(smem.group(1)) if smem else 0,
    }


def disassemble(cubin_bytes):
    """The cubin's code (-c: no data sections; -ndf -novliw: no dataflow or dual-issue annotations,
    which take nvdisasm longer than the code itself)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin_bytes)
        return subprocess.run([knobs.nvidia.nvdisasm.path, "-c", "-ndf", "-novliw", str(path)], check=True,
                              capture_output=True, text=True).stdout


def loop_record(loop):
    return {name: getattr(loop, name) for name in loop.__dataclass_fields__}


def compile_job(job):
    """Compiles one Job; returns a JSON-able result: ok and error, resources, threads, loops."""
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed by the compiler
    knobs.compilation.always_compile = True  # a Triton cache hit would skip ptxas and its report
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(_kernel(job.kernel), job.signature, job.constexprs, job.attrs),
                                      target=GPUTarget("cuda", job.arch, 32), options=job.options)
    except Exception as exc:  # every failure is a row of the report
        message = " ".join(str(exc).split())
        return {"ok": False, "error": f"{type(exc).__name__}: {message[:300]}"}
    functions = sass.parse(disassemble(compiled.asm["cubin"]))
    function = functions[compiled.metadata.name]
    return {
        "ok": True,
        **ptxas_resources(log.getvalue()),
        "shared": compiled.metadata.shared,
        "threads": compiled.metadata.num_warps * 32,
        "ptx_v4_global_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.", compiled.asm["ptx"])),
        "loops": [loop_record(loop) for loop in sass.streaming_loops(function)],
    }
