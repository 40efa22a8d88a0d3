"""Custom ops for the per-row divergence of (N, V) logits: schema, fake impl, autograd.

``fastkd::kd_rows`` returns the per-row loss plus the (N, 5) statistics its backward needs
(see backends/torch_ref.py for their columns); ``fastkd::kd_rows_backward`` recomputes p and q
from them and writes ∂/∂student. Reductions, T² and normalisation happen outside, in plain
differentiable torch code on (N,) tensors.
"""

import math
from typing import Optional

import torch

from ..backends import launcher, torch_ref
from ..divergences import DivergenceSpec


@torch.library.custom_op("fastkd::kd_rows", mutates_args=())
def kd_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    divergence: str,
    temperature: float,
    param: float,
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """student, teacher: (N, V) or (B, T, V); labels: (N,) or None, N the number of rows.
    Returns (loss (N,), stats (N, 5))."""
    spec = DivergenceSpec(divergence, temperature, param)
    return launcher(backend).kd_rows_forward(student, teacher, labels, spec, ignore_index)


@kd_rows.register_fake
def _kd_rows_fake(student, teacher, labels, divergence, temperature, param, ignore_index, backend):
    dtype = torch_ref.compute_dtype(student, teacher)
    n_rows = math.prod(student.shape[:-1])
    return student.new_empty(n_rows, dtype=dtype), student.new_empty(n_rows, torch_ref.N_STATS, dtype=dtype)


@torch.library.custom_op("fastkd::kd_rows_backward", mutates_args=())
def kd_rows_backward(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    stats: torch.Tensor,
    divergence: str,
    temperature: float,
    param: float,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    """Returns ∂output/∂student: the student's shape and dtype."""
    spec = DivergenceSpec(divergence, temperature, param)
    return launcher(backend).kd_rows_backward(grad_loss, student, teacher, labels, stats, spec, ignore_index)


@kd_rows_backward.register_fake
def _kd_rows_backward_fake(grad_loss, student, *args):
    return student.new_empty(student.shape)


def _setup_context(ctx, inputs, output):
    student, teacher, labels, divergence, temperature, param, ignore_index, backend = inputs
    ctx.save_for_backward(student, teacher, labels, output[1])
    ctx.options = (divergence, temperature, param, ignore_index, backend)


def _backward(ctx, grad_loss, grad_stats):
    # Only the loss output is differentiable; the statistics are internal to the backward.
    student, teacher, labels, stats = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = kd_rows_backward(grad_loss, student, teacher, labels, stats, *ctx.options)
    # The teacher is a constant of the loss: it never receives a gradient.
    return grad_student, None, None, None, None, None, None, None


kd_rows.register_autograd(_backward, setup_context=_setup_context)
