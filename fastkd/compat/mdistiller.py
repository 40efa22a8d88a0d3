"""Drop-ins for the logit losses of mdistiller (megvii-research/mdistiller, ``distillers/KD.py`` and
``distillers/DKD.py``) and of the logit-standardisation code built on it (Sun et al., CVPR 2024,
which adds the ``logit_stand`` argument); neither library is needed.

    kd_loss(logits_student, logits_teacher, temperature, logit_stand=False)
        T² · mean_i KL(p_i ‖ q_i),  p = softmax(z_t / T), q = softmax(z_s / T)
    dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature, logit_stand=False)
        T² · mean_i [alpha · TCKD_i + beta · NCKD_i]
        TCKD = KL([p_y, 1 − p_y] ‖ [q_y, 1 − q_y]),  y = target_i
        NCKD = Σ_{j≠y} p̂_j (log p̂_j − log q̂_j),  p̂_j = p_j / (1 − p_y),  q̂_j = q_j / (1 − q_y)

With ``logit_stand`` each row z of both sides is first replaced by (z − mean z) / (std z + 1e-7),
std the sample standard deviation (divisor C − 1), as the reference's ``normalize`` does; a
constant row becomes zeros, and the std's derivative there is taken as 0, as torch.std's is. Logits
are (B, C), the softmax over dim 1, the mean over the B rows, as in the reference; they run
through :func:`fastkd.kd_loss` (divergence "forward_kl" or "dkd", ``temperature_squared=True``).

Differences from the reference code:

* NCKD. The reference drops the target from the non-target softmaxes by subtracting 1000 from its
  logit / T; fastkd excludes it exactly. The reference's target then keeps a share of at most
  exp(g − 1000) of the non-target mass, g = (z_y − max_{j≠y} z_j) / T, which is below float32
  rounding (2⁻²⁴ ≈ e^−16.6) unless g > 983 and below float64 rounding unless g > 963. Under
  ``logit_stand`` a z-score is at most (C − 1)/√C in size (≈ 148 at C = 21843), so g < 300/T and
  the two agree to rounding; without it they differ only for logits that far apart.
* TCKD. The reference takes the log of the summed probabilities in the logits' dtype: once the
  target takes all the float32 mass (every non-target probability below 1e-45: a target logit
  more than 103·T above all others) it returns inf or NaN. fastkd computes both masses from
  log-sum-exps in float32 (float64 for float64 logits) and stays finite; float16/bfloat16 logits
  are not rounded through a half-precision softmax either. The loss is returned in the logits'
  dtype, as the reference's.
* Targets: a target equal to -100 makes its row count for nothing, and the mean is over the
  other rows (the reference raises); a target outside [0, C) gives that row a NaN loss instead of
  an index error (no host synchronisation).
"""

import torch

from .. import functional, validation


def _check_logits_pair(logits_student, logits_teacher):
    validation.check_logits("logits_student", logits_student)
    validation.check_logits("logits_teacher", logits_teacher)
    if logits_student.dim() != 2:
        raise ValueError(f"logits_student must be (B, C), the softmax over dim 1 as in mdistiller; "
                         f"got shape {tuple(logits_student.shape)}")
    validation.check_pair("logits_student", logits_student, "logits_teacher", logits_teacher)


def _check_target(target, logits_student):
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor; got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor (e.g. torch.long); got {target.dtype}")
    if target.shape != logits_student.shape[:1]:
        raise ValueError(f"target must be (B,) = {tuple(logits_student.shape[:1])}, one class per row; "
                         f"got {tuple(target.shape)}")


def _in_logits_dtype(loss, logits_student, logits_teacher):
    return loss.to(torch.result_type(logits_student, logits_teacher))


def kd_loss(logits_student, logits_teacher, temperature, logit_stand=False):
    """mdistiller's ``kd_loss``: logits_student, logits_teacher (B, C) float; temperature a number
    > 0. Returns T² · the mean over rows of KL(softmax(z_t/T) ‖ softmax(z_s/T)), a 0-d tensor in the
    logits' dtype; the gradient flows to logits_student."""
    _check_logits_pair(logits_student, logits_teacher)
    validation.check_flag("logit_stand", logit_stand)
    loss = functional.kd_loss(logits_student, logits_teacher, divergence="forward_kl", temperature=temperature,
                              temperature_squared=True, standardize=logit_stand)
    return _in_logits_dtype(loss, logits_student, logits_teacher)


def dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature, logit_stand=False):
    """mdistiller's ``dkd_loss``: logits (B, C) float; target (B,) int, each row's class; alpha, beta
    ≥ 0 the TCKD and NCKD weights; temperature > 0. Returns T² · the mean over rows of
    alpha·TCKD + beta·NCKD (module docstring), a 0-d tensor in the logits' dtype."""
    _check_logits_pair(logits_student, logits_teacher)
    _check_target(target, logits_student)
    validation.check_flag("logit_stand", logit_stand)
    loss = functional.kd_loss(logits_student, logits_teacher, target, divergence="dkd", alpha=alpha, beta=beta,
                              temperature=temperature, temperature_squared=True, standardize=logit_stand)
    return _in_logits_dtype(loss, logits_student, logits_teacher)
