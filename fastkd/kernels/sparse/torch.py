"""Pure-PyTorch implementation of the sparse_kd family: divergences against a sparse (top-k,
offline) teacher, on blocks of student logits.

The teacher of a row is k token ids S and their log-probabilities (entries with log-prob -inf are
absent and not part of S; see contract.py). The divergence is taken over buckets: each id of S is
one bucket, and ``missing_mass`` decides what else there is:

* "renormalize": the k buckets only. p̃ = softmax over S of the teacher log-probs, q̃ = softmax
  over S of the student logits (the student restricted to the same support). The gradient is
  zero outside S.
* "tail": one more bucket for everything outside S. The teacher's leftover mass is
  P_t = 1 − Σ_S p; the student's is Q_t = Σ_{i∉S} q_i (computed from the logits outside S, not as
  1 − Σ q, so it keeps its precision when the top-k covers almost everything). With k = V (no
  token outside S) there is no tail bucket.

With P, Q the bucket distributions (teacher, student), the divergences are those of
fastkd/divergences.py, over buckets:

    forward_kl  Σ_b P_b·log(P_b/Q_b)           reverse_kl  Σ_b Q_b·log(Q_b/P_b)
    jsd (β)     β·KL(P‖M) + (1−β)·KL(Q‖M),  M = β·P + (1−β)·Q   (β = 0, 1: exactly forward, reverse KL)
    tvd         ½·Σ_b |P_b − Q_b|

Gradient with respect to the scaled student logits s = student / T. A bucket's student mass is a
sum of q_i, so every ∂L/∂s_i has the form q_i·(g_{b(i)} − aux) with g the element-wise term of
the divergence on i's bucket and aux one per-row constant (divergences.py); on a support bucket
this is the bucket gradient itself, and every i outside S shares the tail bucket's factor:

    forward_kl  q_i − P_t·q_i/Q_t            reverse_kl  q_i·(log(Q_t/P_t) − L)
    jsd         (1−β)·q_i·(log(Q_t/M_t) − aux),  aux = KL(Q‖M)
    tvd         q_i·(½·sign(Q_t − P_t) − aux),   aux = ½·Σ_b sign(Q_b − P_b)·Q_b
                (½·sign − aux summed over the buckets of the other sign, where no 1 − 1 cancels)

Temperature divides the student logits and the teacher input. That input is the teacher's logits
on the support up to a per-row constant: log-probs stored at T_g = 1, or T_g·log p_g (the public
functions scale log-probs stored at another teacher_temperature). The tail mode needs the
teacher's leftover mass at T, known only when T = T_g: the input divided by T is then log p_g.
"""

import math

import torch

from ... import divergences
from ..layout import clamped_ids, compute_dtype, row_chunks
from . import blocks, buckets
from .blocks import support_loss  # noqa: F401  (the fused support path's entry, kernels.support_loss)

# Elements of one (rows × V) temporary, as the logits families' torch implementation.
CHUNK_ELEMENTS = 1 << 20


def _row_chunks(n_rows, n_cols):
    return row_chunks(n_rows, n_cols, CHUNK_ELEMENTS)


def _log_mass_outside(s, index, present, row_max, log_sum):
    """(log Σ_{i∉S} softmax(s)_i (R,), s with the support at -inf (R, V)). Adding -inf at the
    present ids (0 at absent ones) marks the support without a scatter race on repeated ids."""
    rest = s.scatter_add(1, index, torch.zeros_like(index, dtype=s.dtype).masked_fill_(present, -math.inf))
    rest_max = rest.amax(-1)
    shift = torch.where(rest_max > -math.inf, rest_max, torch.zeros_like(rest_max))
    return ((rest - shift[:, None]).exp().sum(-1).log() + (shift - row_max)) - log_sum, rest


