"""Triton kernels of the kl_div family (torch.nn.KLDivLoss semantics (log-probability input), with launchers.

Forward: one pass per row summing target·(log target − input); backward: one pass writing
−target_prob · grad_row. No (N, V) temporary besides the gradient itself.
"""

import torch
import triton
import triton.language as tl

from ..layout import row_layout, row_shape
from ..triton_rows import launch_config, row_offset


@triton.jit
def kl_div_rows_forward_kernel(
    input_ptr,  # (N, V) fp32|fp16|bf16 log-probabilities
    target_ptr,  # (N, V) fp32|fp16|bf16 probabilities, or log-probabilities if LOG_TARGET
    out_ptr,  # (N,) fp32
    V, inner, stride_x_outer, stride_x_inner, stride_x_col, stride_y_outer, stride_y_inner, stride_y_col,
    LOG_TARGET: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = input_ptr + row_offset(row, inner, stride_x_outer, stride_x_inner)
    y_row = target_ptr + row_offset(row, inner, stride_y_outer, stride_y_inner)
    acc = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols.to(tl.int64) * stride_x_col, mask=mask, other=0.0).to(tl.float32)
        if LOG_TARGET:
            y_log = tl.load(y_row + cols.to(tl.int64) * stride_y_col, mask=mask,
                            other=float("-inf")).to(tl.float32)
            prob = tl.exp(y_log)
        else:
            prob = tl.load(y_row + cols.to(tl.int64) * stride_y_col, mask=mask, other=0.0).to(tl.float32)
            y_log = tl.log(prob)
        # 0 where the target is 0 (even against input = -inf); NaN where it is negative, as PyTorch.
        acc += tl.sum(tl.where(prob == 0, 0.0, prob * (y_log - x)), axis=0)
    tl.store(out_ptr + row, acc)


@triton.jit
def kl_div_rows_backward_kernel(
    grad_input_ptr,  # (N, V) input dtype, contiguous, written
    target_ptr,  # (N, V)
    grad_rows_ptr,  # (N,) fp32
    V, inner, stride_y_outer, stride_y_inner, stride_y_col,
    LOG_TARGET: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y_row = target_ptr + row_offset(row, inner, stride_y_outer, stride_y_inner)
    g_row = grad_input_ptr + row * V
    scale = -tl.load(grad_rows_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        y = tl.load(y_row + cols.to(tl.int64) * stride_y_col, mask=mask, other=0.0).to(tl.float32)
        if LOG_TARGET:
            prob = tl.exp(y)
        else:
            prob = y
        tl.store(g_row + cols, (prob * scale).to(grad_input_ptr.dtype.element_ty), mask=mask)


def kl_div_rows_forward(input, target, log_target):
    """input, target: (N, V) or (B, T, V). Returns the per-row sums, (N,) fp32."""
    n_rows, n_cols, inner = row_shape(input)
    out = torch.empty(n_rows, dtype=torch.float32, device=input.device)
    if n_rows == 0:
        return out
    block_v, num_warps = launch_config(n_cols)
    kl_div_rows_forward_kernel[(n_rows,)](
        input, target, out, n_cols, inner, *row_layout(input), *row_layout(target),
        LOG_TARGET=log_target, BLOCK_V=block_v, num_warps=num_warps)
    return out


def kl_div_rows_backward(grad_rows, input, target, log_target):
    """Returns ∂/∂input: contiguous, input's shape and dtype."""
    n_rows, n_cols, inner = row_shape(input)
    grad = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    if n_rows == 0:
        return grad
    block_v, num_warps = launch_config(n_cols)
    kl_div_rows_backward_kernel[(n_rows,)](
        grad, target, grad_rows.to(torch.float32).contiguous(), n_cols, inner, *row_layout(target),
        LOG_TARGET=log_target, BLOCK_V=block_v, num_warps=num_warps)
    return grad
