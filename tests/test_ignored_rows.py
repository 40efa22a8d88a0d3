"""Ignored rows with extreme logits, through every backward of every backend.

Forward passes store zero statistics for ignored rows; a backward that exponentiates a logit of
1e4 against those zeros gets inf, and inf·0 = NaN (found by Liger's own test shapes). Every loss
below gets ignored rows whose logits reach ±1e4 next to active rows of realistic size, and must
return finite gradients equal to the float64 reference, with exact zeros on the ignored rows.
"""

import pytest
import torch

import fastkd
from conftest import DEVICE, backends_for, each_backend
from reference import fused_linear_loss, loss_and_grad, rel_err, sparse_rows

IGNORED = (0, 3)  # rows whose label is -100


def _labels(n_rows, vocab):
    labels = torch.randint(0, vocab, (n_rows,), device=DEVICE)
    labels[list(IGNORED)] = -100
    return labels


def _logits_with_extreme_ignored_rows(n_rows, vocab):
    logits = torch.randn(n_rows, vocab, device=DEVICE) * 5
    for row in IGNORED:
        logits[row] = torch.randint(-1, 2, (vocab,), device=DEVICE).float() * 1e4
    return logits


def _active_rows_only(row_losses, labels, *row_tensors):
    """The float64 reference evaluated on the active rows only (an ignored row's loss is 0 by
    definition; evaluating its formula would put inf·0 into the reference's own autograd)."""
    keep = labels != -100
    rows = row_losses(*(tensor[keep] for tensor in row_tensors))
    return rows.new_zeros(labels.shape).index_put((keep,), rows)


def _assert_zero_on_ignored(grad):
    for row in IGNORED:
        assert torch.equal(grad[row], torch.zeros_like(grad[row]))


@each_backend("kd_rows")
@pytest.mark.parametrize("divergence", fastkd.DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_kd_loss(backend, divergence, reduction):
    student = _logits_with_extreme_ignored_rows(6, 97).requires_grad_(True)
    teacher = _logits_with_extreme_ignored_rows(6, 97)
    labels = _labels(6, 97)
    options = dict(divergence=divergence, temperature=2.0, labels=labels, reduction=reduction)
    loss = fastkd.kd_loss(student, teacher, backend=backend, **options)
    grad_output = torch.rand(loss.shape, device=DEVICE) + 0.5
    (grad,) = torch.autograd.grad(loss, student, grad_output)
    ref_loss, ref_grad = loss_and_grad(student, teacher, grad_output, **options)
    assert torch.isfinite(grad).all()
    _assert_zero_on_ignored(grad)
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(grad, ref_grad) < 1e-4


def _extreme_linear_problem(n_rows, hidden, vocab):
    """Hidden states and weights whose logits reach ~±1e4 on the ignored rows, ~±10 elsewhere."""
    weight = torch.randn(vocab, hidden, device=DEVICE) * 0.5
    states = torch.randn(n_rows, hidden, device=DEVICE)
    for row in IGNORED:
        states[row] *= 3000.0
    return states, weight


@each_backend("kd_rows", "ce")
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_with_hard_loss(backend, divergence, reduction):
    student_hidden, student_weight = _extreme_linear_problem(6, 16, 83)
    teacher_hidden, teacher_weight = _extreme_linear_problem(6, 12, 83)
    labels = _labels(6, 83)
    student_hidden.requires_grad_(True)
    student_weight.requires_grad_(True)
    options = dict(divergence=divergence, hard_weight=0.5, reduction=reduction, temperature=1.5)
    loss = fastkd.fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                       backend=backend, **options)
    grad_output = torch.rand(loss.shape, device=DEVICE) + 0.5
    grads = torch.autograd.grad(loss, (student_hidden, student_weight), grad_output)
    ref_hidden = student_hidden.detach().double().requires_grad_(True)
    ref_weight = student_weight.detach().double().requires_grad_(True)
    ref = fused_linear_loss(ref_hidden, ref_weight, teacher_hidden.double(), teacher_weight.double(), labels,
                            **options)
    ref_grads = torch.autograd.grad(ref, (ref_hidden, ref_weight), grad_output.double())
    assert all(torch.isfinite(grad).all() for grad in grads)
    _assert_zero_on_ignored(grads[0])
    assert rel_err(loss, ref) < 2e-5
    assert all(rel_err(grad, ref_grad) < 1e-4 for grad, ref_grad in zip(grads, ref_grads))


