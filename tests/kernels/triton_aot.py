"""Compiles every Sinkhorn Triton kernel variant the launchers can choose (fastkd/kernels/sinkhorn/
triton.py's ``launch_variants``, × each cost dtype) for sm_90 and sm_80 with Triton's own compiler and
ptxas (no GPU needed), and fails if any variant

  * does not compile,
  * spills registers (ptxas' "bytes spill stores"; on a GPU the same count is ``compiled.n_spills``),
  * multiplies 32-bit integers in its Triton IR (offsets past 2³¹ elements must be 64-bit).

Run without TRITON_INTERPRET. Used by tests/kernels/test_sinkhorn.py;
``python tests/kernels/triton_aot.py [--arch 90 80]`` prints registers and spills per variant.
The kernels use fastkd's ``sinkhorn_jit`` (no value specialisation), so a variant is exactly
(kernel, constexprs, num_warps, cost dtype): this list is all there is.
"""

import argparse
import contextlib
import io
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import fastkd.kernels.sinkhorn.triton as launcher

COST_TYPES = ("*fp32", "*fp16", "*bf16")
_I32_MULTIPLY = re.compile(r"arith\.muli .*: (tensor<[0-9x]*xi32[,>]|i32\b)")


def signature(fn, cost_type):
    """Argument types from the kernel's annotations (sinkhorn_jit keeps them whatever the values);
    pointers are fp32 except the cost and the int32 iteration counts."""
    types = {}
    for param in fn.params:
        if param.is_constexpr:
            types[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            types[param.name] = {"cost_ptr": cost_type, "n_iter_ptr": "*i32"}.get(param.name, "*fp32")
        elif param.annotation in ("i32", "i64", "fp32"):
            types[param.name] = param.annotation
        else:
            raise KeyError(f"{fn.__name__}: argument {param.name} has no type annotation")
    return types


def compile_variant(job):
    """Returns (description, registers, spilled bytes, problems) of one variant on one arch."""
    index, arch, cost_type = job
    fn, constexprs, num_warps = launcher.launch_variants()[index]
    name = f"sm_{arch} {fn.__name__} {constexprs} num_warps={num_warps} cost {cost_type}"
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn=fn, signature=signature(fn, cost_type), constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    except Exception as exc:  # report every variant, then fail
        return name, None, None, [f"does not compile: {type(exc).__name__}: {exc}"]
    registers = [int(x) for x in re.findall(r"Used (\d+) registers", log.getvalue())]
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", log.getvalue())]
    problems = []
    if not registers or not spills:
        problems.append("ptxas printed no register/spill counts")
    elif max(spills):
        problems.append(f"spills {max(spills)} bytes")
    multiplies = [line.strip() for line in compiled.asm["ttir"].splitlines() if _I32_MULTIPLY.search(line)]
    if multiplies:
        problems.append("32-bit integer multiplies: " + "; ".join(multiplies[:3]))
    return name, max(registers, default=None), max(spills, default=None), problems


def _init_worker():
    # ptxas' -v report reaches Python only through this knob, and only when ptxas runs (no cache hit).
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    jobs = [(index, arch, cost_type) for arch in args.arch for index in range(len(launcher.launch_variants()))
            for cost_type in COST_TYPES]
    failed = 0
    with ProcessPoolExecutor(max_workers=args.jobs, initializer=_init_worker) as pool:
        for name, registers, spills, problems in pool.map(compile_variant, jobs):
            failed += bool(problems)
            status = "FAIL" if problems else "ok  "
            print(f"{status} {name}: {registers} registers, {spills} bytes spilled" + "".join(
                f"\n     {problem}" for problem in problems), flush=True)
    print(f"{len(jobs) - failed} of {len(jobs)} variants compile without spills or 32-bit multiplies")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
