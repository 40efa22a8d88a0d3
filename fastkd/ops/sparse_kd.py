"""Custom ops of the sparse_kd family: the divergence against a top-k teacher from full student
logits."""

import torch

from ..kernels import registry
from ..kernels.layout import compute_dtype
from ..options import SparseOptions
from .schema import define, flatten, no_gradients, unflatten


def _kernels(options, tensor):
    return registry.implementation("sparse_kd", options.backend, tensor.device.type)


@define("sparse_kd_rows", "Tensor student, Tensor teacher_indices, Tensor teacher_logprobs, Tensor? labels",
        SparseOptions, "Tensor")
def _sparse_kd_rows(student, teacher_indices, teacher_logprobs, labels, *values):
    """student: (N, V); teacher_indices, teacher_logprobs: (N, k). Returns per-row losses (N,)."""
    options, _ = unflatten(SparseOptions, values)
    return _kernels(options, student).rows_forward(student, teacher_indices, teacher_logprobs, labels, options.spec,
                                                   options.missing_mass, options.ignore_index)


@_sparse_kd_rows.register_fake
def _rows_fake(student, teacher_indices, teacher_logprobs, *args):
    return student.new_empty(student.shape[0], dtype=compute_dtype(student, teacher_logprobs))


@define("sparse_kd_rows_backward",
        "Tensor grad_rows, Tensor student, Tensor teacher_indices, Tensor teacher_logprobs, Tensor? labels",
        SparseOptions, "Tensor")
def _sparse_kd_rows_backward(grad_rows, student, teacher_indices, teacher_logprobs, labels, *values):
    """Returns ∂(Σ grad_rows·loss)/∂student: (N, V), the student's dtype."""
    options, _ = unflatten(SparseOptions, values)
    return _kernels(options, student).rows_backward(grad_rows, student, teacher_indices, teacher_logprobs, labels,
                                                    options.spec, options.missing_mass, options.ignore_index)


@_sparse_kd_rows_backward.register_fake
def _rows_backward_fake(grad_rows, student, *args):
    return student.new_empty(student.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.options = tuple(inputs[4:])


def _backward(ctx, grad_rows):
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _sparse_kd_rows_backward(grad_rows.contiguous(), *ctx.saved_tensors, *ctx.options)
    return (grad, None, None, None, *no_gradients(SparseOptions))


_sparse_kd_rows.register_autograd(_backward, setup_context=_setup)


def sparse_kd_rows(student, teacher_indices, teacher_logprobs, labels, options):
    """Per-row divergence of (N, V) student logits against a top-k teacher (N, k): (N,)."""
    return _sparse_kd_rows(student, teacher_indices, teacher_logprobs, labels, *flatten(options))
