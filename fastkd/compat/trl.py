"""Drop-in for TRL's ``GKDTrainer.generalized_jsd_loss`` (importing TRL is not needed).

Mirrors the current TRL definition: temperature applied to both logits (no T²); beta = 0 is
KL(teacher ‖ student), beta = 1 KL(student ‖ teacher), otherwise beta·KL(p ‖ M) + (1−beta)·KL(q ‖ M)
with M = beta·p + (1−beta)·q; tokens whose label is -100 are dropped; then
``num_items_in_batch`` (sum / count) or ``reduction``: 'batchmean' (sum over valid tokens /
their number, at least 1; without labels sum / student_logits.size(0)), 'sum', 'mean' (over
elements), 'none' (element-wise, valid tokens only). Older TRL releases divided the label-less
'batchmean' by size(0)·size(1) instead. One deliberate difference: 'mean' over zero valid tokens
is 0 here, NaN in TRL.
"""

import torch

from ..divergences import make_spec, safe_weighted
from ..functional import kd_loss

IGNORE_INDEX = -100


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """student_logits, teacher_logits: (B, T, V) or (N, V); labels: their leading shape, -100 ignored."""
    if reduction not in ("batchmean", "sum", "mean", "none"):
        raise ValueError(f"reduction must be one of 'batchmean', 'sum', 'mean', 'none'; got {reduction!r}")
    out_dtype = torch.result_type(student_logits, teacher_logits)
    options = dict(divergence="jsd", beta=beta, temperature=temperature, labels=labels,
                   ignore_index=IGNORE_INDEX)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(student_logits.device)
        return (kd_loss(student_logits, teacher_logits, reduction="sum", **options)
                / num_items_in_batch).to(out_dtype)
    if reduction == "none":
        return _elementwise_jsd(student_logits, teacher_logits, labels, beta, temperature).to(out_dtype)
    if reduction == "batchmean" and labels is not None:
        return kd_loss(student_logits, teacher_logits, reduction="mean", **options).to(out_dtype)
    total = kd_loss(student_logits, teacher_logits, reduction="sum", **options)
    if reduction == "batchmean":
        total = total / max(student_logits.shape[0], 1)
    elif reduction == "mean":
        vocab = student_logits.shape[-1]
        rows = student_logits.numel() // vocab if labels is None else (labels != IGNORE_INDEX).sum().clamp(min=1)
        total = total / (rows * vocab)
    return total.to(out_dtype)


def _elementwise_jsd(student_logits, teacher_logits, labels, beta, temperature):
    """The per-element terms TRL returns for reduction='none': (valid tokens, V), or the full shape."""
    spec = make_spec("jsd", temperature, beta)
    lq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    lp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    q, p = lq.exp(), lp.exp()
    if spec.name == "forward_kl":
        jsd = safe_weighted(p, lp - lq)
    elif spec.name == "reverse_kl":
        jsd = safe_weighted(q, lq - lp)
    else:
        lm = torch.logaddexp(lp + spec.log_param, lq + spec.log1m_param)
        jsd = beta * safe_weighted(p, lp - lm) + (1 - beta) * safe_weighted(q, lq - lm)
    return jsd if labels is None else jsd[labels != IGNORE_INDEX]
