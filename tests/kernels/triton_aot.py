"""Compiles every Sinkhorn Triton kernel variant to a cubin for sm_90 with Triton's own compiler
(no GPU needed). Run without TRITON_INTERPRET; exits non-zero if any variant fails to compile.
Used by tests/kernels/test_sinkhorn.py; ``python tests/kernels/triton_aot.py`` prints each variant."""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import fastkd.kernels.sinkhorn.triton as kernels

_INTS = {"N", "M", "max_iter", "n_problems"}
_FLOATS = {"eps", "inv_eps", "tol"}
VARIANTS = [
    (kernels.sinkhorn_tile_forward_kernel, dict(SAVE_HISTORY=True, RETURN_PLAN=True, BLOCK_N=128, BLOCK_M=128)),
    (kernels.sinkhorn_tile_forward_kernel, dict(SAVE_HISTORY=False, RETURN_PLAN=False, BLOCK_N=64, BLOCK_M=64)),
    (kernels.sinkhorn_streamed_forward_kernel, dict(SAVE_HISTORY=True, RETURN_PLAN=True, BLOCK_N=64, BLOCK_M=64)),
    (kernels.sinkhorn_tile_unrolled_backward_kernel, dict(COST_GRAD=True, SHARED=True, BLOCK_N=128, BLOCK_M=128)),
    (kernels.sinkhorn_tile_unrolled_backward_kernel, dict(COST_GRAD=False, SHARED=False, BLOCK_N=64, BLOCK_M=64)),
    (kernels.sinkhorn_streamed_unrolled_backward_kernel, dict(STORE_ADJOINTS=True, BLOCK_N=64, BLOCK_M=64)),
    (kernels.sinkhorn_cost_grad_kernel, dict(SHARED=True, HAS_HISTORY=True, BLOCK_N=64, BLOCK_M=64)),
    (kernels.sinkhorn_cost_grad_kernel, dict(SHARED=False, HAS_HISTORY=False, BLOCK_N=64, BLOCK_M=64)),
]


def signature(fn, constexprs, cost_type):
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = cost_type if name == "cost_ptr" else "*i32" if name == "n_iter_ptr" else "*fp32"
        elif name.startswith("stride") or name in _INTS:
            types[name] = "i32"
        elif name in _FLOATS:
            types[name] = "fp32"
        else:
            raise KeyError(f"{fn.__name__}: no type for argument {name}")
    return types


def main():
    failed = 0
    for fn, constexprs in VARIANTS:
        config = kernels._tile_config if "tile" in fn.__name__ else kernels._stream_config
        num_warps = config(constexprs["BLOCK_N"], constexprs["BLOCK_M"])[2]
        for cost_type in ("*fp32", "*bf16"):
            try:
                triton.compile(ASTSource(fn=fn, signature=signature(fn, constexprs, cost_type), constexprs=constexprs),
                               target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
                print(f"ok   {fn.__name__} {constexprs} cost {cost_type} num_warps={num_warps}")
            except Exception as exc:  # report every variant, then fail
                failed += 1
                print(f"FAIL {fn.__name__} {constexprs} cost {cost_type}: {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
