"""Drop-ins for Liger-Kernel 0.8.5's fused-linear losses of ``liger_kernel.transformers``
(Liger not needed): ``LigerFusedLinearJSD`` / ``liger_fused_linear_jsd`` and
``LigerFusedLinearKLDivLoss`` / ``liger_fused_linear_kl_div``.

LigerFusedLinearJSD: student logits x = student_input @ student_weight.T, teacher logits
t = teacher_input @ teacher_weight.T (the same V), q = softmax(x / T), p = softmax(t / T); per
token JSD_beta (beta·KL(p ‖ M) + (1 − beta)·KL(q ‖ M), M = beta·p + (1 − beta)·q; beta = 0 / 1
exactly forward / reverse KL), summed over the tokens whose shift label is not ``ignore_index``
and divided by their number (all tokens without labels; none: 0). No T², no bias. The loss is
float32. It runs fused: ``fastkd.fused_linear_kd_loss(divergence="jsd")``.

LigerFusedLinearKLDivLoss: logits x = student_input @ student_weight.T and a given target
distribution Q (BT, V); per token Σ_v Q_v·(log max(Q_v, eps) − log softmax(x / T)_v) — the
temperature applies to the student only, Q is used as given (not renormalised) — and
``reduction``: 'batchmean' / the number of non-ignored tokens, 'mean' / (that number · V), 'sum'
(none non-ignored: 0). The gradient is that of this formula with respect to the student (Liger:
−(Q − softmax(x / T)·ΣQ) / T per row, scaled). The loss is float32.

``accum_dtype`` (None or a float dtype) is the dtype the weight gradient is accumulated in, as in
Liger, for LigerFusedLinearKLDivLoss. LigerFusedLinearJSD accepts it but fastkd's fused op
accumulates in the weight's dtype, rounding once per block of about 2k tokens.

Deliberate differences: temperature must be > 0 (Liger only asserts ≠ 0); a zero target entry
contributes 0 even against a −inf student logit (Liger: 0·inf = NaN); the non-ignored count is
not read on the host (Liger calls ``.item()``); inputs may have any leading shape (…, H) with
labels of as many elements. LigerFusedLinearKLDivLoss runs on the token-chunked path of
``_chunked_linear`` (a GEMM per block, its loss in PyTorch), since fastkd's fused ops take a teacher
as hidden states or top-k log-probs, not as a dense probability tensor.
"""

import math

import torch
from torch import nn

from .. import validation
from ..functional import fused_linear_kd_loss
from ._chunked_linear import chunked_linear_loss
from .liger_jsd import check_shift_labels

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python number; got {type(temperature).__name__}")
    if temperature == 0:
        raise ValueError("temperature cannot be 0")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number > 0; got {temperature}")


def _check_accum_dtype(accum_dtype):
    if accum_dtype is not None and accum_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"accum_dtype must be None or a floating-point torch.dtype; got {accum_dtype!r}")


def liger_fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight, shift_labels=None,
                           jsd_beta: float = 0.5, ignore_index: int = -100, temperature: float = 1.0,
                           accum_dtype=None):
    """student_input: (BT, H); student_weight: (V, H); teacher_input: (BT, H'); teacher_weight:
    (V, H'); shift_labels: (BT,) or None. Returns the 0-d float32 loss (float64 for float64)."""
    _check_temperature(temperature)
    _check_accum_dtype(accum_dtype)
    for name, weight in (("student_weight", student_weight), ("teacher_weight", teacher_weight)):
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"{name} must be a 2-D (V, H) tensor")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"teacher_weight has V={teacher_weight.shape[0]} rows but student_weight has "
                         f"V={student_weight.shape[0]}; LigerFusedLinearJSD compares the same vocabulary")
    validation.check_logits("student_input", student_input)
    rows = student_input.numel() // student_input.shape[-1]
    labels = check_shift_labels(shift_labels, rows, student_input.device)
    if labels is not None:
        labels = labels.reshape(student_input.shape[:-1])
    return fused_linear_kd_loss(student_input, student_weight, teacher_input, teacher_weight, labels,
                                divergence="jsd", beta=jsd_beta, temperature=temperature,
                                ignore_index=ignore_index, reduction="mean")


