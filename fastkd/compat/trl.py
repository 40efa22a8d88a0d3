"""Drop-in for TRL's ``GKDTrainer.generalized_jsd_loss`` (importing TRL is not needed).

Mirrors the current TRL definition: temperature applied to both logits (no T²); beta = 0 is
KL(teacher ‖ student), beta = 1 KL(student ‖ teacher), otherwise beta·KL(p ‖ M) + (1−beta)·KL(q ‖ M)
with M = beta·p + (1−beta)·q; tokens whose label is -100 are dropped; then
``num_items_in_batch`` (sum / count) or ``reduction``: 'batchmean' (sum over valid tokens /
their number, at least 1; without labels sum / student_logits.size(0)), 'sum', 'mean' (over
elements), 'none' (element-wise, valid tokens only). Older TRL releases divided the label-less
'batchmean' by size(0)·size(1) instead. One deliberate difference: 'mean' over zero valid tokens
is 0 here, NaN in TRL.

``beta`` and ``temperature`` may be tensors, as in TRL. A tensor ``beta`` must hold one value (TRL
branches on ``beta == 0``); it is read once on the host — a synchronisation on CUDA, the same one
TRL makes — because fastkd's kernels take beta as a number (a kernel reading it from device memory
would remove it). A tensor ``temperature`` is never read on the host: a one-element CPU tensor is
taken as a number; any other (a CUDA scalar, a per-token (B, T, 1) tensor, anything that
broadcasts to the logits' shape) divides the logits on the device, as TRL does, at the cost of a
scaled copy of each (TRL makes the same copies), and a temperature that requires grad gets its
gradient through both sides, as in TRL. Its values are not checked (that would read them on the
host); a number temperature must be > 0.

The fused kernels treat the teacher as a constant. When ``teacher_logits`` requires a gradient
(TRL propagates one), and for reduction='none' (whose output is element-wise anyway), the loss is
computed by the same formula in plain PyTorch, in the inputs' precision, so gradients reach the
teacher exactly as in TRL.
"""

import torch

from .. import validation
from ..divergences import make_spec
from ..functional import kd_loss
from ..kernels.layout import compute_dtype

IGNORE_INDEX = -100


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """student_logits, teacher_logits: (B, T, V) or (N, V); labels: their leading shape, -100 ignored."""
    if reduction not in ("batchmean", "sum", "mean", "none"):
        raise ValueError(f"reduction must be one of 'batchmean', 'sum', 'mean', 'none'; got {reduction!r}")
    validation.check_logits("student_logits", student_logits)
    validation.check_logits("teacher_logits", teacher_logits)
    validation.check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    beta = host_beta(beta)
    student_logits, teacher_logits, temperature = _apply_temperature(student_logits, teacher_logits, temperature)
    out_dtype = torch.result_type(student_logits, teacher_logits)
    if reduction == "none" or (teacher_logits.requires_grad and torch.is_grad_enabled()):
        jsd = _elementwise_jsd(student_logits, teacher_logits, labels, beta, temperature)
        if reduction == "none" and num_items_in_batch is None:
            return jsd.to(out_dtype)
        return _eager_reduction(jsd, student_logits, labels, reduction, num_items_in_batch).to(out_dtype)
    options = dict(divergence="jsd", beta=beta, temperature=temperature, labels=labels,
                   ignore_index=IGNORE_INDEX)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(student_logits.device)
        return (kd_loss(student_logits, teacher_logits, reduction="sum", **options)
                / num_items_in_batch).to(out_dtype)
    if reduction == "batchmean" and labels is not None:
        return kd_loss(student_logits, teacher_logits, reduction="mean", **options).to(out_dtype)
    total = kd_loss(student_logits, teacher_logits, reduction="sum", **options)
    if reduction == "batchmean":
        total = total / max(student_logits.shape[0], 1)
    elif reduction == "mean":
        vocab = student_logits.shape[-1]
        rows = student_logits.numel() // vocab if labels is None else (labels != IGNORE_INDEX).sum().clamp(min=1)
        total = total / (rows * vocab)
    return total.to(out_dtype)


def host_beta(beta):
    """beta as a Python number; a one-element tensor is read on the host (see the module docstring)."""
    if isinstance(beta, torch.Tensor):
        if beta.numel() != 1:
            raise ValueError(f"beta must be a number or a one-element tensor; got shape {tuple(beta.shape)}")
        if beta.dtype.is_complex or beta.dtype == torch.bool:
            raise TypeError(f"beta must be a real number; got a tensor of {beta.dtype}")
        return float(beta.detach().reshape(()))
    return beta


def _apply_temperature(student_logits, teacher_logits, temperature):
    """(student, teacher, temperature number): a tensor temperature divides the logits on the device."""
    if not isinstance(temperature, torch.Tensor):
        return student_logits, teacher_logits, temperature
    if temperature.dtype.is_complex or temperature.dtype == torch.bool:
        raise TypeError(f"temperature must be real; got a tensor of {temperature.dtype}")
    if temperature.numel() == 1 and temperature.device.type == "cpu" and not temperature.requires_grad:
        return student_logits, teacher_logits, float(temperature.reshape(()))  # no device to wait for
    try:
        shape = torch.broadcast_shapes(temperature.shape, student_logits.shape)
    except RuntimeError:
        shape = None
    if shape != student_logits.shape:
        raise ValueError(f"temperature of shape {tuple(temperature.shape)} must broadcast to the logits' shape "
                         f"{tuple(student_logits.shape)} without changing it")
    if temperature.device != student_logits.device and temperature.dim() > 0:
        raise ValueError(f"temperature is on {temperature.device} but the logits are on {student_logits.device}")
    return student_logits / temperature, teacher_logits / temperature, 1.0


def _elementwise_jsd(student_logits, teacher_logits, labels, beta, temperature):
    """The per-element terms TRL returns for reduction='none': (valid tokens, V), or the full shape."""
    spec = make_spec("jsd", temperature, beta)
    dtype = compute_dtype(student_logits, teacher_logits)
    lq = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    lp = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    q, p = lq.exp(), lp.exp()
    if spec.name == "forward_kl":
        jsd = _weighted(p, lp - lq)
    elif spec.name == "reverse_kl":
        jsd = _weighted(q, lq - lp)
    else:
        lm = torch.logaddexp(lp + spec.log_param, lq + spec.log1m_param)
        jsd = beta * _weighted(p, lp - lm) + (1 - beta) * _weighted(q, lq - lm)
    return jsd if labels is None else jsd[labels != IGNORE_INDEX]


def _eager_reduction(jsd, student_logits, labels, reduction, num_items_in_batch):
    """TRL's reductions of the element-wise terms (valid tokens only)."""
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(jsd.device)
        return jsd.sum() / num_items_in_batch
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.sum() / max(jsd.numel(), 1)
    if labels is not None:
        return jsd.sum() / (labels != IGNORE_INDEX).sum().clamp(min=1)
    return jsd.sum() / max(student_logits.shape[0], 1)


def _weighted(weight, value):
    """weight · value, 0 where weight is 0 (0·log 0 = 0); differentiable, for the eager paths."""
    return torch.where(weight > 0, weight * value, torch.zeros((), dtype=value.dtype, device=value.device))
