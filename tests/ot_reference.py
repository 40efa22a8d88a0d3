"""Plain float64 definitions for the optimal-transport tests, written from the formulas and
differentiated by autograd (not by fastkd's hand-written reverse passes)."""

import torch


def _log(x):
    return torch.where(x > 0, torch.where(x > 0, x, 1.0).log(), float("-inf"))


def sinkhorn_loop(cost, a, b, eps, n_iter):
    """POT's log-domain iteration (f = 0 on the support of a; g then f each iteration), batched.

    cost: (B, n, m) or (n, m); a: (B, n); b: (B, m). Returns (value, value_linear, f, g, plan)
    with value = ⟨P, C⟩ + ε·KL(P ‖ a⊗b) and f = −inf, g = −inf at zero masses.
    """
    cost = cost.expand(a.shape[0], *cost.shape[-2:])
    la, lb = _log(a), _log(b)
    f = torch.where(a > 0, 0.0, float("-inf")).to(cost.dtype)
    for _ in range(n_iter):
        g = eps * lb - eps * torch.logsumexp((f[:, :, None] - cost) / eps, dim=1)
        g = torch.where(b > 0, g, float("-inf"))
        f = eps * la - eps * torch.logsumexp((g[:, None, :] - cost) / eps, dim=2)
        f = torch.where(a > 0, f, float("-inf"))
    plan = torch.exp((f[:, :, None] + g[:, None, :] - cost) / eps)
    value_linear = (plan * cost).sum((1, 2))
    log_ratio = torch.where(plan > 0, _log(plan) - torch.where(a > 0, la, 0.0)[:, :, None]
                            - torch.where(b > 0, lb, 0.0)[:, None, :], 0.0)
    value = value_linear + eps * (plan * log_ratio).sum((1, 2))
    return value, value_linear, f, g, plan


def wkd_loss(student, teacher, cost, temperature, eps, n_iters, labels=None):
    """WKD-L as in its paper's code, per-sample cost copies included: remove the target class
    (softmax over the other classes), copy the (V−1)×(V−1) cost for each sample, iterate, mean ⟨P, C⟩."""
    n_rows, n_classes = student.shape
    s, t = student / temperature, teacher / temperature
    if labels is None:
        costs = cost.expand(n_rows, n_classes, n_classes)
    else:
        keep = torch.ones(n_rows, n_classes, dtype=torch.bool).scatter(1, labels[:, None], False)
        s, t = s[keep].reshape(n_rows, -1), t[keep].reshape(n_rows, -1)
        pair = keep[:, :, None] & keep[:, None, :]
        costs = cost.expand(n_rows, n_classes, n_classes)[pair].reshape(n_rows, n_classes - 1, n_classes - 1)
    _, value_linear, _, _, _ = sinkhorn_loop(costs, torch.softmax(s, -1), torch.softmax(t, -1), eps, n_iters)
    return value_linear.mean()


def wkd_kernel_domain(student, teacher, cost, temperature, eps, n_iters, guard=1e-8):
    """The WKD paper's own kernel-domain iteration (u = 1/dim start, +guard in the divisions), no
    exclusion."""
    q = torch.softmax(student / temperature, -1)[:, :, None]
    p = torch.softmax(teacher / temperature, -1)[:, :, None]
    kernel = torch.exp(-cost / eps).expand(q.shape[0], -1, -1)
    u = torch.full_like(q, 1.0 / q.shape[1])
    for _ in range(n_iters):
        v = p / (torch.bmm(kernel.transpose(1, 2), u) + guard)
        u = q / (torch.bmm(kernel, v) + guard)
    flow = u * kernel * v.transpose(1, 2)
    return (flow * cost).sum((1, 2)).mean()


def sinkd_loss(student, teacher, temperature, eps, n_iters, keep=None):
    """Batch-wise Sinkhorn KD: C_ij = ‖q_i − p_j‖₁, uniform masses on the kept rows, ⟨P, C⟩."""
    q = torch.softmax(student / temperature, -1)
    p = torch.softmax(teacher / temperature, -1)
    if keep is not None:
        q, p = q[keep], p[keep]
    cost = (q[:, None, :] - p[None, :, :]).abs().sum(-1)
    mass = torch.full((1, q.shape[0]), 1.0 / q.shape[0], dtype=q.dtype)
    return sinkhorn_loop(cost[None], mass, mass, eps, n_iters)[1][0]


def uld_rows(student, teacher, temperature, top_k=None):
    """Per-row ULD: L1 between descending-sorted probability vectors, zero-padded to equal length."""
    rows = []
    for s_row, t_row in zip(student, teacher):
        q = torch.softmax(s_row / temperature, -1).sort(descending=True).values
        p = torch.softmax(t_row / temperature, -1).sort(descending=True).values
        if top_k is not None:
            q, p = q[:top_k], p[:top_k]
        width = max(len(q), len(p))
        q = torch.cat([q, q.new_zeros(width - len(q))])
        p = torch.cat([p, p.new_zeros(width - len(p))])
        rows.append((q - p).abs().sum())
    return torch.stack(rows)
