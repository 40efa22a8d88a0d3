"""Custom ops of the kd_rows family: schema, fake impl, autograd; no kernel choice here.

``fastkd::kd_rows`` returns the per-row loss plus the statistics its backward needs ((N, 5); (N, 9)
with ``standardize``: kernels/logits/contract.py); ``fastkd::kd_rows_backward`` recomputes p and q from them and
writes ∂/∂student. Reductions, T² and normalisation happen outside, in plain differentiable torch
code on (N,) tensors.
"""

import math

from ..kernels import registry
from ..kernels.layout import compute_dtype
from ..kernels.logits.contract import stats_width
from ..options import KDOptions
from .schema import define, flatten, no_gradients, unflatten


def _kernels(options, tensor):
    return registry.implementation("kd_rows", options.backend, tensor.device.type)


@define("kd_rows", "Tensor student, Tensor teacher, Tensor? labels", KDOptions, "(Tensor, Tensor)")
def _kd_rows(student, teacher, labels, *values):
    """student, teacher: (N, V) or (B, T, V); labels: (N,) or None, N the number of rows.
    Returns (loss (N,), stats (N, contract.stats_width(spec))) in the compute dtype."""
    options, _ = unflatten(KDOptions, values)
    return _kernels(options, student).kd_rows_forward(student, teacher, labels, options.spec, options.ignore_index)


@_kd_rows.register_fake
def _kd_rows_fake(student, teacher, labels, *values):
    options, _ = unflatten(KDOptions, values)
    dtype = compute_dtype(student, teacher)
    n_rows = math.prod(student.shape[:-1])
    stats = student.new_empty(n_rows, stats_width(options.spec), dtype=dtype)
    return student.new_empty(n_rows, dtype=dtype), stats


@define("kd_rows_backward", "Tensor grad_loss, Tensor student, Tensor teacher, Tensor? labels, Tensor stats",
        KDOptions, "Tensor")
def _kd_rows_backward(grad_loss, student, teacher, labels, stats, *values):
    """Returns ∂output/∂student: the student's shape and dtype."""
    options, _ = unflatten(KDOptions, values)
    return _kernels(options, student).kd_rows_backward(grad_loss, student, teacher, labels, stats, options.spec,
                                                       options.ignore_index)


@_kd_rows_backward.register_fake
def _kd_rows_backward_fake(grad_loss, student, *args):
    return student.new_empty(student.shape)


def _setup_context(ctx, inputs, output):
    student, teacher, labels, *values = inputs
    ctx.save_for_backward(student, teacher, labels, output[1])
    ctx.options = tuple(values)


def _backward(ctx, grad_loss, grad_stats):
    # Only the loss output is differentiable; the statistics are internal to the backward.
    student, teacher, labels, stats = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = _kd_rows_backward(grad_loss, student, teacher, labels, stats, *ctx.options)
    # The teacher is a constant of the loss: it never receives a gradient.
    return (grad_student, None, None, *no_gradients(KDOptions))


_kd_rows.register_autograd(_backward, setup_context=_setup_context)


def kd_rows(student, teacher, labels, options):
    """Per-row divergence of (N, V) or (B, T, V) logits: (loss (N,), stats (N, 5) or (N, 9))."""
    return _kd_rows(student, teacher, labels, *flatten(options))
