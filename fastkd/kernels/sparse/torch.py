"""Pure-PyTorch implementation of the sparse_kd family: divergences against a sparse (top-k,
offline) teacher, on blocks of student logits.

The teacher of a row is k token ids S and their log-probabilities. Two ways to treat the mass
the top-k leaves out (``missing_mass``):

* "renormalize": p̃ = softmax over S of the teacher log-probs, q̃ = softmax over S of the student
  logits (the student restricted to the same support). KL over the k entries; the gradient is
  zero outside S.
* "tail": the teacher's leftover mass P_t = 1 − Σ_S p is one extra bucket, set against the
  student's leftover Q_t = Σ_{i∉S} q_i (computed from the logits outside S, not as 1 − Σ q, so it
  keeps its precision when the top-k covers almost everything). KL over k + 1 buckets; for every
  i ∉ S the gradient is q_i times one per-row constant:
      forward KL:  ∂L/∂s_i = q_i − p̂_i,  p̂ = p on S and P_t·q_i/Q_t off S
      reverse KL:  ∂L/∂s_i = q_i·(d_b(i) − L),  d_b = log Q_b − log P_b of i's bucket b(i)

Temperature divides the student logits and the teacher input. That input is the teacher's logits
on the support up to a per-row constant: log-probs stored at T_g = 1, or T_g·log p_g (the public
functions scale log-probs stored at another teacher_temperature). The tail mode needs the
teacher's leftover mass at T, known only when T = T_g: the input divided by T is then log p_g.
"""

import math

import torch

from ... import divergences
from ..layout import compute_dtype, row_chunks
from .contract import TAIL_FLOOR

# Elements of one (rows × V) temporary, as the logits families' torch implementation.
CHUNK_ELEMENTS = 1 << 20


def _row_chunks(n_rows, n_cols):
    return row_chunks(n_rows, n_cols, CHUNK_ELEMENTS)


def _log_mass_outside(s, index, row_max, log_sum):
    """log Σ_{i∉S} softmax(s)_i per row, summed over the entries outside S (-inf if none)."""
    rest = s.scatter(1, index, -math.inf)
    rest_max = rest.amax(-1)
    shift = torch.where(rest_max > -math.inf, rest_max, torch.zeros_like(rest_max))
    return ((rest - shift[:, None]).exp().sum(-1).log() + (shift - row_max)) - log_sum


def block_loss(student_logits, indices, logprobs, labels, spec, missing_mass, ignore_index, scale=None):
    """student_logits: (R, V); indices: (R, k) int; logprobs: (R, k); labels: (R,) or None.

    Returns (loss (R,) in the compute dtype, ∂(Σ scale·loss)/∂student_logits (R, V) in the
    logits' dtype, or None without ``scale``).
    """
    dtype = compute_dtype(student_logits, logprobs)
    s = student_logits.to(dtype) * spec.inv_temperature
    # Ids outside [0, V) make their row NaN (loss and gradient): checked here, on the device, so the
    # default path never synchronises; gathering at clamped ids keeps the kernels in bounds.
    vocab = s.shape[1]
    bad_row = ((indices < 0) | (indices >= vocab)).any(-1)
    index = indices.long().clamp(0, max(vocab - 1, 0))
    teacher_log = logprobs.to(dtype) * spec.inv_temperature
    s_support = s.gather(1, index)
    if missing_mass == "renormalize":
        log_p = torch.log_softmax(teacher_log, -1)
        log_q = torch.log_softmax(s_support, -1)
        loss, grad_support = divergences.kl_and_grad_on_buckets(spec.name, log_p, log_q)
        grad = None if scale is None else torch.zeros_like(s).scatter_(1, index, grad_support)
    else:
        row_max, log_sum = divergences.log_softmax_parts(s)
        log_q_support = (s_support - row_max[:, None]) - log_sum[:, None]
        log_q_tail = _log_mass_outside(s, index, row_max, log_sum)
        p_tail = (1 - teacher_log.exp().sum(-1)).clamp(min=TAIL_FLOOR if spec.name == "reverse_kl" else 0.0)
        # No student mass outside the support (k = V, or -inf logits there): the tail bucket does
        # not exist, and the teacher's leftover is rounding; keeping it would make forward KL inf.
        p_tail = torch.where(log_q_tail > -math.inf, p_tail, 0.0)
        log_p = torch.cat([teacher_log, p_tail.log()[:, None]], 1)
        log_q = torch.cat([log_q_support, log_q_tail[:, None]], 1)
        loss, _ = divergences.kl_and_grad_on_buckets(spec.name, log_p, log_q)
        grad = None
        if scale is not None:
            q = divergences.log_probs(s, row_max, log_sum).exp()
            if spec.name == "forward_kl":
                tail_factor = 1 - (log_p[:, -1] - log_q[:, -1]).exp()
                support_grad = q.gather(1, index) - teacher_log.exp()
            else:
                d = log_q - log_p
                tail_factor = d[:, -1] - loss
                support_grad = divergences.safe_weighted(log_q_support.exp(), d[:, :-1] - loss[:, None])
            # Off the support q_i multiplies one constant; with no student mass there it is moot.
            tail_factor = torch.where(log_q_tail > -math.inf, tail_factor, 0.0)
            grad = (q * tail_factor[:, None]).scatter_(1, index, support_grad)
    loss = torch.where(bad_row, math.nan, loss)
    if grad is not None:
        grad = torch.where(bad_row[:, None], math.nan, grad)
    if labels is not None:
        active = labels != ignore_index
        loss = torch.where(active, loss, 0.0)
        if grad is not None:
            grad = torch.where(active[:, None], grad, 0.0)
    if grad is not None:
        grad = (grad * (scale.to(dtype) * spec.inv_temperature)[:, None]).to(student_logits.dtype)
    return loss, grad


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
