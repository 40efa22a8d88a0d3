"""The catalogue of temperature-softmax divergences: names, parameters, validation, formulas.

Conventions (rows over the last dimension, ``T`` the temperature):

    p = softmax(teacher / T)     q = softmax(student / T)
    forward_kl        KL(p ‖ q)
    reverse_kl        KL(q ‖ p)
    jsd (beta)        beta·KL(p ‖ M) + (1−beta)·KL(q ‖ M),  M = beta·p + (1−beta)·q
                      (TRL's generalized_jsd_loss; beta=0 is exactly forward_kl, beta=1 reverse_kl)
    skew_forward_kl   KL(p ‖ a·p + (1−a)·q),  a = skew   (DistiLLM)
    skew_reverse_kl   KL(q ‖ a·q + (1−a)·p)
    tvd               ½·Σ|p − q|

Every gradient with respect to the scaled student logits s = student / T has the form

    ∂L/∂s_j = q_j · (g_j − aux)    (forward_kl: q_j − p_j)

where g_j is an element-wise term and ``aux`` one per-row constant computed in the forward pass.
The functions below define ``loss``, ``aux`` and the gradient once, in log space, on any float
dtype; the torch backend runs them on row chunks and the Triton/C++ kernels mirror them.
"""

import math
from dataclasses import dataclass

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")

# Divergences whose forward needs the normalised probabilities, hence two passes over the row.
MIXTURE_DIVERGENCES = ("jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


@dataclass(frozen=True)
class DivergenceSpec:
    """One divergence with its parameters, as it travels from the public API to a kernel.

    ``param`` is beta for ``jsd``, the skew for ``skew_*`` and unused (0) otherwise.
    """

    name: str
    temperature: float = 1.0
    param: float = 0.0

    @property
    def inv_temperature(self):
        return 1.0 / self.temperature

    @property
    def log_param(self):
        return math.log(self.param) if self.param > 0 else -math.inf

    @property
    def log1m_param(self):
        return math.log1p(-self.param) if self.param < 1 else -math.inf


def _check_real(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number; got {type(value).__name__}")
    return float(value)


def make_spec(divergence, temperature=1.0, beta=0.5, skew=0.1):
    """Validates the divergence options and returns the spec the kernels consume."""
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")
    temperature = _check_real("temperature", temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0; got {temperature}")
    beta = _check_real("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1]; got {beta}")
    skew = _check_real("skew", skew)
    if not 0.0 < skew < 1.0:
        raise ValueError(f"skew must lie in the open interval (0, 1); got {skew}")

    if divergence == "jsd":
        # TRL and Liger special-case the end points: exactly forward / reverse KL (not the limit 0).
        if beta == 0.0:
            return DivergenceSpec("forward_kl", temperature)
        if beta == 1.0:
            return DivergenceSpec("reverse_kl", temperature)
        return DivergenceSpec("jsd", temperature, beta)
    if divergence in ("skew_forward_kl", "skew_reverse_kl"):
        return DivergenceSpec(divergence, temperature, skew)
    return DivergenceSpec(divergence, temperature)


# ----------------------------------------------------------------------------------------------
# Formulas on a block of rows. lq, lp: (R, V) log-probabilities of student and teacher in the
# compute dtype, formed as (x − max) − log Σexp(x − max) so that large logits (±1e4) keep their
# precision. Masked (-inf) entries carry zero probability: every product p·log(...) is guarded
# so that 0·(±inf) never appears.
# ----------------------------------------------------------------------------------------------


def log_softmax_parts(x):
    """Row max and log Σ exp(x − max) of scaled logits x: (R, V) → two (R,) tensors."""
    row_max = x.amax(dim=-1)
    return row_max, (x - row_max[:, None]).exp().sum(-1).log()


def log_probs(x, row_max, log_sum):
    """(x − max) − log Σ exp(x − max): (R, V)."""
    return (x - row_max[:, None]) - log_sum[:, None]


def safe_weighted(weight, value):
    """weight · value, with 0 wherever weight is 0 (so 0·inf = 0, the 0·log 0 convention)."""
    return torch.where(weight > 0, weight * value, torch.zeros((), dtype=value.dtype, device=value.device))


def _q_p_over_m(lq, lp, lm):
    """q·p/M computed in log space; 0 where q or p is exactly 0."""
    both = (lq > -math.inf) & (lp > -math.inf)
    return torch.where(both, (lq + lp - lm).exp(), torch.zeros((), dtype=lq.dtype, device=lq.device))


def _mixture_log(spec, lp, lq):
    """log M for the mixture divergences."""
    if spec.name in ("jsd", "skew_forward_kl"):  # M = param·p + (1−param)·q
        return torch.logaddexp(lp + spec.log_param, lq + spec.log1m_param)
    if spec.name == "skew_reverse_kl":  # M = a·q + (1−a)·p
        return torch.logaddexp(lq + spec.log_param, lp + spec.log1m_param)
    raise AssertionError(spec.name)


def row_loss_and_aux(spec, lq, lp):
    """Per-row loss L and the per-row constant ``aux`` of the gradient. Returns two (R,) tensors."""
    q, p = lq.exp(), lp.exp()
    name = spec.name
    if name == "forward_kl":
        loss = safe_weighted(p, lp - lq).sum(-1)
        return loss, torch.zeros_like(loss)
    if name == "reverse_kl":
        loss = safe_weighted(q, lq - lp).sum(-1)
        return loss, loss
    if name == "tvd":
        loss = 0.5 * (p - q).abs().sum(-1)
        aux = 0.5 * (q * torch.sign(q - p)).sum(-1)
        return loss, aux
    lm = _mixture_log(spec, lp, lq)
    if name == "jsd":
        kl_q_m = safe_weighted(q, lq - lm).sum(-1)
        loss = spec.param * safe_weighted(p, lp - lm).sum(-1) + (1 - spec.param) * kl_q_m
        return loss, kl_q_m
    q_p_over_m = _q_p_over_m(lq, lp, lm)
    if name == "skew_forward_kl":
        loss = safe_weighted(p, lp - lm).sum(-1)
        return loss, q_p_over_m.sum(-1)
    # skew_reverse_kl
    loss = safe_weighted(q, lq - lm).sum(-1)
    return loss, loss + (1 - spec.param) * q_p_over_m.sum(-1)


def grad_scaled_student(spec, lq, lp, aux):
    """∂L_row/∂s for every element: (R, V) in the compute dtype."""
    q, p = lq.exp(), lp.exp()
    aux = aux[:, None]
    name = spec.name
    if name == "forward_kl":
        return q - p
    if name == "reverse_kl":
        return safe_weighted(q, lq - lp - aux)
    if name == "tvd":
        return q * (0.5 * torch.sign(q - p) - aux)
    lm = _mixture_log(spec, lp, lq)
    if name == "jsd":
        return (1 - spec.param) * safe_weighted(q, lq - lm - aux)
    q_p_over_m = _q_p_over_m(lq, lp, lm)
    if name == "skew_forward_kl":
        return (1 - spec.param) * (q * aux - q_p_over_m)
    # skew_reverse_kl
    return safe_weighted(q, lq - lm - aux) + (1 - spec.param) * q_p_over_m
