"""Drop-in for DistillKit's sparse KL (``distillkit.lossfuncs.kl.sparse_kl_div`` and its
``MissingProbabilityHandling``; DistillKit not needed), with its signature and numbers.

The student is dense, logits (B, S, V); the teacher is sparse: ids (B, S, k) and values (B, S, k),
log-probabilities sampled at ``target_generation_temperature`` (``log_target=True``) or logits.
Per token, s = the student's full-vocabulary log-softmax of logits · (student_generation_temperature
/ temperature) at the ids (not renormalised over them), and t = the teacher's log-probs at the
distillation temperature:

* log-probs, α = target_generation_temperature / temperature, m = 1 − Σ exp(values) clamped to
  [0, 1]: ``ZERO`` t = α·v − log Σ exp(α·v) (the top-k renormalised, the rest taken as 0);
  ``SYMMETRIC_UNIFORM`` t = α·v − log(Σ exp(α·v) + m^α), or t = v unchanged when the two
  temperatures agree (math.isclose);
* logits (``ZERO`` only): t = log_softmax over the k of v·α (v unchanged when they agree).

The token's loss is Σ exp(t)·(t − s), plus for ``SYMMETRIC_UNIFORM`` the leftover-mass term
m_t·(log m_t − log m_s) with log m = log1p(−clamp(Σ exp(·), eps, 1 − eps)) for t and s (the
missing mass of both, as one bucket). Tokens are weighted by ``mask`` (any numeric or bool,
(B, S) or (B, S, 1)); the sum over all tokens comes back in the logits' dtype. DistillKit's
``KLDLoss`` then multiplies by temperature² and divides by the number of tokens
(``num_items_in_batch``, mask.sum() or B·S): do that on the result.

Mapping onto fastkd's ``sparse_kd_loss(missing_mass=…)``: neither mode has an exact equivalent.
``ZERO`` is KL(p̃ ‖ q) with p̃ the renormalised top-k and q the student's full softmax, while
"renormalize" also restricts the student to the top-k (the two differ by log Σ_k q and in the
gradient outside the top-k); ``SYMMETRIC_UNIFORM`` is "tail" apart from the eps clamps of both
leftover masses (active whenever the student puts more than 1 − 1e−8 on the top-k) and the α
transform of the teacher at another temperature (fastkd's "tail" runs at T = 1 only). Both run
here, exactly, on the row-chunked path of ``_chunked_rows`` (bounded extra memory; the (N, V)
log-softmax is never stored). ``chunk_length`` is accepted and only checked: the rows are chunked
by an element budget.

Deliberate differences: the student's log-probs are formed in float32 (float64 for float64
logits) instead of being rounded to the logits' dtype first, and the k-wide terms in float64; the
student's missing mass is formed without float32 cancellation (``_support_mass``; the same number
for DistillKit's distinct top-k ids); the clamp to 1 − eps is exact (DistillKit's float32 rounds
1 − 1e−8 to 1, so a top-k holding all the mass gives log1p(−1) = −inf and a NaN loss there).
"""

import math
from enum import Enum

import torch

from .. import validation
from ._chunked_rows import chunked_rows
from ._support_mass import log_mass_outside, safe_logsumexp


class MissingProbabilityHandling(Enum):
    ZERO = "zero"
    SYMMETRIC_UNIFORM = "symmetric_uniform"


def _missing_mode(missing):
    """Accepts our enum, DistillKit's (same names and values) or the value string."""
    value = getattr(missing, "value", missing)
    for mode in MissingProbabilityHandling:
        if value == mode.value:
            return mode
    raise ValueError(f"missing must be MissingProbabilityHandling.ZERO or .SYMMETRIC_UNIFORM (or 'zero', "
                     f"'symmetric_uniform'); got {missing!r}")


def _teacher_logprobs(values, log_target, temperature, generation_temperature, missing):
    """DistillKit's get_target_logprobs, in the values' compute dtype: (R, k)."""
    changed = not math.isclose(temperature, generation_temperature)
    alpha = generation_temperature / temperature
    if not log_target:
        logits = values * alpha if changed else values
        return logits - torch.logsumexp(logits, -1, keepdim=True)
    if not changed and missing is MissingProbabilityHandling.SYMMETRIC_UNIFORM:
        return values
    scaled = alpha * values
    if missing is MissingProbabilityHandling.SYMMETRIC_UNIFORM:
        leftover = (1.0 - torch.logsumexp(values, -1, keepdim=True).exp()).clamp(0, 1)
        return scaled - torch.log(torch.logsumexp(scaled, -1, keepdim=True).exp() + leftover.pow(alpha))
    return scaled - torch.logsumexp(scaled, -1, keepdim=True)


def _clamped(log_missing, eps):
    """DistillKit's log1p(−clamp(Σ, eps, 1 − eps)), as a clamp of log(1 − Σ)."""
    return log_missing.clamp(min=math.log(eps) if eps > 0 else -math.inf, max=math.log1p(-eps))


