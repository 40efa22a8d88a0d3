"""The (R, k + 1) bucket math of the sparse_kd family, shared by every backend: from the per-row
statistics of the student's full row (max, log-sum-exp, log of the mass outside the support) and
the k support logits, the bucket log-probabilities, and the per-row coefficients of the gradient
off the support. All of it works on (R, k) tensors: the (R, V) passes are the backends' kernels.
Formulas: sparse/torch.py.
"""

import math

import torch

from ... import divergences
from .contract import TAIL_FLOOR


def tvd_factors(lq, lp):
    """½·sign(Q_b − P_b) − aux per bucket (R, B), aux = ½·Σ sign·Q, written as sums over the
    buckets of the other sign (Σ Q = 1): a student sure of one token has ½ − aux ≈ 0, which the
    difference would leave as fp32 rounding of 1."""
    sign = torch.sign(lq - lp).nan_to_num_(0.0)  # both -inf: an empty bucket, sign 0
    q = lq.exp()
    q_pos, q_neg, q_zero = ((q * (sign == v)).sum(-1, keepdim=True) for v in (1.0, -1.0, 0.0))
    return torch.where(sign > 0, q_neg + 0.5 * q_zero, torch.where(sign < 0, -(q_pos + 0.5 * q_zero),
                                                                   0.5 * (q_neg - q_pos)))


def bucket_grad(spec, lq, lp, aux):
    """∂L/∂(bucket's scaled student logit) for single-token buckets: (R, B)."""
    if spec.name == "tvd":
        return lq.exp() * tvd_factors(lq, lp)
    return divergences.grad_scaled_student(spec, lq, lp, aux)


def tail_buckets(spec, teacher_log, s_support, row_max, log_sum, log_q_tail):
    """Bucket log-probs (lp, lq) (R, k + 1) of the tail mode: the k support entries, then the tail.

    teacher_log: (R, k) teacher log-probs / T, -inf where absent; s_support: (R, k) student logits
    / T at the support, -inf where absent; row_max, log_sum: (R,) of the whole student row / T;
    log_q_tail: (R,) log Σ_{i∉S} q_i (-inf where nothing is outside the support).
    """
    floor = TAIL_FLOOR if spec.name == "reverse_kl" else 0.0
    p_tail = (1 - teacher_log.exp().sum(-1)).clamp(min=floor)
    # No student mass outside the support (k = V, or -inf logits there): the tail bucket does
    # not exist, and the teacher's leftover is rounding; keeping it would make forward KL inf.
    p_tail = torch.where(log_q_tail > -math.inf, p_tail, 0.0)
    lp = torch.cat([teacher_log, p_tail.log()[:, None]], 1)
    lq = torch.cat([(s_support - row_max[:, None]) - log_sum[:, None], log_q_tail[:, None]], 1)
    return lp, lq


def tail_coefficients(spec, lq, lp, loss, aux):
    """(factor, shift) (R,): off the support ∂L/∂s_i = factor·q_i − exp(log q_i + shift).

    forward_kl: factor 1, shift log P_t − log Q_t (in log space: P_t/Q_t may overflow); the others:
    factor = the tail bucket's q-factor, shift -inf. Rows without a tail bucket: 0 and -inf.
    """
    lq_t, lp_t = lq[:, -1], lp[:, -1]
    has_tail = lq_t > -math.inf
    no_shift = torch.full_like(lq_t, -math.inf)
    if spec.name == "forward_kl":
        return has_tail.to(lq.dtype), torch.where(has_tail, lp_t - lq_t, no_shift)
    if spec.name == "reverse_kl":
        factor = lq_t - lp_t - loss
    elif spec.name == "tvd":
        factor = tvd_factors(lq, lp)[:, -1]
    elif spec.name == "jsd":
        lm_t = torch.logaddexp(lp_t + spec.log_param, lq_t + spec.log1m_param)
        factor = (1 - spec.param) * (lq_t - lm_t - aux)
    else:
        raise AssertionError(spec.name)
    return torch.where(has_tail, factor, 0.0), no_shift
