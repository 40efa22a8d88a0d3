"""Vocabulary-chunked distillation from hidden states: the GEMMs and the per-block losses.

Tokens are processed in blocks of C rows. For each block the teacher and student logits (C, V)
are formed with one matmul each (tensor cores on a GPU); a logits backend (Triton kernels or the
torch reference) computes the divergence rows, the optional hard-label cross-entropy rows and,
when gradients are wanted, ∂/∂(student logits) for the block; that gradient block is at once
contracted into grad_hidden (C, Hs) and accumulated into grad_weight (V, Hs). Nothing (N, V) is
ever allocated: the workspace is three (C, V) blocks, C chosen from a fixed element budget.
"""

from dataclasses import dataclass

import torch

from . import launcher
from ..divergences import DivergenceSpec

# Elements of one (C, V) logit block: 64M on a GPU (128 MiB in bf16, GEMMs of ≥ 512 rows at
# V = 128k), 2M on the CPU, where the torch backend's fp32 temporaries dominate.
BLOCK_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 21}


@dataclass(frozen=True)
class FusedLinearOptions:
    spec: DivergenceSpec
    ignore_index: int
    with_hard: bool  # also compute hard-label cross-entropy rows (needs labels)
    backend: str  # logits backend for the kd_rows and ce families


def block_rows(n_rows, vocab, device):
    budget = BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS["cpu"])
    return max(1, min(n_rows, budget // max(vocab, 1)))


def _logits(hidden, weight, bias):
    return torch.matmul(hidden, weight.t()) if bias is None else torch.addmm(bias, hidden, weight.t())


def _ce_launcher(backend):
    try:
        return launcher(backend, "ce")
    except ValueError:  # backends without their own cross-entropy kernels use the reference
        return launcher("torch", "ce")


def run(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
        labels, options, soft_scale=None, hard_scale=None, need=(False, False, False)):
    """Per-row soft (divergence) and hard (cross-entropy) losses and, optionally, gradients.

    student_hidden: (N, Hs); student_weight: (V, Hs); teacher_hidden: (N, Ht); teacher_weight:
    (V, Ht); biases: (V,) or None; labels: (N,) int or None. With soft_scale and hard_scale (N,)
    given, also returns the gradients of Σ soft_scale·soft + hard_scale·hard with respect to the
    student hidden states, weight and bias, each only where ``need`` says so (else None).
    Returns (soft_rows (N,), hard_rows (N,), grad_hidden, grad_weight, grad_bias).
    """
    n_rows = student_hidden.shape[0]
    vocab = student_weight.shape[0]
    kd = launcher(options.backend, "kd_rows")
    ce = _ce_launcher(options.backend)
    spec, ignore_index = options.spec, options.ignore_index
    want_grad = soft_scale is not None
    need_hidden, need_weight, need_bias = need if want_grad else (False, False, False)
    grad_hidden = torch.empty_like(student_hidden) if need_hidden else None
    grad_weight = torch.zeros_like(student_weight) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=student_weight.device) if need_bias else None
    soft_rows = hard_rows = None

    rows = block_rows(n_rows, vocab, student_hidden.device)
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        hidden = student_hidden[start:stop]
        block_labels = None if labels is None else labels[start:stop]
        student_logits = _logits(hidden, student_weight, student_bias)
        teacher_logits = _logits(teacher_hidden[start:stop], teacher_weight, teacher_bias)
        soft, stats = kd.kd_rows_forward(student_logits, teacher_logits, block_labels, spec, ignore_index)
        if soft_rows is None:
            soft_rows = soft.new_empty(n_rows)
            hard_rows = soft.new_zeros(n_rows)
        soft_rows[start:stop] = soft
        if options.with_hard:
            hard, ce_stats = ce.ce_rows_forward(student_logits, block_labels, ignore_index)
            hard_rows[start:stop] = hard
        if not want_grad:
            continue
        grad_logits = kd.kd_rows_backward(soft_scale[start:stop], student_logits, teacher_logits, block_labels,
                                          stats, spec, ignore_index)
        del teacher_logits
        if options.with_hard:
            ce.ce_rows_backward(hard_scale[start:stop], student_logits, block_labels, ce_stats, ignore_index,
                                out=grad_logits)
        if need_hidden:
            torch.matmul(grad_logits, student_weight, out=grad_hidden[start:stop])
        if need_weight:
            grad_weight.addmm_(grad_logits.t(), hidden)
        if need_bias:
            grad_bias += grad_logits.sum(0, dtype=torch.float32)

    if soft_rows is None:  # no rows at all
        dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
        soft_rows = torch.zeros(0, dtype=dtype, device=student_hidden.device)
        hard_rows = torch.zeros(0, dtype=dtype, device=student_hidden.device)
    if grad_bias is not None:
        grad_bias = grad_bias.to(student_bias.dtype)
    return soft_rows, hard_rows, grad_hidden, grad_weight, grad_bias
