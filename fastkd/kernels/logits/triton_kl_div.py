"""Triton kernels of the kl_div family (torch.nn.KLDivLoss semantics: log-probability input), with
their launchers.

Forward: one pass per row summing target·(log target − input); backward: one pass writing
−target_prob · grad_row. Rows stream in tiles as in triton_rows.py (no reduction inside the loop,
no mask on full tiles); logarithms and exponentials are base 2 on the special-function unit
(triton_math.py). No (N, V) temporary besides the gradient itself.
"""

import torch
import triton
import triton.language as tl

from ..layout import row_layout, row_shape
from ..triton_device import on_tensor_device
from ..triton_math import FLT_MIN, LN2, LOG2E, fast_log2
from ..triton_rows import block_columns, launch_config, load_block, row_offset, vector_width


@triton.jit
def _kl_div_tile(acc, x_row, y_row, start, V, stride_x_col, stride_y_col,
                 LOG_TARGET: tl.constexpr, MASKED: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    cols = block_columns(start, BLOCK_V, VEC)
    x = load_block(x_row, cols, stride_x_col, V, 0.0, MASKED)
    if LOG_TARGET:
        y_log = load_block(y_row, cols, stride_y_col, V, float("-inf"), MASKED)
        prob = tl.exp2(y_log * LOG2E)
        # 0 where the target is 0 (even against input = -inf).
        terms = tl.where(prob == 0, 0.0, prob * (y_log - x))
    else:
        prob = load_block(y_row, cols, stride_y_col, V, 0.0, MASKED)
        # 0 where the target is 0 or below the normal range (lg2.approx.ftz reads it as 0: log −inf;
        # such a target adds less than 1e-36); NaN where it is negative, as PyTorch.
        negligible = (prob >= 0) & (prob < FLT_MIN)
        terms = tl.where(negligible, 0.0, prob * (fast_log2(prob) * LN2 - x))
    return acc + tl.sum(terms, axis=1)


@triton.jit
def kl_div_rows_forward_kernel(
    input_ptr,  # (N, V) fp32|fp16|bf16 log-probabilities
    target_ptr,  # (N, V) fp32|fp16|bf16 probabilities, or log-probabilities if LOG_TARGET
    out_ptr,  # (N,) fp32
    V, inner, stride_x_outer, stride_x_inner, stride_x_col, stride_y_outer, stride_y_inner, stride_y_col,
    LOG_TARGET: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = input_ptr + row_offset(row, inner, stride_x_outer, stride_x_inner)
    y_row = target_ptr + row_offset(row, inner, stride_y_outer, stride_y_inner)
    acc = tl.zeros([BLOCK_V // VEC], tl.float32)
    n_full = (V // BLOCK_V) * BLOCK_V
    for start in range(0, n_full, BLOCK_V):
        acc = _kl_div_tile(acc, x_row, y_row, start, V, stride_x_col, stride_y_col, LOG_TARGET, False, BLOCK_V, VEC)
    if n_full < V:
        acc = _kl_div_tile(acc, x_row, y_row, n_full, V, stride_x_col, stride_y_col, LOG_TARGET, True, BLOCK_V, VEC)
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


@triton.jit
def _kl_div_grad_tile(g_row, y_row, start, V, stride_y_col, scale,
                      LOG_TARGET: tl.constexpr, MASKED: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    cols = block_columns(start, BLOCK_V, VEC)
    y = load_block(y_row, cols, stride_y_col, V, 0.0, MASKED)
    if LOG_TARGET:
        prob = tl.exp2(y * LOG2E)
    else:
        prob = y
    g = (prob * scale).to(g_row.dtype.element_ty)
    if MASKED:
        tl.store(g_row + cols, g, mask=cols < V)
    else:
        tl.store(g_row + cols, g)


@triton.jit
def kl_div_rows_backward_kernel(
    grad_input_ptr,  # (N, V) input dtype, contiguous, written
    target_ptr,  # (N, V)
    grad_rows_ptr,  # (N,) fp32
    V, inner, stride_y_outer, stride_y_inner, stride_y_col,
    LOG_TARGET: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y_row = target_ptr + row_offset(row, inner, stride_y_outer, stride_y_inner)
    g_row = grad_input_ptr + row * V
    scale = -tl.load(grad_rows_ptr + row)
    n_full = (V // BLOCK_V) * BLOCK_V
    for start in range(0, n_full, BLOCK_V):
        _kl_div_grad_tile(g_row, y_row, start, V, stride_y_col, scale, LOG_TARGET, False, BLOCK_V, VEC)
    if n_full < V:
        _kl_div_grad_tile(g_row, y_row, n_full, V, stride_y_col, scale, LOG_TARGET, True, BLOCK_V, VEC)


@on_tensor_device
def kl_div_rows_forward(input, target, log_target):
    """input, target: (N, V) or (B, T, V). Returns the per-row sums, (N,) fp32."""
    n_rows, n_cols, inner = row_shape(input)
    out = torch.empty(n_rows, dtype=torch.float32, device=input.device)
    if n_rows == 0:
        return out
    block_v, num_warps = launch_config(n_cols)
    kl_div_rows_forward_kernel[(n_rows,)](
        input, target, out, n_cols, inner, *row_layout(input), *row_layout(target),
        LOG_TARGET=log_target, BLOCK_V=block_v, VEC=vector_width(input, target), num_warps=num_warps)
    return out


@on_tensor_device
def kl_div_rows_backward(grad_rows, input, target, log_target):
    """Returns ∂/∂input: contiguous, input's shape and dtype."""
    n_rows, n_cols, inner = row_shape(input)
    grad = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    if n_rows == 0:
        return grad
    block_v, num_warps = launch_config(n_cols)
    kl_div_rows_backward_kernel[(n_rows,)](
        grad, target, grad_rows.to(torch.float32).contiguous(), n_cols, inner, *row_layout(target),
        LOG_TARGET=log_target, BLOCK_V=block_v, VEC=vector_width(input, target), num_warps=num_warps)
    return grad
