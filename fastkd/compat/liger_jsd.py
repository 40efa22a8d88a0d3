"""Drop-ins for Liger-Kernel 0.8.5's ``LigerJSD`` and ``liger_jsd`` (Liger not needed).

The inputs are log-probabilities, X = log Q (student) and Y = log P (teacher), each (BT, V), and
Liger's loss is a pointwise sum over them, divided by the number of non-ignored rows (BT without
labels; 0 rows: 0):

    beta = 0   Σ P·(Y − X)                                    (forward KL)
    beta = 1   Σ Q·(X − Y)                                    (reverse KL)
    otherwise  Σ beta·P·(Y − log M) + (1 − beta)·Q·(X − log M),  M = beta·P + (1 − beta)·Q

with P = exp(Y), Q = exp(X) taken as given: nothing renormalises them. The gradient is the
partial derivative of that sum with respect to each X entry on its own (Liger's kernel stores
−P, Q·(X − Y) + Q, (1 − beta)·Q·(X − log M)), not the gradient through a softmax; the teacher gets
none. The loss comes back in the input's dtype, as in Liger.

Deliberate differences: a term whose weight (P or Q) is 0 is 0, where Liger's kernel returns NaN
for 0·(−inf) (a −inf teacher log-prob at beta = 0, a −inf student log-prob at beta = 1, −inf in
both for a mixture); the row count is not read on the host (Liger calls ``.item()``). fastkd's
fused ops normalise their inputs with a softmax, so this runs on the row-chunked PyTorch path
(``_chunked_rows``: bounded extra memory, the gradient recomputed in the backward).
"""

import torch
from torch import nn

from .. import validation
from ._chunked_rows import chunked_rows
from ._pointwise_jsd import pointwise_jsd_terms


def _check_beta(name, beta):
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"{name} must be a Python number; got {type(beta).__name__}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1]; got {beta}")


def check_shift_labels(shift_labels, rows, device, name="shift_labels"):
    """Liger's (BT,) labels; returns them flattened, or None."""
    if shift_labels is None:
        return None
    if not isinstance(shift_labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None; got {type(shift_labels).__name__}")
    if shift_labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long); got {shift_labels.dtype}")
    if shift_labels.numel() != rows:
        raise ValueError(f"the shape of {name} must be (BT,) = ({rows},); got {tuple(shift_labels.shape)}")
    if shift_labels.device != device:
        raise ValueError(f"{name} is on {shift_labels.device} but the inputs are on {device}")
    return shift_labels.reshape(-1)


def liger_jsd(input, target, shift_labels=None, beta: float = 0.5, ignore_index: int = -100):
    """input: (BT, V) student log-probabilities (gets the gradient); target: (BT, V) teacher
    log-probabilities; shift_labels: (BT,) or None. Returns a 0-d tensor in input's dtype."""
    validation.check_logits("input", input)
    validation.check_logits("target", target)
    validation.check_pair("input", input, "target", target)
    _check_beta("beta", beta)
    validation.check_ignore_index(ignore_index)
    vocab = input.shape[-1]
    rows = input.numel() // vocab
    labels = check_shift_labels(shift_labels, rows, input.device)
    dtype = torch.float64 if torch.float64 in (input.dtype, target.dtype) else torch.float32

    def row_fn(log_q, log_p):
        return pointwise_jsd_terms(log_q.to(dtype), log_p.to(dtype), beta).sum(-1)

    row_loss = chunked_rows(row_fn, input.reshape(rows, vocab), target.detach().reshape(rows, vocab))
    if labels is None:
        return (row_loss.sum() / max(rows, 1)).to(input.dtype)
    keep = labels != ignore_index
    total = torch.where(keep, row_loss, torch.zeros((), dtype=row_loss.dtype, device=row_loss.device)).sum()
    return (total / keep.sum().clamp(min=1)).to(input.dtype)


class LigerJSD(nn.Module):
    """Liger's generalized JSD module over log-probability inputs; see the module docstring."""

    def __init__(self, beta: float = 0.5, ignore_index: int = -100):
        super().__init__()
        self.beta = beta
        self.ignore_index = ignore_index

    def forward(self, log_q, log_p, shift_labels=None):
        return liger_jsd(log_q, log_p, shift_labels, self.beta, self.ignore_index)
