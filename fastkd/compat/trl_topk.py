"""Drop-in for the top-k / tail-bucket divergence of TRL 1.16's on-policy distillation
(``trl/experimental/server_distillation`` and ``async_distillation``: ``_jsd_divergence`` with a
support mask, ``_add_tail_bucket``, ``_reduce_divergence_loss``), where the teacher is known only
by its top-k token ids and log-probabilities (TRL not needed). Named apart from
``generalized_jsd_loss`` so that positional arguments never clash.

Per token, with the student's log-probabilities log q = log_softmax(student_logits / T) over the
whole vocabulary (the teacher's log-probs are used as given: TRL asks the teacher server for them
at that temperature):

* support: the candidates with an id ≥ 0 and a log-prob > −inf (TRL's server pads with −inf
  log-probs, its async trainer with id −1); ``support_mask`` overrides this;
* S = log q at the candidates, L = the teacher's log-probs, both −inf off the support;
* ``add_tail_bucket=True``: one more bucket each, log(1 − exp(min(logsumexp(·), −1e−7))) (the
  clamp keeps it ≥ about 1e−7), always in the support; ``False``: S and L renormalised over the
  support (S − logsumexp S, L − logsumexp L);
* element-wise, with P = exp(L), Q = exp(S) on the support and 0 off it:
  beta = 0: P·(L − S); beta = 1: Q·(S − L); else beta·P·(L − log M) + (1 − beta)·Q·(S − log M),
  M = (1 − beta)·Q + beta·P clamped below by the dtype's smallest normal; NaN terms are 0
  (TRL's ``nan_to_num``);
* reduced as TRL's ``_reduce_divergence_loss`` with ``completion_mask = labels != -100`` (see
  ``_trl_reduction``); 'none' returns the kept tokens' terms, (kept, k + 1) or (kept, k).

Gradients go to the student logits only. Deliberate differences: 'mean' over zero kept tokens is
0 (TRL: NaN); the student's log-softmax is computed in float32 (float64 for float64 logits),
whatever the logits' dtype, and the k + 1 bucket terms in float64; the student's tail bucket,
TRL's log(1 − Σ_support q) with its clamp, is formed without float32 cancellation (log1p of the
support's mass, or the log-mass outside the support when that is the smaller; the same number for
distinct candidate ids);
the mixture's floor is float64's smallest normal. fastkd's ``sparse_kd_loss`` has no exact equivalent — it has no padded candidates, divides
the teacher's log-probs by T again, has no mixture (beta strictly between 0 and 1), and sets the
tail without TRL's 1e−7 clamp — so this runs on the row-chunked path of ``_chunked_rows`` (bounded
extra memory; the (N, V) log-softmax is never stored).
"""

import math

import torch

from .. import validation
from ._chunked_rows import chunked_rows
from ._support_mass import log_mass_outside, safe_logsumexp
from ._trl_reduction import check_reduction, keep_mask, reduce_rows
from .trl import host_beta

TAIL_CLAMP = -1e-7  # TRL's upper bound on the support's log-mass before forming the tail


def _tail_bucket(log_probs, support):
    """Appends log(1 − Σ exp) (the support's mass clamped below 1) as an always-present bucket."""
    log_sum = torch.logsumexp(log_probs, -1, keepdim=True).clamp(max=TAIL_CLAMP)
    tail = torch.log(-torch.expm1(log_sum))
    return torch.cat([log_probs, tail], -1), torch.cat([support, torch.ones_like(support[..., :1])], -1)


def _support_terms(log_q, log_p, beta, support):
    """TRL's masked generalized-JSD terms over a fixed support: (R, W)."""
    zero = torch.zeros((), dtype=log_q.dtype, device=log_q.device)
    safe_q, safe_p = torch.where(support, log_q, zero), torch.where(support, log_p, zero)
    q, p = torch.where(support, log_q.exp(), zero), torch.where(support, log_p.exp(), zero)
    if beta == 0:
        return torch.nan_to_num(p * (safe_p - safe_q), nan=0.0)
    if beta == 1:
        return torch.nan_to_num(q * (safe_q - safe_p), nan=0.0)
    mixture = (1 - beta) * q + beta * p
    safe_m = torch.where(support, torch.log(mixture.clamp_min(torch.finfo(q.dtype).tiny)), zero)
    kl_teacher = torch.nan_to_num(p * (safe_p - safe_m), nan=0.0)
    kl_student = torch.nan_to_num(q * (safe_q - safe_m), nan=0.0)
    return beta * kl_teacher + (1 - beta) * kl_student


