"""The OT distillation losses against plain float64 definitions of their papers' formulas, values and
gradients (autograd through the references)."""

import pytest
import torch

import fastkd
from conftest import DEVICE, OT_LOSS_TOLERANCE, each_backend
from ot_reference import sinkd_loss, uld_rows, wkd_kernel_domain, wkd_loss
from reference import rel_err



def _logits(*shape, scale=2.0, dtype=torch.float64):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)


def _class_cost(n_classes):
    """1 − cosine similarity of random classifier rows, as WKD builds it."""
    weights = torch.nn.functional.normalize(torch.randn(n_classes, 8, dtype=torch.float64), dim=-1)
    return (1 - weights @ weights.T).clamp_min(0).to(DEVICE)


def _grad(loss, leaf):
    return torch.autograd.grad(loss, leaf)[0]


@each_backend("sinkhorn", "sinkhorn_backward")
@pytest.mark.parametrize("with_labels", [False, True], ids=["all-classes", "target-excluded"])
def test_wasserstein_kd_matches_per_sample_copy_reference(backend, with_labels):
    n_rows, n_classes, temperature, eps, n_iters = 5, 11, 2.0, 0.05, 10
    dtype = torch.float64 if backend == "torch" else torch.float32
    student, teacher = _logits(n_rows, n_classes), _logits(n_rows, n_classes)
    cost = _class_cost(n_classes)
    labels = torch.randint(0, n_classes, (n_rows,), device=DEVICE) if with_labels else None

    ref_leaf = student.clone().requires_grad_()
    ref = wkd_loss(ref_leaf, teacher, cost, temperature, eps, n_iters, labels)
    leaf = student.to(dtype).requires_grad_()
    loss = fastkd.wasserstein_kd_loss(leaf, teacher.to(dtype), labels, cost=cost.to(dtype), temperature=temperature,
                                      eps=eps, max_iter=n_iters, backend=backend)
    assert loss.dtype == dtype and loss.shape == ()
    assert rel_err(loss, ref) <= OT_LOSS_TOLERANCE[backend]
    assert rel_err(_grad(loss, leaf), _grad(ref, ref_leaf)) <= 10 * OT_LOSS_TOLERANCE[backend]


@pytest.mark.parametrize("guard, tol", [(0.0, 1e-10), (1e-8, 1e-4)], ids=["exact", "paper-guards"])
def test_wasserstein_kd_matches_the_papers_kernel_domain_iteration(guard, tol):
    """At a moderate ε the paper's kernel-domain loop (u = 1/V start, v then u) is the same iteration;
    its +1e-8 guards in the divisions move the result by ~1e-5 relative."""
    student, teacher = _logits(4, 9), _logits(4, 9)
    cost = _class_cost(9)
    leaf, ref_leaf = student.clone().requires_grad_(), student.clone().requires_grad_()
    loss = fastkd.wasserstein_kd_loss(leaf, teacher, cost=cost, temperature=1.5, eps=0.1, max_iter=10)
    ref = wkd_kernel_domain(ref_leaf, teacher, cost, 1.5, 0.1, 10, guard)
    assert rel_err(loss, ref) <= tol
    assert rel_err(_grad(loss, leaf), _grad(ref, ref_leaf)) <= 10 * tol


def test_wasserstein_kd_leading_dims_and_cost_gradient():
    student, teacher = _logits(2, 3, 6), _logits(2, 3, 6)
    cost = _class_cost(6).requires_grad_()
    loss = fastkd.wasserstein_kd_loss(student, teacher, cost=cost, max_iter=5)
    flat = fastkd.wasserstein_kd_loss(student.reshape(6, 6), teacher.reshape(6, 6), cost=cost, max_iter=5)
    assert rel_err(loss, flat) <= 1e-12
    ref_cost = cost.detach().clone().requires_grad_()
    ref = wkd_loss(student.reshape(6, 6), teacher.reshape(6, 6), ref_cost, 1.0, 0.05, 5)
    assert rel_err(_grad(loss, cost), _grad(ref, ref_cost)) <= 1e-9


