"""Custom ops for torch.nn.KLDivLoss semantics: per-row sums of the pointwise terms, and their
gradient with respect to the input. Reductions happen outside, in plain torch code."""

import math

import torch

from ..backends import launcher, torch_ref


@torch.library.custom_op("fastkd::kl_div_rows", mutates_args=())
def kl_div_rows(input: torch.Tensor, target: torch.Tensor, log_target: bool, backend: str) -> torch.Tensor:
    """input, target: (N, V) or (B, T, V). Returns Σ_V target·(log target − input) per row, (N,)."""
    return launcher(backend, "kl_div").kl_div_rows_forward(input, target, log_target)


@kl_div_rows.register_fake
def _kl_div_rows_fake(input, target, log_target, backend):
    return input.new_empty(math.prod(input.shape[:-1]), dtype=torch_ref.compute_dtype(input, target))


@torch.library.custom_op("fastkd::kl_div_rows_backward", mutates_args=())
def kl_div_rows_backward(grad_rows: torch.Tensor, input: torch.Tensor, target: torch.Tensor,
                         log_target: bool, backend: str) -> torch.Tensor:
    """Returns ∂/∂input (= −target probability × grad_rows): input's shape and dtype."""
    return launcher(backend, "kl_div").kl_div_rows_backward(grad_rows, input, target, log_target)


@kl_div_rows_backward.register_fake
def _kl_div_rows_backward_fake(grad_rows, input, target, log_target, backend):
    return input.new_empty(input.shape)


def _setup_context(ctx, inputs, output):
    input, target, log_target, backend = inputs
    ctx.save_for_backward(input, target)
    ctx.options = (log_target, backend)


def _backward(ctx, grad_rows):
    input, target = ctx.saved_tensors
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = kl_div_rows_backward(grad_rows, input, target, *ctx.options)
    # Callers route targets that require grad to torch.nn.functional.kl_div instead.
    return grad_input, None, None, None


kl_div_rows.register_autograd(_backward, setup_context=_setup_context)
