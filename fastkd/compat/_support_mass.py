"""The student's probability mass outside a sparse teacher's support, in log space, formed so that
neither its value nor its gradient cancels in float32.

Peers write it as log(1 − Σ_support q) (TRL's tail bucket, DistillKit's missing mass). From
float32 log-probabilities that loses everything once the support holds nearly all the mass, and
its gradient loses everything once the support holds almost none (q_j/Q_tail − q_j). Here it is
log1p(−Σ_support q) while the support holds under half the mass, else the log-sum-exp of the
log-probabilities outside the support: the same number for distinct candidate ids.
"""

import math

import torch


def safe_logsumexp(x):
    """logsumexp over the last dim, keepdim; -inf with a zero (not NaN) gradient for empty rows."""
    empty = (x == -math.inf).all(-1, keepdim=True)
    out = torch.logsumexp(torch.where(empty, torch.zeros_like(x), x), -1, keepdim=True)
    return torch.where(empty, torch.full_like(out, -math.inf), out)


def log_mass_outside(log_q, ids, support, log_support):
    """log_q: (R, V) log-probabilities; ids: (R, k) candidate ids; support: (R, k) bool, the real
    candidates; log_support: (R, 1) log Σ_support q. Returns (R, 1) log(1 − Σ_support q)."""
    outside = log_q.scatter(-1, torch.where(support, ids, 0).long(), -math.inf)
    # slot 0 stood in for padded candidates: give it back its value unless it is a real candidate
    first_real = (support & (ids == 0)).any(-1, keepdim=True)
    outside[..., :1] = torch.where(first_real, outside[..., :1], log_q[..., :1])
    via_outside = safe_logsumexp(outside).to(log_support.dtype)
    half = math.log(0.5)
    via_support = torch.log1p(-torch.exp(log_support.clamp(max=half)))
    return torch.where(log_support < half, via_support, via_outside)