def test_the_reported_repro():
    # fastkd issue: W = eye·100 made row 0 of x.grad NaN on the torch and C++ backends.
    for backend in backends_for("ce"):
        weight = torch.eye(2, device=DEVICE) * 100
        x = torch.eye(2, device=DEVICE).requires_grad_()
        fastkd.fused_linear_kd_loss(x, weight, x.detach(), weight, torch.tensor([-100, 1], device=DEVICE),
                                    hard_weight=0.5, backend=backend).backward()
        assert torch.equal(x.grad[0], torch.zeros(2, device=DEVICE)), backend
        assert torch.isfinite(x.grad).all(), backend


def _sparse_teacher(n_rows, vocab, top_k):
    logprobs, indices = torch.log_softmax(torch.randn(n_rows, vocab, device=DEVICE) * 3, -1).topk(top_k, dim=-1)
    return indices, logprobs


@each_backend("sparse_kd")
@pytest.mark.parametrize("missing_mass", ["renormalize", "tail"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_sparse_kd_loss(backend, missing_mass, divergence):
    student = _logits_with_extreme_ignored_rows(6, 50).requires_grad_(True)
    indices, logprobs = _sparse_teacher(6, 50, 7)
    labels = _labels(6, 50)
    loss = fastkd.sparse_kd_loss(student, indices, logprobs, labels=labels, divergence=divergence,
                                 missing_mass=missing_mass, reduction="none", backend=backend)
    grad_output = torch.rand(6, device=DEVICE) + 0.5
    (grad,) = torch.autograd.grad(loss, student, grad_output)
    ref_student = student.detach().double().requires_grad_(True)
    ref = _active_rows_only(lambda *rows: sparse_rows(*rows, divergence, 1.0, missing_mass), labels,
                            ref_student, indices, logprobs)
    (ref_grad,) = torch.autograd.grad(ref, ref_student, grad_output.double())
    assert torch.isfinite(grad).all()
    _assert_zero_on_ignored(grad)
    assert rel_err(loss, ref) < 1e-5 and rel_err(grad, ref_grad) < 1e-4


@each_backend("sparse_kd", "ce")
@pytest.mark.parametrize("missing_mass", ["renormalize", "tail"])
def test_fused_linear_sparse_with_hard_loss_per_row(backend, missing_mass):
    hidden, weight = _extreme_linear_problem(6, 16, 60)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    indices, logprobs = _sparse_teacher(6, 60, 5)
    labels = _labels(6, 60)
    loss = fastkd.fused_linear_sparse_kd_loss(hidden, weight, indices, logprobs, labels, hard_weight=0.5,
                                              missing_mass=missing_mass, reduction="none", backend=backend)
    grad_output = torch.rand(6, device=DEVICE) + 0.5
    grads = torch.autograd.grad(loss, (hidden, weight), grad_output)
    ref_hidden = hidden.detach().double().requires_grad_(True)
    ref_weight = weight.detach().double().requires_grad_(True)
    def rows(logits, indices, logprobs, labels):
        soft = sparse_rows(logits, indices, logprobs, "forward_kl", 1.0, missing_mass)
        return soft + 0.5 * torch.nn.functional.cross_entropy(logits, labels, reduction="none")

    ref = _active_rows_only(rows, labels, ref_hidden @ ref_weight.t(), indices, logprobs, labels)
    ref_grads = torch.autograd.grad(ref, (ref_hidden, ref_weight), grad_output.double())
    assert all(torch.isfinite(grad).all() for grad in grads)
    _assert_zero_on_ignored(grads[0])
    assert rel_err(loss, ref) < 2e-5
    assert all(rel_err(grad, ref_grad) < 1e-4 for grad, ref_grad in zip(grads, ref_grads))
