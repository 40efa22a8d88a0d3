"""fastkd.compat.KLDivLoss / kl_div against torch.nn.KLDivLoss and a float64 formula."""

import pytest
import torch

from conftest import DEVICE, each_backend
from fastkd.compat import KLDivLoss, kl_div
from reference import rel_err


def _inputs(*shape, dtype=torch.float32, log_target=False):
    log_q = torch.log_softmax(torch.randn(*shape, device=DEVICE, dtype=torch.float64) * 2, -1)
    log_p = torch.log_softmax(torch.randn(*shape, device=DEVICE, dtype=torch.float64) * 2, -1)
    target = log_p if log_target else log_p.exp()
    return log_q.to(dtype), target.to(dtype)


def _float64_formula(log_q, target, log_target, reduction):
    log_q, target = log_q.double(), target.double()
    prob = target.exp() if log_target else target
    log_prob = target if log_target else target.log()
    pointwise = torch.where(prob > 0, prob * (log_prob - log_q), torch.zeros_like(prob))
    return {"sum": pointwise.sum(), "mean": pointwise.mean(),
            "batchmean": pointwise.sum() / log_q.shape[0]}[reduction]


@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("shape", [(5, 33), (2, 3, 1001), (7,)])
def test_matches_torch_and_float64(reduction, log_target, shape):
    log_q, target = _inputs(*shape, log_target=log_target)
    log_q.requires_grad_(True)
    ours = KLDivLoss(reduction=reduction, log_target=log_target)(log_q, target)
    (grad,) = torch.autograd.grad(ours, log_q)
    theirs = torch.nn.KLDivLoss(reduction=reduction, log_target=log_target)(log_q, target)
    (their_grad,) = torch.autograd.grad(theirs, log_q)
    assert rel_err(ours, _float64_formula(log_q, target, log_target, reduction)) < 5e-6
    assert rel_err(ours, theirs) < 5e-6 and rel_err(grad, their_grad) < 1e-6
    assert ours.dtype == theirs.dtype


def test_is_a_torch_kldivloss_and_handles_legacy_arguments():
    assert isinstance(KLDivLoss(), torch.nn.KLDivLoss)
    log_q, target = _inputs(4, 9)
    assert rel_err(kl_div(log_q, target, size_average=False), torch.nn.functional.kl_div(
        log_q, target, size_average=False)) < 5e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    log_q, target = _inputs(6, 300, dtype=dtype)
    ours = kl_div(log_q, target, reduction="batchmean")
    assert ours.dtype == dtype
    assert rel_err(ours, _float64_formula(log_q, target, False, "batchmean")) < 1e-2


def test_unreduced_broadcast_and_target_gradients_follow_torch():
    log_q, target = _inputs(3, 8)
    assert torch.equal(kl_div(log_q, target, reduction="none"),
                       torch.nn.functional.kl_div(log_q, target, reduction="none"))
    assert torch.equal(kl_div(log_q, target[:1], reduction="sum"),
                       torch.nn.functional.kl_div(log_q, target[:1], reduction="sum"))
    target = target.clone().requires_grad_(True)
    kl_div(log_q, target, reduction="sum").backward()
    assert target.grad is not None and torch.isfinite(target.grad).all()


def test_zero_target_against_minus_inf_input_is_zero_not_nan():
    log_q = torch.tensor([[0.0, -float("inf")]], device=DEVICE)
    target = torch.tensor([[1.0, 0.0]], device=DEVICE)
    assert kl_div(log_q, target, reduction="sum").item() == 0.0


def test_bad_reduction():
    with pytest.raises(ValueError, match="reduction"):
        kl_div(*_inputs(2, 3), reduction="avg")


@each_backend("kl_div")
@pytest.mark.parametrize("log_target", [False, True])
def test_every_backend_kernel_matches_float64(backend, log_target):
    # kl_div picks its backend itself; here each backend's kernels run directly.
    log_q, target = _inputs(2, 3, 1001, log_target=log_target)
    log_q.requires_grad_(True)
    rows = torch.ops.fastkd.kl_div_rows(log_q[:, 1:], target[:, 1:], log_target, backend)
    grad_rows = torch.rand_like(rows)
    (grad,) = torch.autograd.grad(rows, log_q, grad_rows)
    ref_q = log_q.detach().double().requires_grad_(True)
    prob = target.double().exp() if log_target else target.double()
    log_prob = target.double() if log_target else target.double().log()
    ref_rows = (prob * (log_prob - ref_q))[:, 1:].sum(-1).reshape(-1)
    (ref_grad,) = torch.autograd.grad(ref_rows, ref_q, grad_rows.double())
    assert rel_err(rows, ref_rows) < 5e-6 and rel_err(grad, ref_grad) < 1e-6


@each_backend("kl_div")
def test_negative_targets_give_nan_as_in_torch(backend):
    # PyTorch: target·(log target − input) is NaN for a negative target; 'none' and the reducing
    # forms must agree on it (they once disagreed: 'sum' skipped such entries).
    log_q, target = _inputs(3, 40)
    target[1, 5] = -0.01
    for reduction in ("none", "sum", "mean", "batchmean"):
        ours, theirs = kl_div(log_q, target, reduction=reduction), torch.nn.functional.kl_div(
            log_q, target, reduction=reduction)
        assert torch.isnan(ours).any() and torch.isnan(theirs).any(), reduction
    rows = torch.ops.fastkd.kl_div_rows(log_q, target, False, backend)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


def test_zero_dimensional_tensors_follow_torch():
    log_q, target = torch.tensor(-0.5, device=DEVICE), torch.tensor(0.3, device=DEVICE)
    for reduction in ("none", "sum", "mean", "batchmean"):
        expected = torch.nn.functional.kl_div(log_q, target, reduction=reduction)
        assert torch.equal(kl_div(log_q, target, reduction=reduction), expected), reduction
