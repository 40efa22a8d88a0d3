"""Launchers of the Triton Sinkhorn kernels: the ``triton`` backend of the sinkhorn families (the
registry's rows point here). Same signatures and outputs as sinkhorn/torch.py, in fp32.

One program per problem runs all of that problem's iterations in a single launch and stops on its
own when its marginal error reaches tol (a device-side while loop: no host synchronisation, no
lock-step with the other problems). This module chooses the strategy:

  * triton_tile.py      n, m ≤ MAX_TILE: the cost tile stays in registers for every iteration.
  * triton_streamed.py  larger problems: STREAM_BLOCK² cost tiles streamed each half-iteration.
  * triton_cost_grad.py ∂/∂cost of the envelope mode and of the streamed unrolled mode.

The constants are read at every call (tests shrink them to force the streamed and folded paths on
small problems); ``launch_variants`` lists every kernel configuration they allow, for the
ahead-of-time compile and spill check in tests/kernels/triton_aot.py.
"""

import torch

from ..triton_device import on_tensor_device
from .contract import allocate_outputs
from .triton_cost_grad import cost_grad_config, launch_cost_grad, sinkhorn_cost_grad_kernel
from .triton_streamed import (launch_streamed_forward, launch_streamed_unrolled_backward,
                              sinkhorn_streamed_forward_kernel, sinkhorn_streamed_unrolled_backward_kernel,
                              stream_config)
from .triton_tile import (TILE_WARPS, launch_tile_forward, launch_tile_unrolled_backward,
                          sinkhorn_tile_forward_kernel, sinkhorn_tile_unrolled_backward_kernel, tile_config)

MAX_TILE = max(TILE_WARPS)  # n, m up to this keep the whole cost tile on chip (at most max(TILE_WARPS))
STREAM_BLOCK = 64  # square tile of the streamed kernels; the cost gradient's are at most this
# Cost gradient of a shared cost: chunks of problems until chunks × tiles reaches this many programs.
COST_GRAD_PARALLEL_PROGRAMS = 1024
# Programs of one cost-gradient launch; each loops over the (chunk, tile) items beyond. CUDA's
# limit in grid x (y and z stop at 65535, which a batch of 2¹⁶ problems would pass).
COST_GRAD_MAX_PROGRAMS = 2**31 - 1


def _layout(cost, a, b):
    stride_cost_b = 0 if cost.dim() == 2 else cost.stride(0)
    return (stride_cost_b, cost.stride(-2), cost.stride(-1), a.stride(0), a.stride(1), b.stride(0), b.stride(1))


def _fits_on_chip(n, m):
    return n <= MAX_TILE and m <= MAX_TILE


@on_tensor_device
def sinkhorn_forward(cost, a, b, eps, max_iter, tol, save_history, return_plan, *, gemm_precision="fp32"):
    """cost: (n, m) shared or (B, n, m), fp32|fp16|bf16; a: (B, n), b: (B, m) fp32 (stride-0 views
    allowed). Returns SinkhornOutputs (contract.py), in fp32. ``gemm_precision``: unused (the gemm
    backend's)."""
    device = cost.device
    n_problems, n = a.shape
    m = b.shape[1]
    a, b = a.float(), b.float()

    outputs = allocate_outputs(n_problems, n, m, max_iter, save_history, return_plan, device, zero_history=False)
    if n_problems == 0:
        return outputs
    args = (cost, a, b, outputs, _layout(cost, a, b), eps, max_iter, tol, save_history, return_plan)
    if _fits_on_chip(n, m):
        launch_tile_forward(*args)
    else:
        launch_streamed_forward(*args, STREAM_BLOCK)
    return outputs


def _cost_grad(cost, a, b, f, g, coef_p, coef_c, coef_fg, n_iter, eps, history):
    return launch_cost_grad(cost, a, b, f, g, coef_p, coef_c, coef_fg, n_iter, eps, _layout(cost, a, b), history,
                            STREAM_BLOCK, COST_GRAD_PARALLEL_PROGRAMS, COST_GRAD_MAX_PROGRAMS)


