"""Triton kernels of the ce family: hard-label cross-entropy rows (temperature 1), with launchers.

Used by the fused linear loss for its ``hard_weight`` term: the forward keeps two statistics per
row, the backward adds the gradient into the student-logit gradient block in place, so the hard
term costs one extra read of the block and no extra buffer.
"""

import torch
import triton
import triton.language as tl

from ..triton_rows import launch_config
from . import contract

NEG_START = tl.constexpr(contract.NEG_START)
N_CE_STATS = tl.constexpr(contract.N_CE_STATS)  # columns: contract.CE_STATS_COLUMNS


@triton.jit
def ce_rows_forward_kernel(
    logits_ptr,  # (N, V) fp32|fp16|bf16, rows contiguous
    labels_ptr,  # (N,) int
    loss_ptr,  # (N,) fp32
    stats_ptr,  # (N, 2) fp32: max, log-sum-exp offset
    V, stride_row, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    active = label != ignore_index
    n_live = tl.where(active, V, 0)
    x_row = logits_ptr + row * stride_row
    m = NEG_START
    z = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < n_live, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    in_range = (label >= 0) & (label < V)
    picked = tl.load(x_row + tl.where(in_range & active, label, 0)).to(tl.float32)
    loss = tl.where(in_range, (m - picked) + tl.log(z), float("nan"))
    tl.store(loss_ptr + row, tl.where(active, loss, 0.0))
    tl.store(stats_ptr + row * N_CE_STATS, tl.where(active, m, 0.0))
    tl.store(stats_ptr + row * N_CE_STATS + 1, tl.where(active, tl.log(z), 0.0))


@triton.jit
def ce_rows_backward_kernel(
    out_ptr,  # (N, V) gradient block, updated in place, rows contiguous
    logits_ptr,  # (N, V) fp32|fp16|bf16, rows contiguous
    labels_ptr,  # (N,) int
    grad_loss_ptr,  # (N,) fp32
    stats_ptr,  # (N, 2) fp32 from the forward
    V, stride_out_row, stride_row, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label != ignore_index:
        scale = tl.load(grad_loss_ptr + row)
        m = tl.load(stats_ptr + row * N_CE_STATS)
        log_sum = tl.load(stats_ptr + row * N_CE_STATS + 1)
        x_row = logits_ptr + row * stride_row
        o_row = out_ptr + row * stride_out_row
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            g = tl.exp((x - m) - log_sum) - tl.where(cols == label, 1.0, 0.0)
            g = tl.where((label >= 0) & (label < V), g, float("nan"))  # as the forward's NaN loss
            previous = tl.load(o_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(o_row + cols, (previous + scale * g).to(out_ptr.dtype.element_ty), mask=mask)


def _check_rows(logits):
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("cross-entropy rows must be a 2-D tensor with contiguous rows")


def ce_rows_forward(logits, labels, ignore_index):
    """logits: (N, V) with contiguous rows; labels: (N,). Returns (loss (N,), stats (N, 2)) fp32."""
    _check_rows(logits)
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    stats = torch.empty(n_rows, contract.N_CE_STATS, dtype=torch.float32, device=logits.device)
    if n_rows:
        block_v, num_warps = launch_config(n_cols)
        ce_rows_forward_kernel[(n_rows,)](logits, labels, loss, stats, n_cols, logits.stride(0), ignore_index,
                                          BLOCK_V=block_v, num_warps=num_warps)
    return loss, stats


def ce_rows_backward(grad_loss, logits, labels, stats, ignore_index, out):
    """Adds grad_loss_i · (softmax(logits_i) − onehot(label_i)) into ``out`` (N, V), in place."""
    _check_rows(logits)
    _check_rows(out)
    n_rows, n_cols = logits.shape
    if n_rows:
        block_v, num_warps = launch_config(n_cols)
        ce_rows_backward_kernel[(n_rows,)](out, logits, labels, grad_loss.to(torch.float32).contiguous(), stats,
                                           n_cols, out.stride(0), logits.stride(0), ignore_index,
                                           BLOCK_V=block_v, num_warps=num_warps)
    return out
