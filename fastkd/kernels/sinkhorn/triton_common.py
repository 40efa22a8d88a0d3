"""Pieces every Triton Sinkhorn kernel shares: the jit wrapper that fixes argument types, and the
``@triton.jit`` helpers of the log-domain math of sinkhorn/torch.py (support guards, log-sum-exp,
the stop test, int64 addressing)."""

import inspect

import triton
import triton.language as tl

# Running maxima start finite: exp(m_old − m_new) of two -inf would be NaN on empty prefixes.
NEG_START = tl.constexpr(-1e30)


def sinkhorn_jit(fn):
    """``triton.jit`` without value specialisation: every runtime argument keeps the type its
    annotation gives (strides int64, sizes int32, unannotated pointers by their dtype) whatever its
    value, so a kernel has exactly one compiled variant per (constexprs, num_warps, cost dtype).
    tests/kernels/triton_aot.py compiles each of those ahead of time and fails on register spills;
    Triton's default specialisation (ints equal to 1 or divisible by 16, 16-byte aligned pointers)
    would add variants that nothing checks. Int64 strides also make every ``index * stride``
    product 64-bit on the GPU (the interpreter ignores annotations: kernels cast indices too)."""
    runtime = [name for name, param in inspect.signature(fn).parameters.items()
               if param.annotation is not tl.constexpr]
    return triton.jit(fn, do_not_specialize=runtime, do_not_specialize_on_alignment=runtime)


@triton.jit
def on_support(mass, value, otherwise):
    # `value` where the marginal has mass, `otherwise` on its zero-mass entries (which sinkhorn/torch.py
    # treats as absent rows or columns: potentials −inf, plan and gradients 0).
    return tl.where(mass > 0, value, otherwise)


@triton.jit
def log_mass(x):
    # log x on the support, −inf off it; the inner guard keeps log(0) out of the masked lanes.
    return on_support(x, tl.log(on_support(x, x, 1.0)), float("-inf"))


@triton.jit
def divide_on_support(log_grad, x):
    # ∂/∂x from ∂/∂log x; 0 at zero-mass entries (the support is held fixed).
    return on_support(x, log_grad / on_support(x, x, 1.0), 0.0)


@triton.jit
def log_sum_exp(x, AXIS: tl.constexpr):
    # Log-sum-exp along AXIS; all −inf gives −inf, not NaN.
    top = tl.max(x, axis=AXIS)
    safe = tl.where(top == float("-inf"), 0.0, top)
    return tl.log(tl.sum(tl.exp(x - tl.expand_dims(safe, AXIS)), axis=AXIS)) + safe


@triton.jit
def keeps_running(it, max_iter, err, tol, like):
    # The per-problem "go on" flag broadcast to `like`'s shape. Scalar flags are kept out of masks
    # and selects: Triton 3.9's interpreter stores scalar comparison results with the operands'
    # dtype and then rejects them there. A NaN error keeps running (the comparison is false), as POT does.
    zeros = tl.zeros(like.shape, dtype=tl.float32)
    err_v = zeros + err
    return ((zeros.to(tl.int64) + it) < max_iter) & ((err_v > tol) | (err_v != err_v))


@triton.jit
def is_step(index, like, step):
    # `index == step` broadcast to `like`'s shape (a vector mask from a scalar test; see keeps_running).
    return (tl.zeros(like.shape, dtype=tl.int64) + index) == step


@triton.jit
def load_vector(base, index, stride, mask):
    # One marginal-like vector (a, b, or a cost row of a transposed view): index·stride in int64.
    return tl.load(base + index.to(tl.int64) * stride, mask=mask, other=0.0)


@triton.jit
def load_cost_tile(cost_base, rows, cols, tile_in, stride_cost_n, stride_cost_m):
    # (len(rows), len(cols)) fp32 from a cost of any strides (transposed views, pitches > 2³¹): int64 offsets.
    offsets = rows[:, None].to(tl.int64) * stride_cost_n + cols[None, :].to(tl.int64) * stride_cost_m
    return tl.load(cost_base + offsets, mask=tile_in, other=0.0).to(tl.float32)


@triton.jit
def matrix_offsets(rows, cols, M):
    # Offsets of a contiguous (N, M) fp32 output (plan, cost gradient) in int64: N·M may pass 2³¹.
    return rows[:, None].to(tl.int64) * M + cols[None, :]
