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
    dkd (labels)      alpha·TCKD + beta·NCKD (decoupled KD, Zhao et al. 2022): with y the target
                      class of the row, TCKD = KL([p_y, 1−p_y] ‖ [q_y, 1−q_y]) and NCKD = KL(p̂ ‖ q̂)
                      over the other classes renormalised, p̂_j = p_j/(1−p_y), q̂_j = q_j/(1−q_y).

The logits of each side may first be transformed (fastkd/logit_transforms.py): a scale, a
soft-cap c·tanh(x/c), and row standardisation; T divides the result.

Every gradient with respect to the scaled student logits s = student / T has the form

    ∂L/∂s_j = q_j · (g_j − aux)    (forward_kl: q_j − p_j)

where g_j is an element-wise term and ``aux`` one per-row constant computed in the forward pass
(dkd: ∂L/∂s_y = alpha·aux, ∂L/∂s_j = q̂_j·(beta − alpha·aux) − beta·p̂_j elsewhere, aux = q_y − p_y).
The functions below define ``loss``, ``aux`` and the gradient once, in log space, on any float
dtype; the torch backend runs them on row chunks and the Triton/C++ kernels mirror them.
"""

import math
from dataclasses import dataclass

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
# Divergences that need each row's target class (labels).
LABELED_DIVERGENCES = ("dkd",)

# Divergences whose forward needs the normalised probabilities, hence two passes over the row.
MIXTURE_DIVERGENCES = ("jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")

# The documented defaults of the parameters that mean different things per divergence.
JSD_BETA = 0.5
DKD_ALPHA, DKD_BETA = 1.0, 8.0  # mdistiller's CIFAR-100 setting


@dataclass(frozen=True)
class DivergenceSpec:
    """One divergence with its parameters and the logit transforms, as it travels from the public
    API to a kernel.

    ``param`` is beta for ``jsd`` and ``dkd``, the skew for ``skew_*``, 0 otherwise; ``alpha`` is
    dkd's TCKD weight. Per side, the logits are scaled, then soft-capped (``softcap`` > 0), then
    standardised per row (``standardize``), then divided by the temperature.
    """

    name: str
    temperature: float = 1.0
    param: float = 0.0
    alpha: float = 0.0
    student_scale: float = 1.0
    student_softcap: float = 0.0
    teacher_scale: float = 1.0
    teacher_softcap: float = 0.0
    standardize: bool = False
    standardize_eps: float = 1e-7

    @property
    def inv_temperature(self):
        return 1.0 / self.temperature

    @property
    def log_param(self):
        return math.log(self.param) if self.param > 0 else -math.inf

    @property
    def log1m_param(self):
        return math.log1p(-self.param) if self.param < 1 else -math.inf

    @property
    def transforms_logits(self):
        return (self.student_scale != 1.0 or self.teacher_scale != 1.0 or self.student_softcap > 0
                or self.teacher_softcap > 0 or self.standardize)

    @property
    def features(self):
        """What a kernel must support to compute this spec (the registry's row features)."""
        wanted = set()
        if self.name in LABELED_DIVERGENCES:
            wanted.add(self.name)
        if self.student_scale != 1.0 or self.teacher_scale != 1.0:
            wanted.add("logit_scale")
        if self.student_softcap > 0 or self.teacher_softcap > 0:
            wanted.add("softcap")
        if self.standardize:
            wanted.add("standardize")
        return frozenset(wanted)


def _check_real(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number; got {type(value).__name__}")
    return float(value)


def _check_positive(name, value):
    value = _check_real(name, value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value}")
    return value


def _check_positive_or_none(name, value):
    if value is None:
        return None
    value = _check_real(name, value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, or None; got {value}")
    return value


def make_spec(divergence, temperature=1.0, beta=None, skew=0.1, *, alpha=None, student_logit_scale=None,
              student_softcap=None, teacher_logit_scale=None, teacher_softcap=None, standardize=False,
              standardize_eps=1e-7):
    """Validates the divergence options and returns the spec the kernels consume. ``beta=None``
    and ``alpha=None`` take the divergence's documented default (JSD 0.5; DKD alpha 1, beta 8)."""
    if not isinstance(divergence, str) or divergence not in DIVERGENCES + LABELED_DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES + LABELED_DIVERGENCES)}; "
                         f"got {divergence!r}")
    temperature = _check_real("temperature", temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0; got {temperature}")
    skew = _check_real("skew", skew)
    if not 0.0 < skew < 1.0:
        raise ValueError(f"skew must lie in the open interval (0, 1); got {skew}")
    transforms = dict(
        student_scale=_check_positive_or_none("student_logit_scale", student_logit_scale) or 1.0,
        student_softcap=_check_positive_or_none("student_softcap", student_softcap) or 0.0,
        teacher_scale=_check_positive_or_none("teacher_logit_scale", teacher_logit_scale) or 1.0,
        teacher_softcap=_check_positive_or_none("teacher_softcap", teacher_softcap) or 0.0,
        standardize=_check_flag("standardize", standardize),
        standardize_eps=_check_positive("standardize_eps", standardize_eps))

    if divergence == "dkd":
        alpha = DKD_ALPHA if alpha is None else _check_real("alpha", alpha)
        beta = DKD_BETA if beta is None else _check_real("beta", beta)
        if not (math.isfinite(alpha) and math.isfinite(beta) and alpha >= 0 and beta >= 0):
            raise ValueError(f"dkd's alpha and beta must be finite and ≥ 0; got alpha={alpha}, beta={beta}")
        return DivergenceSpec("dkd", temperature, beta, alpha, **transforms)
    if alpha is not None:
        raise ValueError(f"alpha is dkd's TCKD weight; divergence={divergence!r} takes no alpha")
    beta = JSD_BETA if beta is None else _check_real("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1]; got {beta}")
    if divergence == "jsd":
        # TRL and Liger special-case the end points: exactly forward / reverse KL (not the limit 0).
        if beta == 0.0:
            return DivergenceSpec("forward_kl", temperature, **transforms)
        if beta == 1.0:
            return DivergenceSpec("reverse_kl", temperature, **transforms)
        return DivergenceSpec("jsd", temperature, beta, **transforms)
    if divergence in ("skew_forward_kl", "skew_reverse_kl"):
        return DivergenceSpec(divergence, temperature, skew, **transforms)
    return DivergenceSpec(divergence, temperature, **transforms)


def _check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


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


def kl_and_grad_on_buckets(name, log_p, log_q):
    """KL per row over buckets (a sparse teacher's top-k entries, and its tail) and the gradient
    with respect to the buckets' student log-masses through a softmax over the buckets:
    forward_kl: L = Σ_b p_b (log p_b − log q_b), ∂L/∂s_b = q_b − p_b; reverse_kl:
    L = Σ_b q_b (log q_b − log p_b), ∂L/∂s_b = q_b (log q_b − log p_b − L). Returns (L (R,), (R, B))."""
    p, q = log_p.exp(), log_q.exp()
    if name == "forward_kl":
        loss = safe_weighted(p, log_p - log_q).sum(-1)
        return loss, q - p
    loss = safe_weighted(q, log_q - log_p).sum(-1)
    return loss, safe_weighted(q, log_q - log_p - loss[:, None])


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


# ----------------------------------------------------------------------------------------------
# dkd: the target class y of each row splits the distribution in two (decoupled KD).
#
# Written to touch the (R, V) data as few times as eager PyTorch allows (docs/perf-notes.md,
# 2026-12-06): per side one shifted copy and one exp; TCKD comes from O(R) numbers (the target's
# logit and the non-target log-sum-exp), NCKD from the unnormalised exps and one row sum; the
# normalisers exp(−log Σ) ride on per-row weights instead of full-size divisions.
# ----------------------------------------------------------------------------------------------


def dkd_side(x, target, new=_fresh):
    """One side's part of the dkd forward. x: (R, V) scaled logits, overwritten (the caller's
    scratch copy); target: (R,) int64 in [0, V).

    Returns (x − m with the target at −inf (x itself), its exp (R, V), m (R,), log Σ_{j≠y} exp(x_j − m)
    (R,), x_y − m (R,)) where m = max_{j≠y} x_j: everything relative to the non-target max, so
    that ±1e4 logits keep their precision."""
    target_logit = x.gather(1, target[:, None])[:, 0]
    x.scatter_(1, target[:, None], -math.inf)
    row_max = x.amax(dim=-1)
    x.sub_(row_max[:, None])
    exps = torch.exp(x, out=new(x))
    return x, exps, row_max, exps.sum(-1).log_(), target_logit - row_max


def _binary_kl(log_a, log_b):
    return torch.where(log_a > -math.inf, log_a.exp() * (log_a - log_b), torch.zeros_like(log_a))


def _target_and_rest(log_sum, target_shifted):
    """log of the target's probability and of the non-target mass, from O(R) numbers."""
    log_all = torch.logaddexp(log_sum, target_shifted)
    return target_shifted - log_all, log_sum - log_all


def dkd_loss_and_aux(spec, student_side, teacher_side, new=_fresh):
    """alpha·TCKD + beta·NCKD per row, and aux = q_y − p_y. Sides as ``dkd_side`` returns them.

    NCKD = Σ_{j≠y} p̂_j·(log p̂_j − log q̂_j) with log p̂ = t − log_sum_t, log q̂ = s − log_sum_s
    (t, s shifted), so NCKD = exp(−log_sum_t)·Σ_j e^t_j·(t_j − s_j) − log_sum_t + log_sum_s.
    """
    s, _, _, log_sum_s, s_target = student_side
    t, exps_t, _, log_sum_t, t_target = teacher_side
    log_q_y, log_q_rest = _target_and_rest(log_sum_s, s_target)
    log_p_y, log_p_rest = _target_and_rest(log_sum_t, t_target)
    tckd = _binary_kl(log_p_y, log_q_y) + _binary_kl(log_p_rest, log_q_rest)
    # nansum drops exactly the terms that are 0 by convention: 0·((−inf) − (−inf)) at the target
    # and 0·(−inf) where the teacher has no mass. A NaN logit still makes the row NaN: it reaches
    # the max, hence log_sum.
    weighted = torch.sub(t, s, out=new(t)).mul_(exps_t).nansum(-1)
    nckd = weighted * torch.exp(-log_sum_t) - log_sum_t + log_sum_s
    return spec.alpha * tckd + spec.param * nckd, log_q_y.exp() - log_p_y.exp()


def dkd_grad_scaled_student(spec, exps_s, exps_t, log_sum_s, log_sum_t, aux, target, row_scale, out):
    """row_scale · ∂L_row/∂s into ``out`` (R, V): q̂_j·(beta − alpha·aux) − beta·p̂_j off the target,
    alpha·aux at it. exps_*: exp(x − max) with 0 at the target (unnormalised: q̂ = exps_s·exp(−log_sum_s));
    row_scale (R,): NaN for a row makes the whole row NaN."""
    weight_q = (spec.param - spec.alpha * aux) * row_scale * torch.exp(-log_sum_s)
    weight_p = (-spec.param) * row_scale * torch.exp(-log_sum_t)
    torch.mul(exps_s, weight_q[:, None], out=out).addcmul_(exps_t, weight_p[:, None])
    return out.scatter_(1, target[:, None], (spec.alpha * aux * row_scale)[:, None].to(out.dtype))