@each_backend("sinkhorn", "sinkhorn_backward")
@pytest.mark.parametrize("ignore", [False, True], ids=["all-rows", "ignored-rows"])
def test_sinkhorn_kd_matches_reference(backend, ignore):
    n_rows, n_classes, temperature, eps, n_iters = 7, 13, 2.0, 0.1, 20
    dtype = torch.float64 if backend == "torch" else torch.float32
    student, teacher = _logits(n_rows, n_classes), _logits(n_rows, n_classes)
    labels = None
    keep = None
    if ignore:
        labels = torch.randint(0, n_classes, (n_rows,), device=DEVICE)
        labels[[1, 4]] = -100
        keep = labels != -100
    ref_leaf = student.clone().requires_grad_()
    ref = sinkd_loss(ref_leaf, teacher, temperature, eps, n_iters, keep)
    leaf = student.to(dtype).requires_grad_()
    loss = fastkd.sinkhorn_kd_loss(leaf, teacher.to(dtype), temperature=temperature, eps=eps, max_iter=n_iters,
                                   labels=labels, backend=backend)
    assert rel_err(loss, ref) <= OT_LOSS_TOLERANCE[backend]
    grad = _grad(loss, leaf)
    assert rel_err(grad, _grad(ref, ref_leaf)) <= 10 * OT_LOSS_TOLERANCE[backend]
    if ignore:
        assert (grad[~keep] == 0).all()


def test_sinkhorn_kd_with_every_row_ignored_is_zero():
    student = _logits(4, 5).requires_grad_()
    labels = torch.full((4,), -100, device=DEVICE)
    loss = fastkd.sinkhorn_kd_loss(student, _logits(4, 5), labels=labels)
    assert float(loss.detach()) == 0.0
    assert (_grad(loss, student) == 0).all()


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("vocab", [(17, 17), (17, 29), (23, 9)], ids=["same", "teacher-larger", "student-larger"])
def test_uld_matches_sorted_l1_reference(top_k, vocab):
    n_rows, temperature = 6, 1.5
    student, teacher = _logits(n_rows, vocab[0]), _logits(n_rows, vocab[1])
    labels = torch.randint(0, 5, (n_rows,), device=DEVICE)
    labels[2] = -100
    leaf, ref_leaf = student.clone().requires_grad_(), student.clone().requires_grad_()
    loss = fastkd.uld_loss(leaf, teacher, temperature=temperature, top_k=top_k, labels=labels)
    rows = uld_rows(ref_leaf, teacher, temperature, top_k)
    keep = labels != -100
    ref = rows[keep].sum() / keep.sum()
    assert rel_err(loss, ref) <= 1e-12
    assert rel_err(_grad(loss, leaf), _grad(ref, ref_leaf)) <= 1e-12
    per_row = fastkd.uld_loss(student, teacher, temperature=temperature, top_k=top_k, reduction="none")
    assert rel_err(per_row, uld_rows(student, teacher, temperature, top_k)) <= 1e-12


def test_uld_leading_dims_and_fp32():
    student, teacher = _logits(2, 3, 10, dtype=torch.float32), _logits(2, 3, 14, dtype=torch.float32)
    loss = fastkd.uld_loss(student, teacher, reduction="none")
    assert loss.shape == (2, 3) and loss.dtype == torch.float32
    ref = uld_rows(student.reshape(6, 10).double(), teacher.reshape(6, 14).double(), 1.0).reshape(2, 3)
    assert rel_err(loss, ref) <= 1e-6


@pytest.mark.parametrize("call, match", [
    (lambda s, t: fastkd.wasserstein_kd_loss(s, t, cost=torch.rand(5, 5)), r"cost must be a \(6, 6\)"),
    (lambda s, t: fastkd.wasserstein_kd_loss(s, t, cost=-torch.rand(6, 6), validate=True), "cost has negative"),
    (lambda s, t: fastkd.wasserstein_kd_loss(s, t, cost=torch.rand(6, 6), grad="envelope"), "grad must be"),
    (lambda s, t: fastkd.wasserstein_kd_loss(s, t, cost=torch.rand(6, 6), eps=0), "eps must be"),
    (lambda s, t: fastkd.wasserstein_kd_loss(s, t, cost=torch.rand(6, 6), max_iter=0), "max_iter must be"),
    (lambda s, t: fastkd.sinkhorn_kd_loss(s, t, temperature=0.0), "temperature must be"),
    (lambda s, t: fastkd.sinkhorn_kd_loss(s, t[:, :5]), "vocabulary sizes differ"),
    (lambda s, t: fastkd.uld_loss(s, t[:2]), "leading shape"),
    (lambda s, t: fastkd.uld_loss(s, t, top_k=0), "top_k must be"),
    (lambda s, t: fastkd.uld_loss(s, t, reduction="avg"), "reduction must be"),
])
def test_loss_errors_name_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(torch.randn(3, 6), torch.randn(3, 6))
