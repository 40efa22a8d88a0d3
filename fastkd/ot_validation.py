"""Argument checks of the optimal-transport functions (fastkd/ot.py). Each names the argument at
fault. ``check_*`` read only shapes, dtypes and Python numbers; ``check_*_values`` read tensor
data, so they synchronise with the device: the public functions run them only when
``validate=True``."""

import math

import torch

from .validation import check_float_tensor

GRAD_MODES = ("envelope", "unrolled", "none")
GEMM_PRECISIONS = ("fp32", "tf32", "bf16")
# Relative difference allowed between the total masses of a and b (balanced OT needs them equal).
MASS_TOLERANCE = 1e-3


def check_cost(cost):
    """(n, m) or (B, n, m) with n, m ≥ 1. Returns the batch size of the cost, or None if shared."""
    check_float_tensor("cost", cost)
    if cost.dim() not in (2, 3):
        raise ValueError(f"cost must be (n, m) or (B, n, m); got shape {tuple(cost.shape)}")
    if cost.shape[-1] == 0 or cost.shape[-2] == 0:
        raise ValueError(f"cost must have at least one row and one column; got shape {tuple(cost.shape)}")
    return cost.shape[0] if cost.dim() == 3 else None


def check_marginal(name, x, size, side, device):
    """``x``: None, (size,) or (B, size). Returns its batch size, or None if it has none."""
    if x is None:
        return None
    check_float_tensor(name, x)
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but cost is on {device}")
    if x.dim() not in (1, 2) or x.shape[-1] != size:
        raise ValueError(f"{name} must have shape ({size},) or (B, {size}) to match the cost's {side} "
                         f"({size}); got {tuple(x.shape)}")
    return x.shape[0] if x.dim() == 2 else None


def batch_size(cost_batch, a_batch, b_batch):
    """The one batch size B the cost and marginals agree on, or None for a single problem."""
    sizes = {name: s for name, s in (("cost", cost_batch), ("a", a_batch), ("b", b_batch)) if s is not None}
    if len(set(sizes.values())) > 1:
        described = ", ".join(f"{name} has B={s}" for name, s in sizes.items())
        raise ValueError(f"batch sizes differ: {described}")
    return next(iter(sizes.values()), None)


def check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a number; got {type(eps).__name__}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0; got {eps}")


def check_iterations(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1; got {value}")


def check_tol(tol):
    if tol is None:
        return
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"tol must be a number or None; got {type(tol).__name__}")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number ≥ 0, or None to run exactly max_iter iterations; got {tol}")


def check_grad_mode(grad):
    if not isinstance(grad, str) or grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {', '.join(map(repr, GRAD_MODES))}; got {grad!r}")


def check_gemm_precision(gemm_precision):
    if not isinstance(gemm_precision, str) or gemm_precision not in GEMM_PRECISIONS:
        raise ValueError(f"gemm_precision must be one of {', '.join(map(repr, GEMM_PRECISIONS))}; "
                         f"got {gemm_precision!r}")


def check_cost_values(cost):
    """Finite and ≥ 0 everywhere. Synchronises with the device."""
    if not bool(torch.isfinite(cost).all()):
        raise ValueError("cost has non-finite entries (inf or NaN); mask absent rows/columns with zero "
                         "mass in a or b instead")
    if bool((cost < 0).any()):
        raise ValueError(f"cost has negative entries (min {float(cost.min()):.4g}); costs must be ≥ 0")


def check_marginal_values(name, x, what="problem"):
    """x: (B, size). Finite, ≥ 0, and a positive total per problem. Synchronises with the device."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has non-finite masses (inf or NaN)")
    if bool((x < 0).any()):
        raise ValueError(f"{name} has negative masses (min {float(x.min()):.4g}); masses must be ≥ 0")
    empty = (x.sum(-1) <= 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"{name} sums to 0 for {empty.numel()} {what}(s) (first: index {int(empty[0])}); "
                         "every problem needs some mass")


def check_equal_mass(a, b):
    """Balanced OT: Σa = Σb per problem, to MASS_TOLERANCE relative. Synchronises with the device."""
    mass_a, mass_b = a.sum(-1), b.sum(-1)
    gap = (mass_a - mass_b).abs() / torch.maximum(mass_a, mass_b)
    bad = (gap > MASS_TOLERANCE).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"a and b must have the same total mass in each problem (balanced OT); problem {i} "
                         f"has sum(a) = {float(mass_a[i]):.6g}, sum(b) = {float(mass_b[i]):.6g}")


def check_loss_grad(grad):
    if not isinstance(grad, str) or grad not in ("unrolled", "none"):
        raise ValueError(f"grad must be 'unrolled' or 'none' for this loss (it is ⟨P, C⟩, whose gradient the "
                         f"envelope theorem does not give); got {grad!r}")


def check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number; got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature}")
