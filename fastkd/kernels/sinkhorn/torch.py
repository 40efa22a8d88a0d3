"""Pure-PyTorch implementation of the sinkhorn families: the batched log-domain Sinkhorn solver and
its gradients (any device, float64 included).

The math, shared with the Triton kernels (sinkhorn/triton.py), in the internal form
whose potentials stay finite where a marginal has zero mass:

    u_i = log a_i + f̃_i/ε   (−inf where a_i = 0),   v_j = log b_j + g̃_j/ε
    column step  L_j = lse_i(u_i − C_ij/ε),  g̃ = −ε·L          (column marginals exact)
    row step     R_i = lse_j(v_j − C_ij/ε),  f̃ = −ε·R          (row marginals exact)
    plan         P_ij = exp(u_i + v_j − C_ij/ε)

POT's potentials are f = f̃ + ε·log a and g = g̃ + ε·log b. The first column step sees u = 0 on
the support of a (POT's f = 0 start) and −inf off it, so zero-mass rows are absent from the
first iteration too. The error of the current plan, Σ_j |colsum_j − b_j|, comes for free from the
next column step: colsum_j = b_j·exp(L_new_j − L_j).

Problems are processed in chunks so that each (chunk, n, m) temporary holds at most
max(``CHUNK_ELEMENTS``, n·m) elements; a shared (n, m) cost is scaled once and broadcast, never
copied per problem. On the CPU the loop ends once every problem of a chunk has converged; on a
GPU that test would synchronise with the host, so all max_iter iterations run there, converged
problems frozen (the Triton kernels exit per problem instead).
"""

import torch

from ..layout import compute_dtype
from .contract import SinkhornOutputs, log_marginal, marginal_grad

# Elements of one (problems × n × m) temporary: 4M fp32 elements = 16 MiB; about four are alive.
CHUNK_ELEMENTS = 1 << 22


