"""Custom ops of the sampled_kd family: the cross-entropy against sampled teacher ids from full
student logits."""

from ..kernels import registry
from ..kernels.layout import compute_dtype
from ..options import SampledOptions
from .schema import define, flatten, no_gradients, unflatten


def _kernels(options, tensor):
    return registry.implementation("sampled_kd", options.backend, tensor.device.type)


@define("sampled_kd_rows", "Tensor student, Tensor sampled_ids, Tensor sample_weights, Tensor? labels",
        SampledOptions, "Tensor")
def _sampled_kd_rows(student, sampled_ids, sample_weights, labels, *values):
    """student: (N, V); sampled_ids, sample_weights: (N, K). Returns per-row losses (N,)."""
    options, _ = unflatten(SampledOptions, values)
    return _kernels(options, student).rows_forward(student, sampled_ids, sample_weights, labels, options.spec,
                                                   options.sample_count, options.ignore_index)


@_sampled_kd_rows.register_fake
def _rows_fake(student, sampled_ids, sample_weights, *args):
    return student.new_empty(student.shape[0], dtype=compute_dtype(student, sample_weights))


@define("sampled_kd_rows_backward",
        "Tensor grad_rows, Tensor student, Tensor sampled_ids, Tensor sample_weights, Tensor? labels",
        SampledOptions, "Tensor")
def _sampled_kd_rows_backward(grad_rows, student, sampled_ids, sample_weights, labels, *values):
    """Returns ∂(Σ grad_rows·loss)/∂student: (N, V), the student's dtype."""
    options, _ = unflatten(SampledOptions, values)
    return _kernels(options, student).rows_backward(grad_rows, student, sampled_ids, sample_weights, labels,
                                                    options.spec, options.sample_count, options.ignore_index)


@_sampled_kd_rows_backward.register_fake
def _rows_backward_fake(grad_rows, student, *args):
    return student.new_empty(student.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.options = tuple(inputs[4:])


def _backward(ctx, grad_rows):
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _sampled_kd_rows_backward(grad_rows.contiguous(), *ctx.saved_tensors, *ctx.options)
    return (grad, None, None, None, *no_gradients(SampledOptions))


_sampled_kd_rows.register_autograd(_backward, setup_context=_setup)


def sampled_kd_rows(student, sampled_ids, sample_weights, labels, options):
    """Per-row sampled cross-entropy of (N, V) student logits against (N, K) sampled ids: (N,)."""
    return _sampled_kd_rows(student, sampled_ids, sample_weights, labels, *flatten(options))
