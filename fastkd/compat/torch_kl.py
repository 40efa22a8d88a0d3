"""Drop-in for ``torch.nn.KLDivLoss`` / ``torch.nn.functional.kl_div`` (log-probability input).

Same signature, reductions ('none', 'batchmean', 'sum', 'mean'), ``log_target`` and legacy
``size_average`` / ``reduce`` arguments. The reducing forms run fused kernels (no (N, V)
temporary in the forward); 'none' (whose output is (N, V) anyway), broadcasting shapes and
targets that require grad and 0-d tensors are handed to PyTorch's own implementation, which
defines them. A negative target probability gives NaN, as in PyTorch. One deliberate difference:
a zero target probability contributes 0 even where the input is -inf, where PyTorch returns NaN
(0·-inf).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .. import validation
from ..kernels import registry
from ..kernels.layout import as_rows
from ..ops import kl_div_rows
from ..options import KLDivOptions

_REDUCTIONS = ("none", "batchmean", "sum", "mean")


def kl_div(input, target, size_average=None, reduce=None, reduction="mean", log_target=False):
    """input: (…, V) log-probabilities; target: (…, V) probabilities (log-probabilities if
    ``log_target``). Pointwise target·(log target − input), reduced as torch.nn.functional.kl_div."""
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, _REDUCTIONS))}; got {reduction!r}")
    validation.check_float_tensor("input", input)
    validation.check_float_tensor("target", target)
    validation.check_flag("log_target", log_target)
    fused = (reduction != "none" and input.shape == target.shape and input.device == target.device
             and not target.requires_grad and input.dim() >= 1 and input.shape[-1] > 0)
    if not fused:
        return F.kl_div(input, target, reduction=reduction, log_target=log_target)

    backend = registry.select("kl_div", "auto", input.device, (input.dtype, target.dtype))
    total = kl_div_rows(as_rows(input), as_rows(target), KLDivOptions(log_target, backend)).sum()
    if reduction == "mean":
        total = total / input.numel()
    elif reduction == "batchmean":
        total = total / input.shape[0]
    return total.to(torch.result_type(input, target))


class KLDivLoss(nn.KLDivLoss):
    """``torch.nn.KLDivLoss`` with the fused forward; an instance of the original class too."""

    def forward(self, input, target):
        return kl_div(input, target, reduction=self.reduction, log_target=self.log_target)
