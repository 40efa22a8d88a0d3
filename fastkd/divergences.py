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
#
# Every (R, V) temporary comes from ``new(like, dtype=None)``: a fresh tensor by default, or a
# buffer of a reused workspace (kernels/torch_scratch.py), so that a chunked caller allocates
# nothing per chunk (on the CPU each fresh multi-MiB block costs page faults, which dominated).
# ----------------------------------------------------------------------------------------------


def _fresh(like, dtype=None):
    return torch.empty_like(like, dtype=dtype)


def log_softmax_parts(x, new=_fresh):
    """Row max and log Σ exp(x − max) of scaled logits x: (R, V) → two (R,) tensors."""
    row_max = x.amax(dim=-1)
    shifted = torch.sub(x, row_max[:, None], out=new(x))
    return row_max, shifted.exp_().sum(-1).log_()


def log_probs(x, row_max, log_sum, new=_fresh):
    """(x − max) − log Σ exp(x − max): (R, V)."""
    return torch.sub(x, row_max[:, None], out=new(x)).sub_(log_sum[:, None])


def log_probs_and_parts(x, new=_fresh):
    """(log-probabilities (R, V), row max (R,), log Σ exp(x − max) (R,)) of x in one fused
    log_softmax: x − max has its maximum at exactly 0, so log_softmax's x − (max + log Σ) is the
    two-step (x − max) − log Σ here, and log Σ is minus the largest log-probability."""
    row_max = x.amax(dim=-1)
    shifted = torch.sub(x, row_max[:, None], out=new(x))
    lq = torch.log_softmax(shifted, -1, out=new(x))
    return lq, row_max, lq.amax(dim=-1).neg_()


def safe_weighted(weight, value, new=_fresh):
    """weight · value, with 0 wherever weight is 0 (so 0·inf = 0, the 0·log 0 convention)."""
    product = torch.mul(weight, value, out=new(value))
    return product.masked_fill_(torch.eq(weight, 0, out=new(weight, torch.bool)), 0.0)


def _kl_terms(a, log_a, log_b, new):
    """a·(log a − log b) element-wise, 0 where a is 0."""
    return safe_weighted(a, torch.sub(log_a, log_b, out=new(log_a)), new)


def _q_p_over_m(lq, lp, lm, new):
    """q·p/M computed in log space; 0 where q or p is exactly 0."""
    ratio = torch.add(lq, lp, out=new(lq)).sub_(lm).exp_()
    either_zero = torch.logical_or(torch.isneginf(lq, out=new(lq, torch.bool)),
                                   torch.isneginf(lp, out=new(lp, torch.bool)), out=new(lq, torch.bool))
    return ratio.masked_fill_(either_zero, 0.0)


def _mixture_log(spec, lp, lq, new):
    """log M for the mixture divergences."""
    if spec.name in ("jsd", "skew_forward_kl"):  # M = param·p + (1−param)·q
        first, second = lp, lq
    elif spec.name == "skew_reverse_kl":  # M = a·q + (1−a)·p
        first, second = lq, lp
    else:
        raise AssertionError(spec.name)
    return torch.logaddexp(torch.add(first, spec.log_param, out=new(first)),
                           torch.add(second, spec.log1m_param, out=new(second)), out=new(first))


def row_loss_and_aux(spec, lq, lp, new=_fresh):
    """Per-row loss L and the per-row constant ``aux`` of the gradient. Returns two (R,) tensors."""
    q, p = torch.exp(lq, out=new(lq)), torch.exp(lp, out=new(lp))
    name = spec.name
    if name == "forward_kl":
        loss = _kl_terms(p, lp, lq, new).sum(-1)
        return loss, torch.zeros_like(loss)
    if name == "reverse_kl":
        loss = _kl_terms(q, lq, lp, new).sum(-1)
        return loss, loss
    if name == "tvd":
        difference = torch.sub(q, p, out=new(q))
        loss = 0.5 * torch.abs(difference, out=new(q)).sum(-1)
        aux = 0.5 * difference.sign_().mul_(q).sum(-1)
        return loss, aux
    lm = _mixture_log(spec, lp, lq, new)
    if name == "jsd":
        kl_q_m = _kl_terms(q, lq, lm, new).sum(-1)
        loss = spec.param * _kl_terms(p, lp, lm, new).sum(-1) + (1 - spec.param) * kl_q_m
        return loss, kl_q_m
    q_p_over_m = _q_p_over_m(lq, lp, lm, new).sum(-1)
    if name == "skew_forward_kl":
        return _kl_terms(p, lp, lm, new).sum(-1), q_p_over_m
    # skew_reverse_kl
    loss = _kl_terms(q, lq, lm, new).sum(-1)
    return loss, loss + (1 - spec.param) * q_p_over_m


def grad_scaled_student(spec, lq, lp, aux, new=_fresh):
    """∂L_row/∂s for every element: (R, V) in the compute dtype."""
    q = torch.exp(lq, out=new(lq))
    aux = aux[:, None]
    name = spec.name
    if name == "forward_kl":
        return q.sub_(torch.exp(lp, out=new(lp)))
    if name == "reverse_kl":
        return safe_weighted(q, torch.sub(lq, lp, out=new(lq)).sub_(aux), new)
    if name == "tvd":
        sign = torch.sub(q, torch.exp(lp, out=new(lp)), out=new(q)).sign_()
        return sign.mul_(0.5).sub_(aux).mul_(q)
    lm = _mixture_log(spec, lp, lq, new)
    if name == "jsd":
        return safe_weighted(q, torch.sub(lq, lm, out=new(lq)).sub_(aux), new).mul_(1 - spec.param)
    q_p_over_m = _q_p_over_m(lq, lp, lm, new)
    if name == "skew_forward_kl":
        return q.mul_(aux).sub_(q_p_over_m).mul_(1 - spec.param)
    # skew_reverse_kl
    grad = safe_weighted(q, torch.sub(lq, lm, out=new(lq)).sub_(aux), new)
    return grad.add_(q_p_over_m.mul_(1 - spec.param))
