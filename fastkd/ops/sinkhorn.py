"""Custom ops of the batched Sinkhorn solver: schema, fake impl, autograd.

``fastkd::sinkhorn`` returns (value, value_linear, f̃, g̃, n_iter, err, plan, f̃ history,
g̃ history); f̃, g̃ are the internal finite potentials (see backends/torch_sinkhorn.py), the
histories are filled only for grad="unrolled" (O(B·(n+m)) per iteration, never B·n·m) and the
plan only when asked, empty tensors otherwise. ``fastkd::sinkhorn_backward`` turns the upstream
gradients of value and value_linear into ∂/∂cost, ∂/∂a, ∂/∂b. Only value and value_linear are
differentiable; everything else is returned as a constant.
"""

import torch

from ..backends import launcher
from ..backends.torch_ref import compute_dtype

def _empty(like, dtype=None):
    return like.new_empty(0, dtype=dtype)


@torch.library.custom_op("fastkd::sinkhorn", mutates_args=())
def sinkhorn(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float,
    max_iter: int,
    tol: float,
    grad: str,
    return_plan: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """cost: (n, m) shared or (B, n, m); a: (B, n); b: (B, m); tol < 0: exactly max_iter iterations."""
    return launcher(backend, "sinkhorn").sinkhorn_forward(cost, a, b, eps, max_iter, tol, grad == "unrolled",
                                                          return_plan)


@sinkhorn.register_fake
def _sinkhorn_fake(cost, a, b, eps, max_iter, tol, grad, return_plan, backend):
    dtype = compute_dtype(cost, a, b)
    n_problems, n = a.shape
    m = b.shape[1]
    history = grad == "unrolled"
    return (a.new_empty(n_problems, dtype=dtype), a.new_empty(n_problems, dtype=dtype),
            a.new_empty(n_problems, n, dtype=dtype), a.new_empty(n_problems, m, dtype=dtype),
            a.new_empty(n_problems, dtype=torch.int32), a.new_empty(n_problems, dtype=dtype),
            a.new_empty((n_problems, n, m) if return_plan else (0,), dtype=dtype),
            a.new_empty((n_problems, max_iter, n) if history else (0,), dtype=dtype),
            a.new_empty((n_problems, max_iter, m) if history else (0,), dtype=dtype))


@torch.library.custom_op("fastkd::sinkhorn_backward", mutates_args=())
def sinkhorn_backward(
    grad_value: torch.Tensor,
    grad_value_linear: torch.Tensor,
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    n_iter: torch.Tensor,
    f_hist: torch.Tensor,
    g_hist: torch.Tensor,
    eps: float,
    grad: str,
    needs_cost: bool,
    needs_a: bool,
    needs_b: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (∂/∂cost in cost's shape and dtype, ∂/∂a, ∂/∂b); empty where not needed."""
    grad_cost, grad_a, grad_b = launcher(backend, "sinkhorn").sinkhorn_backward(
        grad_value, grad_value_linear, cost, a, b, f, g, n_iter, f_hist, g_hist, eps, grad,
        needs_cost, needs_a, needs_b)
    # Gradients not asked for come back as distinct empty tensors (outputs may not alias).
    return (grad_cost.to(cost.dtype) if needs_cost else _empty(cost), grad_a.to(a.dtype) if needs_a else _empty(a),
            grad_b.to(b.dtype) if needs_b else _empty(b))


@sinkhorn_backward.register_fake
def _sinkhorn_backward_fake(grad_value, grad_value_linear, cost, a, b, f, g, n_iter, f_hist, g_hist, eps, grad,
                            needs_cost, needs_a, needs_b, backend):
    return (cost.new_empty(cost.shape) if needs_cost else _empty(cost),
            a.new_empty(a.shape) if needs_a else _empty(a),
            b.new_empty(b.shape) if needs_b else _empty(b))


def _setup_context(ctx, inputs, output):
    cost, a, b, eps, max_iter, tol, grad, return_plan, backend = inputs
    _, _, f, g, n_iter, _, _, f_hist, g_hist = output
    ctx.save_for_backward(cost, a, b, f, g, n_iter, f_hist, g_hist)
    ctx.options = (eps, grad, backend)


def _backward(ctx, grad_value, grad_value_linear, *unused):
    cost, a, b, f, g, n_iter, f_hist, g_hist = ctx.saved_tensors
    eps, grad, backend = ctx.options
    needs_cost, needs_a, needs_b = ctx.needs_input_grad[:3]
    if grad == "none" or not (needs_cost or needs_a or needs_b):
        return (None,) * 9
    zeros = f.new_zeros(a.shape[0])
    grad_value = zeros if grad_value is None else grad_value
    grad_value_linear = zeros if grad_value_linear is None else grad_value_linear
    grad_cost, grad_a, grad_b = sinkhorn_backward(
        grad_value, grad_value_linear, cost, a, b, f, g, n_iter, f_hist, g_hist, eps, grad,
        needs_cost, needs_a, needs_b, backend)
    return (grad_cost if needs_cost else None, grad_a if needs_a else None, grad_b if needs_b else None,
            None, None, None, None, None, None)


sinkhorn.register_autograd(_backward, setup_context=_setup_context)