def _check(logits, target_ids, target_values, mask, eps, log_target, temperatures, chunk_length, missing):
    validation.check_logits("logits", logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must be (batch, seq_len, vocab); got shape {tuple(logits.shape)}")
    if not isinstance(target_ids, torch.Tensor) or target_ids.dtype.is_floating_point or target_ids.dtype == torch.bool:
        raise TypeError("target_ids must be an integer tensor (batch, seq_len, k)")
    if target_ids.dim() != 3 or target_ids.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"target_ids shape {tuple(target_ids.shape)} does not match logits shape "
                         f"{tuple(logits.shape)}")
    validation.check_float_tensor("target_values", target_values)
    if target_values.shape != target_ids.shape:
        raise ValueError(f"target_values shape {tuple(target_values.shape)} does not match target_ids shape "
                         f"{tuple(target_ids.shape)}")
    for name, tensor in (("target_ids", target_ids), ("target_values", target_values), ("mask", mask)):
        if tensor is not None and tensor.device != logits.device:
            raise ValueError(f"{name} is on {tensor.device} but logits are on {logits.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a tensor or None; got {type(mask).__name__}")
        shape = tuple(mask.shape[:-1]) if mask.dim() == 3 and mask.shape[-1] == 1 else tuple(mask.shape)
        if shape != tuple(logits.shape[:-1]):
            raise ValueError(f"mask must have shape {tuple(logits.shape[:-1])} (or with a trailing 1); "
                             f"got {tuple(mask.shape)}")
    validation.check_flag("log_target", log_target)
    for name, value in temperatures.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"{name} must be a finite number; got {value!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 0.5:
        raise ValueError(f"eps must be a number in [0, 0.5); got {eps!r}")
    if not temperatures["temperature"] > eps:
        raise ValueError(f"temperature must be positive and non-zero, got {temperatures['temperature']}")
    if chunk_length is not None and (isinstance(chunk_length, bool) or not isinstance(chunk_length, int)
                                     or chunk_length < 1):
        raise ValueError(f"chunk_length must be a positive int or None; got {chunk_length!r}")
    if not log_target and missing is not MissingProbabilityHandling.ZERO:
        raise ValueError("log_target=False (teacher logits) supports only MissingProbabilityHandling.ZERO: the "
                         "teacher's leftover mass is unknown from its top-k logits")


def sparse_kl_div(logits, target_ids, target_values, mask=None, eps: float = 1e-8,
                  missing=MissingProbabilityHandling.ZERO, log_target: bool = True, temperature: float = 1.0,
                  target_generation_temperature: float = 1.0, student_generation_temperature: float = 1.0,
                  chunk_length=None):
    """logits: (B, S, V); target_ids, target_values: (B, S, k); mask: (B, S) or None. Returns the
    0-d sum over the tokens in the logits' dtype."""
    missing = _missing_mode(missing)
    _check(logits, target_ids, target_values, mask, eps, log_target,
           {"temperature": temperature, "target_generation_temperature": target_generation_temperature,
            "student_generation_temperature": student_generation_temperature}, chunk_length, missing)
    vocab, top_k = logits.shape[-1], target_ids.shape[-1]
    rows = logits.numel() // vocab
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    student_scale = (student_generation_temperature / temperature
                     if not math.isclose(temperature, student_generation_temperature) else 1.0)

    def row_fn(x, ids, values):
        log_q = torch.log_softmax(x.to(dtype) * student_scale, -1)
        # The k-wide teacher and bucket terms are few: float64 keeps 1 − Σ exp(·) from cancelling.
        s = log_q.gather(-1, ids.long()).double()
        t = _teacher_logprobs(values.double(), log_target, temperature, target_generation_temperature, missing)
        loss = (t.exp() * (t - s)).sum(-1)
        if missing is MissingProbabilityHandling.SYMMETRIC_UNIFORM:
            support = torch.ones_like(ids, dtype=torch.bool)
            log_t_missing = _clamped(torch.log1p(-t.exp().sum(-1).clamp(max=1.0)), eps)
            log_s_missing = _clamped(log_mass_outside(log_q, ids, support, safe_logsumexp(s)).squeeze(-1), eps)
            loss = loss + log_t_missing.exp() * (log_t_missing - log_s_missing)
        return loss.to(dtype)

    per_token = chunked_rows(row_fn, logits.reshape(rows, vocab), target_ids.reshape(rows, top_k),
                             target_values.detach().reshape(rows, top_k))
    if mask is not None:
        # A masked-out token counts for nothing, even where its terms are not finite.
        weight = mask.reshape(rows).to(per_token.dtype)
        per_token = torch.where(weight != 0, per_token * weight, torch.zeros((), dtype=per_token.dtype,
                                                                              device=per_token.device))
    return per_token.sum().to(logits.dtype)
