"""The block logic of the sparse_kd family shared by its backends, around their kernels: the
renormalize mode (the k support logits only: a gather, the (R, k) divergence, a scatter of k
gradients) and the tail mode given a backend's two V passes (statistics, gradient), with the
(R, k + 1) bucket math of buckets.py in between. Everything here is (R, k)-sized torch ops but
the gather, the scatter and the passes themselves. Formulas: sparse/torch.py.
"""

import math

import torch

from ... import divergences
from ..layout import clamped_ids, compute_dtype
from . import buckets, contract


def _renormalized(s_support, teacher_log, present, has_support):
    """Bucket log-probs (lp, lq) (R, k) of the renormalize mode."""
    # A row without entries would be all -inf (NaN softmax): it is dropped later, give it zeros.
    empty = ~has_support[:, None]
    lp = torch.log_softmax(teacher_log.masked_fill(empty, 0.0), -1)
    lq = torch.log_softmax(s_support.masked_fill(~present, -math.inf).masked_fill_(empty, 0.0), -1)
    return lp, lq


def support_loss(support_logits, indices, logprobs, vocab, labels, spec, ignore_index, scale=None):
    """The renormalize mode from the student's logits at the support only.

    support_logits: (R, k) the student's logits at ``indices`` (R, k) (any values where an id is
    outside [0, V)); logprobs: (R, k), -inf where absent; labels: (R,) or None.
    Returns (loss (R,), ∂(Σ scale·loss)/∂support_logits (R, k) or None without ``scale``, both in
    the compute dtype; 0 at absent entries and inactive rows, NaN in rows with a present id outside
    [0, V)).
    """
    dtype = compute_dtype(support_logits, logprobs)
    teacher_log = logprobs.to(dtype) * spec.inv_temperature
    present = teacher_log != -math.inf
    bad_row = (present & ((indices < 0) | (indices >= vocab))).any(-1)
    has_support = present.any(-1)
    active = has_support if labels is None else has_support & (labels != ignore_index)
    lp, lq = _renormalized(support_logits.to(dtype) * spec.inv_temperature, teacher_log, present, has_support)
    loss, aux = divergences.row_loss_and_aux(spec, lq, lp)
    loss = torch.where(active, torch.where(bad_row, math.nan, loss), 0.0)
    if scale is None:
        return loss, None
    grad = buckets.bucket_grad(spec, lq, lp, aux) * (scale.to(dtype) * spec.inv_temperature)[:, None]
    grad = torch.where(present & active[:, None], grad, 0.0)  # where, not a product: no NaN leaks
    return loss, grad.masked_fill_((bad_row & active)[:, None], math.nan)


def renormalize_block(student_logits, indices, logprobs, labels, spec, ignore_index, scale=None):
    """The renormalize mode of block_loss (sparse/torch.py): only the k logits of the support are
    read; no (R, V) temporary but the gradient itself, a scatter of k gradients per row."""
    vocab = student_logits.shape[1]
    present = logprobs != -math.inf
    index = clamped_ids(indices, present, vocab)[0]
    loss, support_grad = support_loss(student_logits.gather(1, index), indices, logprobs, vocab, labels, spec,
                                      ignore_index, scale)
    if scale is None:
        return loss, None
    grad = torch.zeros_like(student_logits).scatter_add_(1, index, support_grad.to(student_logits.dtype))
    return loss, grad.masked_fill_(support_grad.isnan().any(-1, keepdim=True), math.nan)


def sorted_support(index, present):
    """(ids (R, k) int32 sorted per row with ID_SENTINEL at absent entries, the permutation)."""
    keys = torch.where(present, index, contract.ID_SENTINEL).to(torch.int32)
    return torch.sort(keys, dim=1)


def tail_block(student_logits, indices, logprobs, labels, spec, ignore_index, scale, stats_fn, grad_fn):
    """The tail mode on (R, V) logits, given the two V passes (a backend's launchers with the
    signatures of sparse/triton.py's tail_stats and tail_grad). Returns as torch's block_loss."""
    dtype = compute_dtype(student_logits, logprobs)
    vocab = student_logits.shape[-1]
    inv_t = spec.inv_temperature
    teacher_log = logprobs.to(dtype) * inv_t
    present = teacher_log != -math.inf  # NaN log-probs stay present: they make their row NaN
    index, bad_row = clamped_ids(indices, present, vocab)
    active = present.any(-1) if labels is None else present.any(-1) & (labels != ignore_index)
    sorted_ids, order = sorted_support(index, present)
    stats = stats_fn(student_logits, sorted_ids, active, inv_t).to(dtype)
    row_max, log_sum = stats[:, 0], stats[:, 1]
    log_q_tail = ((stats[:, 3] + (stats[:, 2] - row_max)) - log_sum)
    s_support = (student_logits.gather(1, index).to(dtype) * inv_t).masked_fill_(~present, -math.inf)
    lp, lq = buckets.tail_buckets(spec, teacher_log, s_support, row_max, log_sum, log_q_tail)
    loss, aux = divergences.row_loss_and_aux(spec, lq, lp)
    loss = torch.where(active, torch.where(bad_row, math.nan, loss), 0.0)
    if scale is None:
        return loss, None
    row_scale = scale.to(dtype) * inv_t
    support_grad = torch.where(present & active[:, None], buckets.bucket_grad(spec, lq, lp, aux)[:, :-1]
                               * row_scale[:, None], 0.0)
    factor, shift = buckets.tail_coefficients(spec, lq, lp, loss, aux)
    coefficients = torch.stack([factor, shift, row_scale], 1).float()
    modes = contract.ROW_MODES
    mode = torch.where(active, torch.where(bad_row, modes["nan"], modes["normal"]), modes["zero"]).to(torch.int8)
    grad = grad_fn(student_logits, sorted_ids, support_grad.gather(1, order).float().contiguous(), stats.float(),
                   coefficients, mode, inv_t)
    return loss, grad
