"""The contract of the sinkhorn families: what a forward returns, in the internal potentials of
sinkhorn/torch.py (f̃, g̃ stay finite where a marginal has zero mass; POT's f = f̃ + ε·log a)."""

from typing import NamedTuple

import torch


class SinkhornOutputs(NamedTuple):
    """One solve of B problems of n × m. ``plan`` is filled only when asked for, the histories only
    for grad="unrolled" (O(B·(n+m)) per iteration, never B·n·m): empty tensors otherwise.
    g̃ history[t] is the g̃ row step t used, f̃ history[t] the f̃ it produced."""

    value: torch.Tensor  # (B,) ⟨P, C⟩ + ε·KL(P ‖ a⊗b)
    value_linear: torch.Tensor  # (B,) ⟨P, C⟩
    f: torch.Tensor  # (B, n) f̃
    g: torch.Tensor  # (B, m) g̃
    n_iter: torch.Tensor  # (B,) int32, iterations run
    err: torch.Tensor  # (B,) L1 column-marginal error of the last iteration
    plan: torch.Tensor  # (B, n, m) or empty
    f_hist: torch.Tensor  # (B, max_iter, n) or empty
    g_hist: torch.Tensor  # (B, max_iter, m) or empty


def allocate_outputs(n_problems, n, m, max_iter, save_history, return_plan, device, zero_history):
    """SinkhornOutputs in fp32 (n_iter int32) for a kernel to fill; plan and histories empty unless
    asked for. ``zero_history``: histories start at zero (kernels that only write the iterations a
    problem ran, read back by the torch backward)."""
    def new(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device=device)

    history = torch.zeros if zero_history else torch.empty
    return SinkhornOutputs(
        new(n_problems), new(n_problems), new(n_problems, n), new(n_problems, m),
        new(n_problems, dtype=torch.int32), new(n_problems),
        new(n_problems, n, m) if return_plan else new(0),
        history(n_problems, max_iter, n, device=device) if save_history else new(0),
        history(n_problems, max_iter, m, device=device) if save_history else new(0))
