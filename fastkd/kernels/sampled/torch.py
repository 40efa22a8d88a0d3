"""Pure-PyTorch implementation of the sampled_kd family: the cross-entropy of the student
against a teacher known through sampled token ids (random-sampling KD, Anshumann et al. 2025,
"Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs").

A row holds ids x_1..x_K (repeats allowed: draws with replacement) and weights w_j ≥ 0 (1 per
draw, counts of unique ids, or importance weights p(x)/r(x) for draws from a proposal r). With
W = Σ_j w_j (sample_count ≤ 0) or W = sample_count, the sampled target is p̂ = Σ_j (w_j/W)·e_{x_j}
and, with q = softmax(s), s = student / T,

    loss = −Σ_j (w_j/W)·log q_{x_j}
    ∂loss/∂s_i = (Σ_j w_j/W)·q_i − p̂_i

Draws from the teacher p itself with W the number of draws give E[p̂] = p, so E[∂loss/∂s] = q − p,
the gradient of the forward KL(p‖q) (the loss is its cross-entropy part, KL + H(p), in
expectation). With importance weights and W = the number of draws the estimate is unbiased too;
self-normalised (W = Σ w) it is consistent, with a bias of order 1/K.
"""

import math

import torch

from ... import divergences
from ..layout import clamped_ids, compute_dtype, row_chunks

# Elements of one (rows × V) temporary, as the other torch implementations.
CHUNK_ELEMENTS = 1 << 20


def block_loss(student_logits, ids, weights, labels, spec, sample_count, ignore_index, scale=None):
    """student_logits: (R, V); ids: (R, K) int; weights: (R, K) float, 0 where absent; labels:
    (R,) or None.

    Returns (loss (R,) in the compute dtype, ∂(Σ scale·loss)/∂student_logits (R, V) in the
    logits' dtype, or None without ``scale``).
    """
    dtype = compute_dtype(student_logits, weights)
    s = student_logits.to(dtype) * spec.inv_temperature
    vocab = s.shape[1]
    w = weights.to(dtype)
    present = w != 0
    index, bad_row = clamped_ids(ids, present, vocab)
    total = w.sum(-1)
    norm = total if sample_count <= 0 else torch.full_like(total, sample_count)
    has_samples = total != 0
    target = w / torch.where(has_samples, norm, 1.0)[:, None]  # the p̂ weight of each entry
    row_max, log_sum = divergences.log_softmax_parts(s)
    log_q = (s.gather(1, index) - row_max[:, None]) - log_sum[:, None]
    loss = -divergences.safe_weighted(target, log_q).sum(-1)
    grad = None
    if scale is not None:
        q = divergences.log_probs(s, row_max, log_sum).exp_()
        grad = q.mul_(target.sum(-1)[:, None]).scatter_add_(1, index, -target)
    loss = torch.where(bad_row, math.nan, loss)
    active = has_samples if labels is None else has_samples & (labels != ignore_index)
    loss = torch.where(active, loss, 0.0)
    if grad is not None:
        grad = torch.where(bad_row[:, None], math.nan, grad)
        grad = torch.where(active[:, None], grad, 0.0)
        grad = (grad * (scale.to(dtype) * spec.inv_temperature)[:, None]).to(student_logits.dtype)
    return loss, grad


def rows_forward(student, ids, weights, labels, spec, sample_count, ignore_index):
    """student: (N, V); ids, weights: (N, K). Per-row losses (N,), in row chunks."""
    n_rows, n_cols = student.shape
    out = torch.empty(n_rows, dtype=compute_dtype(student, weights), device=student.device)
    for start, stop in row_chunks(n_rows, max(n_cols, ids.shape[1]), CHUNK_ELEMENTS):
        out[start:stop], _ = block_loss(student[start:stop], ids[start:stop], weights[start:stop],
                                        None if labels is None else labels[start:stop], spec, sample_count,
                                        ignore_index)
    return out


def rows_backward(grad_rows, student, ids, weights, labels, spec, sample_count, ignore_index):
    """∂(Σ grad_rows·loss)/∂student: (N, V) in the student's dtype, in row chunks."""
    n_rows, n_cols = student.shape
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    for start, stop in row_chunks(n_rows, max(n_cols, ids.shape[1]), CHUNK_ELEMENTS):
        _, grad[start:stop] = block_loss(student[start:stop], ids[start:stop], weights[start:stop],
                                         None if labels is None else labels[start:stop], spec, sample_count,
                                         ignore_index, grad_rows[start:stop])
    return grad