@on_tensor_device
def sinkhorn_backward(grad_value, grad_value_linear, cost, a, b, f, g, n_iter, f_hist, g_hist, eps, mode,
                      needs_cost, needs_a, needs_b, *, gemm_precision="fp32"):
    """As sinkhorn/torch.py's sinkhorn_backward; fp32 results. ``gemm_precision``: unused."""
    device = cost.device
    n_problems, n = a.shape
    m = b.shape[1]
    a, b = a.float(), b.float()
    empty = torch.empty(0, dtype=torch.float32, device=device)
    w_v = grad_value.float().contiguous()
    w_l = grad_value_linear.float().contiguous()
    if mode == "envelope":
        grad_a = w_v[:, None] * (f - f.mean(1, keepdim=True)) if needs_a else empty
        grad_b = w_v[:, None] * (g - g.mean(1, keepdim=True)) if needs_b else empty
        grad_cost = empty
        if needs_cost:
            zeros = torch.zeros_like(w_v)
            grad_cost = _cost_grad(cost, a, b, f, g, w_v, zeros, zeros, n_iter, eps, None)
        return grad_cost, grad_a, grad_b

    grad_a = torch.empty(n_problems, n, dtype=torch.float32, device=device)
    grad_b = torch.empty(n_problems, m, dtype=torch.float32, device=device)
    layout = _layout(cost, a, b)
    if _fits_on_chip(n, m):
        grad_cost = None
        if needs_cost:
            grad_cost = torch.zeros(cost.shape if cost.dim() == 2 else (n_problems, n, m), dtype=torch.float32,
                                    device=device)
        launch_tile_unrolled_backward(grad_cost, grad_a, grad_b, cost, a, b, n_iter, f_hist, g_hist, w_v, w_l,
                                      layout, eps)
        grad_cost = empty if grad_cost is None else grad_cost
    else:
        max_iter = f_hist.shape[1]
        adjoints = (torch.empty(n_problems, max_iter, n, dtype=torch.float32, device=device),
                    torch.empty(n_problems, max_iter, m, dtype=torch.float32, device=device)) if needs_cost else None
        launch_streamed_unrolled_backward(grad_a, grad_b, cost, a, b, n_iter, f_hist, g_hist, w_v, w_l, layout, eps,
                                          STREAM_BLOCK, adjoints)
        grad_cost = empty
        if needs_cost:
            grad_cost = _cost_grad(cost, a, b, f, g, w_l, -w_l / eps, -w_v / eps, n_iter, eps,
                                   (f_hist, g_hist, *adjoints))
    return grad_cost, grad_a if needs_a else empty, grad_b if needs_b else empty


def launch_variants():
    """Every (kernel, constexprs, num_warps) the launchers above can launch with the current
    constants. Configurations depend on n and m only through capped powers of two, so the shapes up
    to twice the largest cap reach every one."""
    variants = set()
    largest = 2 * max(MAX_TILE, STREAM_BLOCK) + 1
    for n in range(1, largest + 1):
        for m in range(1, largest + 1):
            if _fits_on_chip(n, m):
                block, num_warps = tile_config(n, m)
                kernels = (sinkhorn_tile_forward_kernel, sinkhorn_tile_unrolled_backward_kernel)
            else:
                block, num_warps = STREAM_BLOCK, stream_config(STREAM_BLOCK)
                kernels = (sinkhorn_streamed_forward_kernel, sinkhorn_streamed_unrolled_backward_kernel)
            variants.update((kernel, block, num_warps) for kernel in kernels)
            variants.add((sinkhorn_cost_grad_kernel, *cost_grad_config(n, m, STREAM_BLOCK)))
    return sorted(((kernel, dict(BLOCK_N=block, BLOCK_M=block), num_warps) for kernel, block, num_warps in variants),
                  key=lambda v: (v[0].__name__, v[1]["BLOCK_N"]))