class LigerFusedLinearJSD(nn.Module):
    """Liger's fused linear + generalized JSD module; see the module docstring."""

    def __init__(self, jsd_beta=0.5, ignore_index=-100, temperature=1.0, accum_dtype=None):
        super().__init__()
        _check_temperature(temperature)
        self.jsd_beta = jsd_beta
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.accum_dtype = accum_dtype

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, shift_labels):
        return liger_fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight, shift_labels,
                                      self.jsd_beta, self.ignore_index, self.temperature, self.accum_dtype)


_KL_REDUCTIONS = ("batchmean", "mean", "sum")


def liger_fused_linear_kl_div(student_input, student_weight, target, shift_labels=None, reduction: str = "batchmean",
                              ignore_index: int = -100, temperature: float = 1.0, eps: float = 1e-10,
                              accum_dtype=None):
    """student_input: (BT, H); student_weight: (V, H); target: (BT, V) probabilities; shift_labels:
    (BT,) or None. Returns the 0-d float32 loss (float64 for float64 inputs)."""
    if reduction not in _KL_REDUCTIONS:
        raise ValueError(f"reduction must be one of ('batchmean', 'mean', 'sum'), got {reduction!r}; "
                         "'none' is not supported by the fused loss")
    _check_temperature(temperature)
    _check_accum_dtype(accum_dtype)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number ≥ 0; got {eps!r}")
    validation.check_linear("student_input", student_input, "student_weight", student_weight, "student_bias", None)
    validation.check_float_tensor("target", target)
    hidden = student_input.reshape(-1, student_input.shape[-1])
    rows, vocab = hidden.shape[0], student_weight.shape[0]
    if tuple(target.shape) != (rows, vocab) and target.shape != (*student_input.shape[:-1], vocab):
        raise ValueError(f"target must have shape (BT, V) = ({rows}, {vocab}); got {tuple(target.shape)}")
    if target.device != student_input.device:
        raise ValueError(f"target is on {target.device} but student_input is on {student_input.device}")
    labels = check_shift_labels(shift_labels, rows, student_input.device)

    dtype = torch.float64 if torch.float64 in (student_input.dtype, target.dtype) else torch.float32
    count = torch.tensor(rows, device=hidden.device) if labels is None else (labels != ignore_index).sum()
    divisor = {"batchmean": count, "mean": count * vocab, "sum": torch.ones_like(count)}[reduction]
    # No non-ignored token: the loss and its gradient are 0, whatever the reduction.
    scale = torch.where(count > 0, 1 / divisor.clamp(min=1).to(dtype), torch.zeros((), dtype=dtype,
                                                                                    device=hidden.device))

    def block_loss(logits, target_block, labels_block):
        log_s = torch.log_softmax(logits / temperature, -1)
        q = target_block.to(dtype)
        nonzero = q != 0
        value = torch.where(nonzero, torch.log(q.clamp(min=eps)) - log_s, torch.zeros((), dtype=dtype,
                                                                                         device=q.device))
        rows_loss = (q * value).sum(-1)
        if labels_block is not None:
            rows_loss = torch.where(labels_block != ignore_index, rows_loss, torch.zeros_like(rows_loss))
        return ((rows_loss * scale).sum(),)

    (loss,) = chunked_linear_loss(block_loss, hidden, student_weight, None, target.reshape(rows, vocab), labels,
                                  accum_dtype=accum_dtype)
    return loss


class LigerFusedLinearKLDivLoss(nn.Module):
    """Liger's fused linear + KL(target ‖ student) module; see the module docstring."""

    def __init__(self, reduction="batchmean", ignore_index=-100, temperature=1.0, eps=1e-10, accum_dtype=None):
        super().__init__()
        _check_temperature(temperature)
        self.reduction = reduction
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.eps = eps
        self.accum_dtype = accum_dtype

    def forward(self, student_input, student_weight, target, shift_labels=None):
        return liger_fused_linear_kl_div(student_input, student_weight, target, shift_labels, self.reduction,
                                         self.ignore_index, self.temperature, self.eps, self.accum_dtype)

    def extra_repr(self):
        return (f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"temperature={self.temperature}, eps={self.eps}, accum_dtype={self.accum_dtype}")
