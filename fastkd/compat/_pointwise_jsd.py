"""The generalized JSD term by term on given log-probabilities, with nothing renormalised.

Liger's ``LigerJSD`` and TRL GOLD's ``logits_are_probs`` path define their losses this way: for
log-probabilities X (student) and Y (teacher) and P = exp(Y), Q = exp(X),

    beta = 0   P·(Y − X)
    beta = 1   Q·(X − Y)
    otherwise  beta·P·(Y − log M) + (1 − beta)·Q·(X − log M),   M = beta·P + (1 − beta)·Q

element by element. Differentiating these terms with respect to each X on its own is the
gradient both peers define (no softmax projection).
"""

import math

import torch


def weighted(weight, value):
    """weight·value, 0 where weight is 0 (0·log 0 = 0); the inner where keeps ±inf out of the
    product, so its gradient has no 0·inf either."""
    zero = torch.zeros((), dtype=value.dtype, device=value.device)
    nonzero = weight > 0
    return torch.where(nonzero, weight * torch.where(nonzero, value, zero), zero)


def safe_logaddexp(a, b):
    """logaddexp with -inf where both are -inf and a finite gradient there (torch.logaddexp's
    backward gives NaN at (-inf, -inf) even under a zero upstream gradient)."""
    both = (a == -math.inf) & (b == -math.inf)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    inner = torch.logaddexp(torch.where(both, zero, a), torch.where(both, zero, b))
    return torch.where(both, torch.full((), -math.inf, dtype=a.dtype, device=a.device), inner)


def pointwise_jsd_terms(log_q, log_p, beta):
    """log_q, log_p: (…, V) in the compute dtype; beta: a number in [0, 1]. Returns (…, V)."""
    q, p = log_q.exp(), log_p.exp()
    if beta == 0:
        return weighted(p, log_p - log_q)
    if beta == 1:
        return weighted(q, log_q - log_p)
    log_m = safe_logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * weighted(p, log_p - log_m) + (1 - beta) * weighted(q, log_q - log_m)