def _chunks(n_problems, n, m):
    size = max(1, CHUNK_ELEMENTS // max(n * m, 1))
    for start in range(0, n_problems, size):
        yield start, min(start + size, n_problems)


def _scaled_cost(cost, start, stop, dtype, inv_eps):
    """C/ε for problems [start, stop): (n, m) for a shared cost (broadcast), else (k, n, m)."""
    c = cost if cost.dim() == 2 else cost[start:stop]
    return c.to(dtype) * inv_eps


def _column_lse(u, cs):
    """lse_i(u_i − cs_ij): u (k, n), cs (n, m) or (k, n, m) → (k, m)."""
    return torch.logsumexp(u[:, :, None] - cs, dim=1)


def _row_lse(v, cs):
    """lse_j(v_j − cs_ij): v (k, m) → (k, n)."""
    return torch.logsumexp(v[:, None, :] - cs, dim=2)


def _may_stop_early(device):
    # On the CPU reading a flag is free; on a GPU it would be a host synchronisation, so the
    # loop runs max_iter lock-step iterations there, converged problems frozen by masks.
    return device.type == "cpu"


def sinkhorn_forward(cost, a, b, eps, max_iter, tol, save_history, return_plan, *, gemm_precision="fp32"):
    """cost: (n, m) shared or (B, n, m); a: (B, n), b: (B, m) in the compute dtype (views with
    stride 0 are fine). tol < 0 runs exactly max_iter iterations. ``gemm_precision``: the gemm
    backend's (this one multiplies no matrices).

    Returns SinkhornOutputs (contract.py) in the compute dtype.
    """
    dtype = compute_dtype(cost, a, b)
    device = cost.device
    n_problems, n = a.shape
    m = b.shape[1]
    value = torch.zeros(n_problems, dtype=dtype, device=device)
    value_linear = torch.zeros_like(value)
    f_out = torch.zeros(n_problems, n, dtype=dtype, device=device)
    g_out = torch.zeros(n_problems, m, dtype=dtype, device=device)
    n_iter = torch.zeros(n_problems, dtype=torch.int32, device=device)
    err = torch.zeros(n_problems, dtype=dtype, device=device)
    plan = torch.empty((n_problems, n, m) if return_plan else (0,), dtype=dtype, device=device)
    history_shape = (n_problems, max_iter) if save_history else (0,)
    f_hist = torch.zeros(*history_shape, *((n,) if save_history else ()), dtype=dtype, device=device)
    g_hist = torch.zeros(*history_shape, *((m,) if save_history else ()), dtype=dtype, device=device)
    inv_eps = 1.0 / eps
    for start, stop in _chunks(n_problems, n, m):
        cs = _scaled_cost(cost, start, stop, dtype, inv_eps)
        a_k, b_k = a[start:stop].to(dtype), b[start:stop].to(dtype)
        la, lb = log_marginal(a_k), log_marginal(b_k)
        k = stop - start
        u = torch.where(a_k > 0, 0.0, float("-inf")).to(dtype)
        L = _column_lse(u, cs)
        v = torch.where(b_k > 0, lb - L, float("-inf"))
        R = torch.zeros(k, n, dtype=dtype, device=device)
        running = torch.ones(k, dtype=torch.bool, device=device)
        iters = torch.zeros(k, dtype=torch.int32, device=device)
        e = torch.full((k,), float("inf"), dtype=dtype, device=device)
        if save_history:
            g_hist[start:stop, 0] = -eps * L
        for t in range(max_iter):
            R = torch.where(running[:, None], _row_lse(v, cs), R)
            u = torch.where(a_k > 0, la - R, float("-inf"))
            iters += running.to(torch.int32)
            if save_history:
                f_hist[start:stop, t] = -eps * R
            L_new = _column_lse(u, cs)
            col_sums = torch.where(b_k > 0, torch.exp(lb + L_new - L), 0.0)
            e = torch.where(running, (col_sums - b_k).abs().sum(1), e)
            # NaN errors keep running (the comparison is false), like POT.
            running = running & ~(e <= tol) & (t + 1 < max_iter)
            L = torch.where(running[:, None], L_new, L)
            v = torch.where(b_k > 0, lb - L, float("-inf"))
            if save_history and t + 1 < max_iter:
                g_hist[start:stop, t + 1] = -eps * L
            if _may_stop_early(device) and not bool(running.any()):
                break
        f_t, g_t = -eps * R, -eps * L
        P = torch.exp(u[:, :, None] + v[:, None, :] - cs)
        c = cs * eps
        value_linear[start:stop] = (P * c).sum((1, 2))
        value[start:stop] = (P * (f_t[:, :, None] + g_t[:, None, :])).sum((1, 2))
        f_out[start:stop], g_out[start:stop] = f_t, g_t
        n_iter[start:stop], err[start:stop] = iters, e
        if return_plan:
            plan[start:stop] = P
    return SinkhornOutputs(value, value_linear, f_out, g_out, n_iter, err, plan, f_hist, g_hist)


def sinkhorn_backward(grad_value, grad_value_linear, cost, a, b, f, g, n_iter, f_hist, g_hist, eps, mode,
                      needs_cost, needs_a, needs_b, *, gemm_precision="fp32"):
    """Gradients of Σ grad_value·value + grad_value_linear·value_linear.

    mode "envelope": ∂value/∂C = P, ∂value/∂a = f̃ − mean(f̃), ∂value/∂b = g̃ − mean(g̃)
    (value_linear carries no gradient). mode "unrolled": exact reverse pass through the iterations run, from the
    saved potentials. Returns (grad_cost (cost's shape) or empty, grad_a (B, n) or empty,
    grad_b (B, m) or empty) in the compute dtype.
    """
    dtype = compute_dtype(cost, a, b)
    device = cost.device
    n_problems, n = a.shape
    m = b.shape[1]
    empty = torch.empty(0, dtype=dtype, device=device)
    grad_value = grad_value.to(dtype)
    grad_value_linear = grad_value_linear.to(dtype)
    if mode == "envelope":
        grad_a = (grad_value[:, None] * (f - f.mean(1, keepdim=True))) if needs_a else empty
        grad_b = (grad_value[:, None] * (g - g.mean(1, keepdim=True))) if needs_b else empty
    else:
        grad_a = torch.zeros(n_problems, n, dtype=dtype, device=device) if needs_a else empty
        grad_b = torch.zeros(n_problems, m, dtype=dtype, device=device) if needs_b else empty
    grad_cost = torch.zeros(cost.shape, dtype=dtype, device=device) if needs_cost else empty
    if mode == "envelope" and not needs_cost:
        return grad_cost, grad_a, grad_b
    inv_eps = 1.0 / eps
    for start, stop in _chunks(n_problems, n, m):
        cs = _scaled_cost(cost, start, stop, dtype, inv_eps)
        a_k, b_k = a[start:stop].to(dtype), b[start:stop].to(dtype)
        la, lb = log_marginal(a_k), log_marginal(b_k)
        u = torch.where(a_k > 0, la + f[start:stop] * inv_eps, float("-inf"))
        v = torch.where(b_k > 0, lb + g[start:stop] * inv_eps, float("-inf"))
        P = torch.exp(u[:, :, None] + v[:, None, :] - cs)
        if mode == "envelope":
            chunk_grad = grad_value[start:stop, None, None] * P
        else:
            chunk_grad, la_bar, lb_bar = _unrolled_chunk(
                grad_value[start:stop], grad_value_linear[start:stop], cs, eps, a_k, b_k, la, lb,
                f[start:stop], g[start:stop], P, n_iter[start:stop], f_hist[start:stop], g_hist[start:stop],
                needs_cost)
            if needs_a:
                grad_a[start:stop] = marginal_grad(la_bar, a_k)
            if needs_b:
                grad_b[start:stop] = marginal_grad(lb_bar, b_k)
        if needs_cost:
            if cost.dim() == 2:
                grad_cost += chunk_grad.sum(0)
            else:
                grad_cost[start:stop] = chunk_grad
    return grad_cost, grad_a, grad_b


def _unrolled_chunk(w_v, w_l, cs, eps, a, b, la, lb, f, g, P, n_iter, f_hist, g_hist, needs_cost):
    """Reverse pass for k problems. Returns (∂/∂C (k, n, m) or None, ∂/∂log a, ∂/∂log b)."""
    inv_eps = 1.0 / eps
    fg = f[:, :, None] + g[:, None, :]
    Q = P * (w_l[:, None, None] * (cs * eps) + w_v[:, None, None] * fg) * inv_eps
    q_rows, q_cols = Q.sum(2), Q.sum(1)
    f_bar_out = q_rows + w_v[:, None] * P.sum(2)
    g_bar_out = q_cols + w_v[:, None] * P.sum(1)
    la_bar, lb_bar = eps * q_rows, eps * q_cols
    c_bar = (w_l[:, None, None] * P - Q) if needs_cost else None
    f_bar = torch.zeros_like(f)
    u0 = torch.where(a > 0, 0.0, float("-inf")).to(f.dtype)
    last_step = int(n_iter.max()) if _may_stop_early(cs.device) else f_hist.shape[1]
    for t in reversed(range(last_step)):
        active = t < n_iter
        final = (n_iter - 1 == t)[:, None]
        f_bar = torch.where(final, f_bar_out, f_bar)
        g_bar = torch.where(final, g_bar_out, 0.0)
        # Row step t: f̃_t = −ε·lse_j(log b_j + (g̃_t,j − C_ij)/ε); π its row-normalised kernel.
        v_t = torch.where(b > 0, lb + g_hist[:, t] * inv_eps, float("-inf"))
        pi = torch.exp(v_t[:, None, :] + f_hist[:, t, :, None] * inv_eps - cs)
        X = f_bar[:, :, None] * pi
        x_cols = X.sum(1)
        g_bar = g_bar - x_cols
        lb_bar = lb_bar - torch.where(active[:, None], eps * x_cols, 0.0)
        # Column step t: g̃_t = −ε·lse_i(u_{t−1,i} − C_ij/ε); at t = 0, u is the fixed start u0
        # (log a and f̃_0 = −ε·log a cancel there, so it carries no gradient).
        u_prev = u0 if t == 0 else torch.where(a > 0, la + f_hist[:, t - 1] * inv_eps, float("-inf"))
        sigma = torch.exp(u_prev[:, :, None] + g_hist[:, t, None, :] * inv_eps - cs)
        Y = g_bar[:, None, :] * sigma
        y_rows = Y.sum(2)
        if t > 0:
            la_bar = la_bar - torch.where(active[:, None], eps * y_rows, 0.0)
        f_bar = torch.where(active[:, None], -y_rows, f_bar)
        if needs_cost:
            c_bar = c_bar + torch.where(active[:, None, None], X + Y, 0.0)
    return c_bar, la_bar, lb_bar