def _tail_grad(spec, s, row_max, log_sum, lq, lp, loss, aux):
    """∂L/∂s_i for every i, as if i were in the tail bucket (the support's entries are replaced
    by the caller): factor·q_i − exp(log q_i + shift) (buckets.tail_coefficients). (R, V)."""
    log_q = divergences.log_probs(s, row_max, log_sum)
    factor, shift = buckets.tail_coefficients(spec, lq, lp, loss, aux)
    if spec.name == "forward_kl":
        return log_q.exp() - (log_q + shift[:, None]).exp()
    return log_q.exp_().mul_(factor[:, None])


def block_loss(student_logits, indices, logprobs, labels, spec, missing_mass, ignore_index, scale=None):
    """student_logits: (R, V); indices: (R, k) int; logprobs: (R, k), -inf where absent; labels:
    (R,) or None.

    Returns (loss (R,) in the compute dtype, ∂(Σ scale·loss)/∂student_logits (R, V) in the
    logits' dtype, or None without ``scale``).
    """
    dtype = compute_dtype(student_logits, logprobs)
    vocab = student_logits.shape[1]
    teacher_log = logprobs.to(dtype) * spec.inv_temperature
    present = teacher_log != -math.inf  # NaN log-probs stay present: they make their row NaN
    # Ids outside [0, V) make their row NaN (loss and gradient): checked here, on the device, so the
    # default path never synchronises; gathering at clamped ids keeps the kernels in bounds.
    index, bad_row = clamped_ids(indices, present, vocab)
    if missing_mass == "renormalize":
        return blocks.renormalize_block(student_logits, indices, logprobs, labels, spec, ignore_index, scale)
    has_support = present.any(-1)
    active = has_support if labels is None else has_support & (labels != ignore_index)
    s = student_logits.to(dtype) * spec.inv_temperature
    s_support = s.gather(1, index).masked_fill_(~present, -math.inf)
    row_max, log_sum = divergences.log_softmax_parts(s)
    log_q_tail, rest = _log_mass_outside(s, index, present, row_max, log_sum)
    lp, lq = buckets.tail_buckets(spec, teacher_log, s_support, row_max, log_sum, log_q_tail)
    loss, aux = divergences.row_loss_and_aux(spec, lq, lp)
    loss = torch.where(active, torch.where(bad_row, math.nan, loss), 0.0)
    if scale is None:
        return loss, None
    row_scale = (scale.to(dtype) * spec.inv_temperature)[:, None]
    # Absent entries add 0 wherever their (arbitrary) id points; inactive rows add 0 (where, not a
    # product: a NaN in an ignored row must not leak).
    support_grad = buckets.bucket_grad(spec, lq, lp, aux)[:, :-1] * row_scale
    support_grad = torch.where(present & active[:, None], support_grad, 0.0)
    grad = _tail_grad(spec, s, row_max, log_sum, lq, lp, loss, aux)
    grad = torch.where((rest == -math.inf) | ~active[:, None], 0.0, grad.mul_(row_scale))
    grad = grad.scatter_add_(1, index, support_grad).to(student_logits.dtype)
    return loss, grad.masked_fill_((bad_row & active)[:, None], math.nan)


def rows_forward(student, indices, logprobs, labels, spec, missing_mass, ignore_index):
    """student: (N, V); indices, logprobs: (N, k). Per-row losses (N,), in row chunks."""
    n_rows, n_cols = student.shape
    out = torch.empty(n_rows, dtype=compute_dtype(student, logprobs), device=student.device)
    for start, stop in _row_chunks(n_rows, n_cols):
        out[start:stop], _ = block_loss(student[start:stop], indices[start:stop], logprobs[start:stop],
                                        None if labels is None else labels[start:stop], spec, missing_mass,
                                        ignore_index)
    return out


def rows_backward(grad_rows, student, indices, logprobs, labels, spec, missing_mass, ignore_index):
    """∂(Σ grad_rows·loss)/∂student: (N, V) in the student's dtype, in row chunks."""
    n_rows, n_cols = student.shape
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    for start, stop in _row_chunks(n_rows, n_cols):
        _, grad[start:stop] = block_loss(student[start:stop], indices[start:stop], logprobs[start:stop],
                                         None if labels is None else labels[start:stop], spec, missing_mass,
                                         ignore_index, grad_rows[start:stop])
    return grad
