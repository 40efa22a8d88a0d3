"""Custom ops of the kl_div family (torch.nn.KLDivLoss semantics): per-row sums of the pointwise
terms, and their gradient with respect to the input. Reductions happen outside, in plain torch."""

import math

from ..kernels import registry
from ..kernels.layout import compute_dtype
from ..options import KLDivOptions
from .schema import define, flatten, no_gradients, unflatten


def _kernels(options, tensor):
    return registry.implementation("kl_div", options.backend, tensor.device.type)


@define("kl_div_rows", "Tensor input, Tensor target", KLDivOptions, "Tensor")
def _kl_div_rows(input, target, *values):
    """input, target: (N, V) or (B, T, V). Returns Σ_V target·(log target − input) per row, (N,)."""
    options, _ = unflatten(KLDivOptions, values)
    return _kernels(options, input).kl_div_rows_forward(input, target, options.log_target)


@_kl_div_rows.register_fake
def _kl_div_rows_fake(input, target, *values):
    return input.new_empty(math.prod(input.shape[:-1]), dtype=compute_dtype(input, target))


@define("kl_div_rows_backward", "Tensor grad_rows, Tensor input, Tensor target", KLDivOptions, "Tensor")
def _kl_div_rows_backward(grad_rows, input, target, *values):
    """Returns ∂/∂input (= −target probability × grad_rows): input's shape and dtype."""
    options, _ = unflatten(KLDivOptions, values)
    return _kernels(options, input).kl_div_rows_backward(grad_rows, input, target, options.log_target)


@_kl_div_rows_backward.register_fake
def _kl_div_rows_backward_fake(grad_rows, input, *args):
    return input.new_empty(input.shape)


def _setup_context(ctx, inputs, output):
    input, target, *values = inputs
    ctx.save_for_backward(input, target)
    ctx.options = tuple(values)


def _backward(ctx, grad_rows):
    input, target = ctx.saved_tensors
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = _kl_div_rows_backward(grad_rows, input, target, *ctx.options)
    # Callers route targets that require grad to torch.nn.functional.kl_div instead.
    return (grad_input, None, *no_gradients(KLDivOptions))


_kl_div_rows.register_autograd(_backward, setup_context=_setup_context)


def kl_div_rows(input, target, options):
    """Σ_V target·(log target − input) per row of (N, V) or (B, T, V) tensors: (N,)."""
    return _kl_div_rows(input, target, *flatten(options))
