"""Drop-in for TRL 1.16's ``GOLDTrainer.generalized_jsd_loss`` (trl/experimental/gold; TRL not
needed): GKD's loss plus a ``logits_are_probs`` argument, named separately from
``generalized_jsd_loss`` so that positional arguments never land on the wrong parameter.

With ``logits_are_probs=False`` it is exactly :func:`fastkd.compat.generalized_jsd_loss` (fused).
With ``logits_are_probs=True`` the inputs are probabilities: X = log(max(student, 1e-8)),
Y = log(max(teacher, 1e-8)) (temperature unused), and the loss is the generalized JSD term by term
on them with nothing renormalised (``_pointwise_jsd``; beta = 0 / 1 are P·(Y − X) and
Q·(X − Y) with P = exp(Y), Q = exp(X)), then masked and reduced as GKD's (see ``_trl_reduction``).
Gradients reach both inputs through the clamped logs, as in TRL.

Deliberate differences: 'mean' over zero kept tokens is 0 (TRL: NaN); the probability path runs in
float32 (float64 for float64 inputs) on the row-chunked path of ``_chunked_rows`` (bounded extra
memory; fastkd's fused ops take logits, not probabilities); 'none' returns the kept terms in that
dtype.
"""

import torch

from .. import validation
from ._chunked_rows import chunked_rows
from ._pointwise_jsd import pointwise_jsd_terms
from ._trl_reduction import check_reduction, keep_mask, reduce_rows
from .trl import generalized_jsd_loss, host_beta

PROB_FLOOR = 1e-8


def gold_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                              reduction="batchmean", logits_are_probs=False, num_items_in_batch=None):
    """student_logits, teacher_logits: (B, T, V) logits, or probabilities with ``logits_are_probs``;
    labels: (B, T) with -100 ignored."""
    validation.check_flag("logits_are_probs", logits_are_probs)
    if not logits_are_probs:
        return generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature, reduction,
                                    num_items_in_batch)
    check_reduction(reduction)
    validation.check_logits("student_logits", student_logits)
    validation.check_logits("teacher_logits", teacher_logits)
    validation.check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    beta = host_beta(beta)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
        raise ValueError(f"beta must be a number in [0, 1]; got {beta!r}")
    vocab = student_logits.shape[-1]
    rows = student_logits.numel() // vocab
    keep = keep_mask(labels, rows)
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    elementwise = reduction == "none" and num_items_in_batch is None

    def row_fn(student, teacher):
        terms = pointwise_jsd_terms(student.to(dtype).clamp_min(PROB_FLOOR).log(),
                                    teacher.to(dtype).clamp_min(PROB_FLOOR).log(), beta)
        return terms if elementwise else terms.sum(-1)

    out = chunked_rows(row_fn, student_logits.reshape(rows, vocab), teacher_logits.reshape(rows, vocab))
    if elementwise:
        return out.reshape(student_logits.shape) if keep is None else out[keep]
    return reduce_rows(out, keep, vocab, student_logits.shape[0], reduction, num_items_in_batch)
