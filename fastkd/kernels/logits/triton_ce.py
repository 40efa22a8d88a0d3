"""Triton kernels of the ce family: hard-label cross-entropy rows (temperature 1), with launchers.

Used by the fused linear loss for its ``hard_weight`` term: the forward keeps two statistics per
row, the backward adds the gradient into the student-logit gradient block in place, so the hard
term costs one extra read of the block and no extra buffer. Rows stream in tiles as in
triton_rows.py; exponentials are base 2 on the special-function unit (triton_math.py).
"""

import torch
import triton
import triton.language as tl

from ..triton_device import on_tensor_device
from ..triton_math import LOG2E
from ..triton_rows import block_columns, launch_config, load_block, lse_merge, lse_step, vector_width
from . import contract

NEG_START = tl.constexpr(contract.NEG_START)
N_CE_STATS = tl.constexpr(contract.N_CE_STATS)  # columns: contract.CE_STATS_COLUMNS


@triton.jit
def _lse_tile(m, z, x_row, start, n_live, MASKED: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    cols = block_columns(start, BLOCK_V, VEC)
    return lse_step(m, z, load_block(x_row, cols, 1, n_live, float("-inf"), MASKED))


@triton.jit
def ce_rows_forward_kernel(
    logits_ptr,  # (N, V) fp32|fp16|bf16, rows contiguous
    labels_ptr,  # (N,) int
    loss_ptr,  # (N,) fp32
    stats_ptr,  # (N, 2) fp32: max, log-sum-exp offset
    V, stride_row, ignore_index,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    active = label != ignore_index
    n_live = tl.where(active, V, 0)
    x_row = logits_ptr + row * stride_row
    m = tl.full([BLOCK_V // VEC], NEG_START, tl.float32)
    z = tl.zeros([BLOCK_V // VEC], tl.float32)
    n_full = (n_live // BLOCK_V) * BLOCK_V
    for start in range(0, n_full, BLOCK_V):
        m, z = _lse_tile(m, z, x_row, start, n_live, False, BLOCK_V, VEC)
    if n_full < n_live:
        m, z = _lse_tile(m, z, x_row, n_full, n_live, True, BLOCK_V, VEC)
    m, z = lse_merge(m, z)
    in_range = (label >= 0) & (label < V)
    picked = tl.load(x_row + tl.where(in_range & active, label, 0)).to(tl.float32)
    log_sum = tl.log(z)
    loss = tl.where(in_range, (m - picked) + log_sum, float("nan"))
    tl.store(loss_ptr + row, tl.where(active, loss, 0.0))
    tl.store(stats_ptr + row * N_CE_STATS, tl.where(active, m, 0.0))
    tl.store(stats_ptr + row * N_CE_STATS + 1, tl.where(active, log_sum, 0.0))


@triton.jit
def _ce_grad_tile(o_row, x_row, start, V, label, m, log_sum, scale, bad_label,
                  MASKED: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    cols = block_columns(start, BLOCK_V, VEC)
    x = load_block(x_row, cols, 1, V, float("-inf"), MASKED)
    g = tl.exp2(((x - m) - log_sum) * LOG2E) - tl.where(cols == label, 1.0, 0.0)
    g = tl.where(bad_label, float("nan"), g)  # as the forward's NaN loss
    previous = load_block(o_row, cols, 1, V, 0.0, MASKED)
    out = (previous + scale * g).to(o_row.dtype.element_ty)
    if MASKED:
        tl.store(o_row + cols, out, mask=cols < V)
    else:
        tl.store(o_row + cols, out)


@triton.jit
def ce_rows_backward_kernel(
    out_ptr,  # (N, V) gradient block, updated in place, rows contiguous
    logits_ptr,  # (N, V) fp32|fp16|bf16, rows contiguous
    labels_ptr,  # (N,) int
    grad_loss_ptr,  # (N,) fp32
    stats_ptr,  # (N, 2) fp32 from the forward
    V, stride_out_row, stride_row, ignore_index,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label != ignore_index:
        scale = tl.load(grad_loss_ptr + row)
        m = tl.load(stats_ptr + row * N_CE_STATS)
        log_sum = tl.load(stats_ptr + row * N_CE_STATS + 1)
        bad_label = (label < 0) | (label >= V)
        x_row = logits_ptr + row * stride_row
        o_row = out_ptr + row * stride_out_row
        n_full = (V // BLOCK_V) * BLOCK_V
        for start in range(0, n_full, BLOCK_V):
            _ce_grad_tile(o_row, x_row, start, V, label, m, log_sum, scale, bad_label, False, BLOCK_V, VEC)
        if n_full < V:
            _ce_grad_tile(o_row, x_row, n_full, V, label, m, log_sum, scale, bad_label, True, BLOCK_V, VEC)


def _check_rows(logits):
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("cross-entropy rows must be a 2-D tensor with contiguous rows")


@on_tensor_device
def ce_rows_forward(logits, labels, ignore_index):
    """logits: (N, V) with contiguous rows; labels: (N,). Returns (loss (N,), stats (N, 2)) fp32."""
    _check_rows(logits)
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    stats = torch.empty(n_rows, contract.N_CE_STATS, dtype=torch.float32, device=logits.device)
    if n_rows:
        block_v, num_warps = launch_config(n_cols)
        ce_rows_forward_kernel[(n_rows,)](logits, labels, loss, stats, n_cols, logits.stride(0), ignore_index,
                                          BLOCK_V=block_v, VEC=vector_width(logits), num_warps=num_warps)
    return loss, stats


@on_tensor_device
def ce_rows_backward(grad_loss, logits, labels, stats, ignore_index, out):
    """Adds grad_loss_i · (softmax(logits_i) − onehot(label_i)) into ``out`` (N, V), in place."""
    _check_rows(logits)
    _check_rows(out)
    n_rows, n_cols = logits.shape
    if n_rows:
        block_v, num_warps = launch_config(n_cols)
        ce_rows_backward_kernel[(n_rows,)](out, logits, labels, grad_loss.to(torch.float32).contiguous(), stats,
                                           n_cols, out.stride(0), logits.stride(0), ignore_index,
                                           BLOCK_V=block_v, VEC=vector_width(logits, out), num_warps=num_warps)
    return out