def _check_topk(student_logits, teacher_topk_ids, teacher_topk_logprobs, support_mask):
    validation.check_logits("student_logits", student_logits)
    leading = student_logits.shape[:-1]
    if not isinstance(teacher_topk_ids, torch.Tensor) or teacher_topk_ids.dtype.is_floating_point \
            or teacher_topk_ids.dtype == torch.bool:
        raise TypeError("teacher_topk_ids must be an integer tensor (…, k)")
    if teacher_topk_ids.dim() < 1 or teacher_topk_ids.shape[:-1] != leading or teacher_topk_ids.shape[-1] == 0:
        raise ValueError(f"teacher_topk_ids must have shape {(*leading, 'k')} with k ≥ 1; got "
                         f"{tuple(teacher_topk_ids.shape)}")
    validation.check_float_tensor("teacher_topk_logprobs", teacher_topk_logprobs)
    if teacher_topk_logprobs.shape != teacher_topk_ids.shape:
        raise ValueError(f"teacher_topk_logprobs must have teacher_topk_ids' shape {tuple(teacher_topk_ids.shape)}; "
                         f"got {tuple(teacher_topk_logprobs.shape)}")
    for name, tensor in (("teacher_topk_ids", teacher_topk_ids), ("teacher_topk_logprobs", teacher_topk_logprobs),
                         ("support_mask", support_mask)):
        if tensor is not None and tensor.device != student_logits.device:
            raise ValueError(f"{name} is on {tensor.device} but student_logits is on {student_logits.device}")
    if support_mask is not None and (not isinstance(support_mask, torch.Tensor) or support_mask.dtype != torch.bool
                                     or support_mask.shape != teacher_topk_ids.shape):
        raise ValueError(f"support_mask must be a bool tensor of shape {tuple(teacher_topk_ids.shape)}")


def topk_generalized_jsd_loss(student_logits, teacher_topk_ids, teacher_topk_logprobs, labels=None, beta=0.0,
                              temperature=1.0, add_tail_bucket=True, reduction="batchmean", num_items_in_batch=None,
                              support_mask=None):
    """student_logits: (…, V); teacher_topk_ids, teacher_topk_logprobs: (…, k); labels: (…) with
    -100 ignored; support_mask: (…, k) bool or None. Returns a scalar, or the kept tokens' terms."""
    check_reduction(reduction)
    _check_topk(student_logits, teacher_topk_ids, teacher_topk_logprobs, support_mask)
    validation.check_flag("add_tail_bucket", add_tail_bucket)
    beta = host_beta(beta)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
        raise ValueError(f"beta must be a number in [0, 1]; got {beta!r}")
    if isinstance(temperature, torch.Tensor):
        temperature = host_beta(temperature)  # a number for the formula: one read, as TRL's config value
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
            or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")

    vocab, top_k = student_logits.shape[-1], teacher_topk_ids.shape[-1]
    rows = student_logits.numel() // vocab
    keep = keep_mask(labels, rows)
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    ids = teacher_topk_ids.reshape(rows, top_k)
    logprobs = teacher_topk_logprobs.reshape(rows, top_k)
    support = (ids >= 0) & (logprobs > -math.inf) if support_mask is None else support_mask.reshape(rows, top_k)

    def row_fn(logits, ids, logprobs, support):
        log_q = torch.log_softmax(logits.to(dtype) / temperature, -1)
        # The k + 1 buckets are few: float64 keeps TRL's 1 − Σ exp(·) forms from cancelling.
        minus_inf = torch.full((), -math.inf, dtype=torch.float64, device=logits.device)
        s = torch.where(support, log_q.gather(-1, ids.clamp_min(0).long()).double(), minus_inf)
        p = torch.where(support, logprobs.double(), minus_inf)
        if add_tail_bucket:
            # TRL's clamp of the support's log-mass at -1e-7 floors the tail at 1 − e^(-1e-7)
            tail = log_mass_outside(log_q, ids, support, safe_logsumexp(s)).clamp(min=math.log(-math.expm1(TAIL_CLAMP)))
            s = torch.cat([s, tail], -1)
            p, full_support = _tail_bucket(p, support)
        else:
            s = s - torch.logsumexp(s, -1, keepdim=True)
            p = p - torch.logsumexp(p, -1, keepdim=True)
            full_support = support
        return _support_terms(s, p, beta, full_support).to(dtype)

    terms = chunked_rows(row_fn, student_logits.reshape(rows, vocab), ids, logprobs.detach(), support)
    out_dtype = torch.promote_types(dtype, teacher_topk_logprobs.dtype)
    if reduction == "none" and num_items_in_batch is None:
        terms = terms.reshape(*student_logits.shape[:-1], terms.shape[-1]) if keep is None else terms[keep]
        return terms.to(out_dtype)
    loss = reduce_rows(terms.sum(-1), keep, terms.shape[-1], student_logits.shape[0], reduction, num_items_in_batch)
    return loss.to(out_dtype)
