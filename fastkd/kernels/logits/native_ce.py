"""Launchers of the compiled hard-label cross-entropy kernels of fastkd._C
(csrc/cross_entropy/cpu.cpp, csrc/cross_entropy/cuda.cu): the ``native`` backend of the ce
family. Same signatures, outputs and semantics as logits/triton_ce.py and logits/torch.py
ce_rows_*; the tensors' device picks the CPU or the CUDA entry point.

The forward keeps two fp32 statistics per row; the backward adds its gradient into the caller's
(N, V) block in place, so the hard term costs one more read of that block and no buffer.
"""

import torch

from ..layout import KERNEL_DTYPES
from ..native_ext import DTYPE_CODES, extension, int64_labels, launch, rows_view
from .contract import N_CE_STATS


def _check_rows(name, x):
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{name}: cross-entropy rows must be a 2-D tensor with contiguous rows; got shape "
                         f"{tuple(x.shape)}, strides {x.stride()}")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: the compiled kernels take float32, float16 or bfloat16; got {x.dtype}")


def _ce_rows_args(logits, labels, ignore_index):
    """The _C.CeRowsArgs of a call; labels: int64 (N,) contiguous."""
    n_rows, n_cols = logits.shape
    return extension().CeRowsArgs(n_rows=n_rows, n_cols=n_cols, logits=rows_view(logits), labels=labels.data_ptr(),
                                  ignore_index=int(ignore_index))


def ce_rows_forward(logits, labels, ignore_index):
    """logits: (N, V) fp32|fp16|bf16 with contiguous rows; labels: (N,) int.
    Returns (loss (N,), stats (N, 2): max and log-sum-exp offset) fp32; ignored rows get zeros,
    an out-of-range label a NaN loss."""
    _check_rows("logits", logits)
    n_rows = logits.shape[0]
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    stats = torch.empty(n_rows, N_CE_STATS, dtype=torch.float32, device=logits.device)
    if n_rows:
        labels = int64_labels(labels, n_rows)
        launch("ce_rows_forward", logits.device, _ce_rows_args(logits, labels, ignore_index),
               loss=loss.data_ptr(), stats=stats.data_ptr())
    return loss, stats


def ce_rows_backward(grad_loss, logits, labels, stats, ignore_index, out):
    """Adds grad_loss_i · (softmax(logits_i) − onehot(label_i)) into ``out`` (N, V) fp32|fp16|bf16
    with contiguous rows, in place, and returns it. Ignored rows of ``out`` are left untouched; an
    active row with an out-of-range label becomes NaN. grad_loss: (N,); stats: (N, 2) from the forward."""
    _check_rows("logits", logits)
    _check_rows("out", out)
    n_rows, n_cols = logits.shape
    if out.shape != logits.shape or out.device != logits.device:
        raise ValueError(f"out {tuple(out.shape)} on {out.device} must match logits {tuple(logits.shape)} "
                         f"on {logits.device}")
    if n_rows == 0:
        return out
    grad_loss = grad_loss.to(torch.float32).contiguous()  # autograd often hands in an expanded scalar
    stats = stats.to(torch.float32).contiguous()
    if grad_loss.numel() != n_rows or stats.shape != (n_rows, N_CE_STATS):
        raise ValueError(f"grad_loss must be ({n_rows},) and stats ({n_rows}, {N_CE_STATS}); got "
                         f"{tuple(grad_loss.shape)} and {tuple(stats.shape)}")
    labels = int64_labels(labels, n_rows)
    grad_rows = extension().GradRows(data=out.data_ptr(), dtype=DTYPE_CODES[out.dtype], stride_row=out.stride(0))
    launch("ce_rows_backward", logits.device, _ce_rows_args(logits, labels, ignore_index),
           grad_loss=grad_loss.data_ptr(), stats=stats.data_ptr(), out=grad_rows)
    return out
