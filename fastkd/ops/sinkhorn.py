"""Custom ops of the batched Sinkhorn solver: schema, fake impl, autograd; no kernel choice here.

``fastkd::sinkhorn`` returns the fields of SinkhornOutputs (kernels/sinkhorn/contract.py);
``fastkd::sinkhorn_backward`` turns the upstream gradients of value and value_linear into
∂/∂cost, ∂/∂a, ∂/∂b with the sinkhorn_backward kernels of the same backend. Only value and
value_linear are differentiable; everything else is returned as a constant.
"""

import torch

from ..kernels import registry
from ..kernels.layout import compute_dtype
from ..kernels.sinkhorn.contract import SinkhornOutputs
from ..options import SinkhornOptions
from .schema import define, flatten, no_gradients, unflatten

_OUTPUTS = "(" + ", ".join(["Tensor"] * len(SinkhornOutputs._fields)) + ")"


def _empty(like, dtype=None):
    return like.new_empty(0, dtype=dtype)


@define("sinkhorn", "Tensor cost, Tensor a, Tensor b", SinkhornOptions, _OUTPUTS)
def _sinkhorn(cost, a, b, *values):
    """cost: (n, m) shared or (B, n, m); a: (B, n); b: (B, m)."""
    options, _ = unflatten(SinkhornOptions, values)
    kernels = registry.implementation("sinkhorn", options.backend, cost.device.type)
    return tuple(kernels.sinkhorn_forward(cost, a, b, options.eps, options.max_iter, options.tol,
                                          options.grad == "unrolled", options.return_plan,
                                          gemm_precision=options.gemm_precision))


@_sinkhorn.register_fake
def _sinkhorn_fake(cost, a, b, *values):
    options, _ = unflatten(SinkhornOptions, values)
    dtype = compute_dtype(cost, a, b)
    n_problems, n = a.shape
    m = b.shape[1]
    history = options.grad == "unrolled"
    return tuple(SinkhornOutputs(
        a.new_empty(n_problems, dtype=dtype), a.new_empty(n_problems, dtype=dtype),
        a.new_empty(n_problems, n, dtype=dtype), a.new_empty(n_problems, m, dtype=dtype),
        a.new_empty(n_problems, dtype=torch.int32), a.new_empty(n_problems, dtype=dtype),
        a.new_empty((n_problems, n, m) if options.return_plan else (0,), dtype=dtype),
        a.new_empty((n_problems, options.max_iter, n) if history else (0,), dtype=dtype),
        a.new_empty((n_problems, options.max_iter, m) if history else (0,), dtype=dtype)))


@define("sinkhorn_backward", "Tensor grad_value, Tensor grad_value_linear, Tensor cost, Tensor a, Tensor b, "
        "Tensor f, Tensor g, Tensor n_iter, Tensor f_hist, Tensor g_hist", SinkhornOptions,
        "(Tensor, Tensor, Tensor)", extra="bool needs_cost, bool needs_a, bool needs_b")
def _sinkhorn_backward(grad_value, grad_value_linear, cost, a, b, f, g, n_iter, f_hist, g_hist, *values):
    """Returns (∂/∂cost in cost's shape and dtype, ∂/∂a, ∂/∂b); empty where not needed."""
    options, (needs_cost, needs_a, needs_b) = unflatten(SinkhornOptions, values)
    kernels = registry.implementation("sinkhorn_backward", options.backend, cost.device.type)
    grad_cost, grad_a, grad_b = kernels.sinkhorn_backward(
        grad_value, grad_value_linear, cost, a, b, f, g, n_iter, f_hist, g_hist, options.eps, options.grad,
        needs_cost, needs_a, needs_b, gemm_precision=options.gemm_precision)
    # Gradients not asked for come back as distinct empty tensors (outputs may not alias).
    return (grad_cost.to(cost.dtype) if needs_cost else _empty(cost), grad_a.to(a.dtype) if needs_a else _empty(a),
            grad_b.to(b.dtype) if needs_b else _empty(b))


@_sinkhorn_backward.register_fake
def _sinkhorn_backward_fake(grad_value, grad_value_linear, cost, a, b, *args):
    needs_cost, needs_a, needs_b = args[-3:]
    return (cost.new_empty(cost.shape) if needs_cost else _empty(cost),
            a.new_empty(a.shape) if needs_a else _empty(a),
            b.new_empty(b.shape) if needs_b else _empty(b))


def _setup_context(ctx, inputs, output):
    cost, a, b, *values = inputs
    outputs = SinkhornOutputs(*output)
    ctx.save_for_backward(cost, a, b, outputs.f, outputs.g, outputs.n_iter, outputs.f_hist, outputs.g_hist)
    ctx.options = tuple(values)


def _backward(ctx, grad_value, grad_value_linear, *unused):
    cost, a, b, f, g, n_iter, f_hist, g_hist = ctx.saved_tensors
    options, _ = unflatten(SinkhornOptions, ctx.options)
    needs_cost, needs_a, needs_b = ctx.needs_input_grad[:3]
    nothing = (None, None, None, *no_gradients(SinkhornOptions))
    if options.grad == "none" or not (needs_cost or needs_a or needs_b):
        return nothing
    zeros = f.new_zeros(a.shape[0])
    grad_value = zeros if grad_value is None else grad_value
    grad_value_linear = zeros if grad_value_linear is None else grad_value_linear
    grad_cost, grad_a, grad_b = _sinkhorn_backward(grad_value, grad_value_linear, cost, a, b, f, g, n_iter, f_hist,
                                                   g_hist, *ctx.options, needs_cost, needs_a, needs_b)
    return (grad_cost if needs_cost else None, grad_a if needs_a else None, grad_b if needs_b else None,
            *nothing[3:])


_sinkhorn.register_autograd(_backward, setup_context=_setup_context)


def sinkhorn(cost, a, b, options):
    """Solves B problems at once; returns SinkhornOutputs (value and value_linear differentiable)."""
    return SinkhornOutputs(*_sinkhorn(cost, a, b, *flatten(options)))
