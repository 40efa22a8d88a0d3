"""fastkd.kd_loss against the float64 reference: every divergence and backend, awkward shapes,
dtypes, temperatures, ignored rows, masked vocabulary, extreme logits, layouts, reductions."""

import math

import pytest
import torch

import fastkd
from conftest import DEVICE, TOLERANCE, each_backend
from reference import allowed_errors, loss_and_grad, rel_err

DIVERGENCES = fastkd.DIVERGENCES


def _logits(*shape, dtype=torch.float32, scale=3.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)


def _check(student, teacher, backend, grad_output=None, loss_tol=None, grad_tol=None,
           finite_columns=None, **options):
    """Loss and gradient of kd_loss(**options) against the float64 reference; returns both.
    ``finite_columns`` is passed to the reference only (see reference.kd_loss)."""
    student = student.detach().requires_grad_(True)
    loss = fastkd.kd_loss(student, teacher, backend=backend, **options)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    (grad,) = torch.autograd.grad(loss, student, grad_output)
    ref_options = dict(options, finite_columns=finite_columns)
    ref_loss, ref_grad = loss_and_grad(student, teacher, grad_output, **ref_options)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert grad.dtype == student.dtype and grad.shape == student.shape
    budget_loss, budget_grad = allowed_errors(student, teacher, grad_output, ref_loss, ref_grad,
                                              TOLERANCE, **ref_options)
    assert rel_err(loss, ref_loss) <= (loss_tol or budget_loss)
    assert rel_err(grad, ref_grad) <= (grad_tol or budget_grad)
    return loss, grad


@each_backend("kd_rows")
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("n_rows,vocab", [(1, 1), (3, 7), (64, 1000), (3, 32003)])
def test_every_divergence_matches_reference(backend, divergence, n_rows, vocab):
    student, teacher = _logits(n_rows, vocab), _logits(n_rows, vocab)
    grad_output = torch.rand(n_rows, device=DEVICE) + 0.5  # random upstream gradient per row
    _check(student, teacher, backend, grad_output, divergence=divergence, temperature=2.0,
           reduction="none")


@each_backend("kd_rows")
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("temperature_squared", [False, True])
def test_temperatures(backend, divergence, temperature, temperature_squared):
    _check(_logits(5, 333), _logits(5, 333), backend, divergence=divergence, temperature=temperature,
           temperature_squared=temperature_squared, beta=0.3, skew=0.2)


@each_backend("kd_rows")
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("student_dtype,teacher_dtype", [
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float32, torch.bfloat16)])
def test_low_precision_inputs(backend, divergence, student_dtype, teacher_dtype):
    # The reference reads the same rounded inputs, so the loss stays at fp32 accuracy; only the
    # gradient is rounded to the student's dtype.
    _check(_logits(6, 517, dtype=student_dtype), _logits(6, 517, dtype=teacher_dtype), backend,
           divergence=divergence, temperature=1.5)


@each_backend("kd_rows")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_ignored_rows_and_mean_over_the_rest(backend, divergence):
    labels = torch.tensor([[3, -100, 7, -100], [-100, 1, 2, 0]], device=DEVICE)
    loss, grad = _check(_logits(2, 4, 301), _logits(2, 4, 301), backend, divergence=divergence,
                        labels=labels)
    assert (grad[labels == -100] == 0).all()


@each_backend("kd_rows")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero(backend, reduction):
    student = _logits(3, 50).requires_grad_(True)
    labels = torch.full((3,), 7, device=DEVICE)
    loss = fastkd.kd_loss(student, _logits(3, 50), labels=labels, ignore_index=7, reduction=reduction,
                          backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss))
    (grad,) = torch.autograd.grad(loss.sum(), student)
    assert torch.equal(grad, torch.zeros_like(grad))


@each_backend("kd_rows")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_input(backend, reduction):
    student = _logits(0, 11).requires_grad_(True)
    loss = fastkd.kd_loss(student, _logits(0, 11), reduction=reduction, backend=backend)
    assert loss.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss.sum(), student)
    assert grad.shape == (0, 11)


@each_backend("kd_rows")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_vocabulary_entries(backend, divergence):
    # -inf in both at the same columns (masked vocabulary): zero probability, no NaN, and the
    # same loss as the distributions restricted to the other columns.
    vocab = 257
    finite = torch.rand(vocab) > 0.3
    finite[0] = True
    student, teacher = _logits(4, vocab), _logits(4, vocab)
    student[:, ~finite.to(DEVICE)] = -math.inf
    teacher[:, ~finite.to(DEVICE)] = -math.inf
    _, grad = _check(student, teacher, backend, divergence=divergence, finite_columns=finite.to(DEVICE))
    assert (grad[:, ~finite.to(DEVICE)] == 0).all()


@each_backend("kd_rows")
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"])
def test_teacher_only_masked_entries(backend, divergence):
    # Teacher -inf where the student is finite: p = 0 there, q > 0; every divergence whose
    # support condition holds stays finite (reverse KL would be +inf by definition).
    student, teacher = _logits(3, 129), _logits(3, 129)
    teacher[:, ::5] = -math.inf
    student = student.requires_grad_(True)
    loss = fastkd.kd_loss(student, teacher, divergence=divergence, backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    ref_teacher = teacher.double().clone()
    ref_teacher[:, ::5] = -1e300  # exp underflows to exactly 0 in float64, without -inf arithmetic
    ref_loss, ref_grad = loss_and_grad(student, ref_teacher, divergence=divergence)
    assert rel_err(loss, ref_loss) <= TOLERANCE[torch.float32]
    assert rel_err(grad, ref_grad) <= TOLERANCE[torch.float32]


@each_backend("kd_rows")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits_stay_finite(backend, divergence):
    student = (torch.randint(-1, 2, (4, 300), device=DEVICE) * 1e4).float()
    teacher = (torch.randint(-1, 2, (4, 300), device=DEVICE) * 1e4).float()
    student += torch.randn_like(student)
    teacher += torch.randn_like(teacher)
    _check(student, teacher, backend, divergence=divergence)


@each_backend("kd_rows")
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_non_contiguous_and_shifted_layouts(backend, divergence):
    base_s, base_t = _logits(3, 9, 200), _logits(3, 9, 200)
    # shifted LLM logits (a (B, T, V) view that cannot be flattened without a copy)
    _check(base_s[:, :-1], base_t[:, 1:], backend, divergence=divergence)
    # transposed leading dims and a strided vocabulary
    _check(base_s.transpose(0, 1), base_t.transpose(0, 1), backend, divergence=divergence)
    _check(base_s[..., ::2], base_t[..., ::2], backend, divergence=divergence)
    # 4-D and 1-D inputs
    _check(_logits(2, 3, 4, 50), _logits(2, 3, 4, 50), backend, divergence=divergence)
    _check(_logits(50), _logits(50), backend, divergence=divergence)


@each_backend("kd_rows")
def test_normalizer_replaces_the_row_count(backend):
    labels = torch.tensor([1, -100, 2, 3, -100], device=DEVICE)
    for normalizer in (7, 2.5, torch.tensor(11, device=DEVICE)):
        _check(_logits(5, 64), _logits(5, 64), backend, divergence="reverse_kl", labels=labels,
               normalizer=normalizer)


@each_backend("kd_rows")
def test_teacher_gets_no_gradient(backend):
    student = _logits(4, 33).requires_grad_(True)
    teacher = _logits(4, 33).requires_grad_(True)
    loss = fastkd.kd_loss(student, teacher, divergence="jsd", backend=backend)
    loss.backward()
    assert student.grad is not None and teacher.grad is None


def test_jsd_end_points_are_exactly_the_kls():
    student, teacher = _logits(4, 40), _logits(4, 40)
    for beta, divergence in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = fastkd.kd_loss(student, teacher, divergence="jsd", beta=beta, backend="torch")
        assert torch.equal(jsd, fastkd.kd_loss(student, teacher, divergence=divergence, backend="torch"))


def test_kd_loss_module_matches_function():
    student, teacher = _logits(4, 40), _logits(4, 40)
    module = fastkd.KDLoss("skew_reverse_kl", temperature=2.0, skew=0.3, reduction="sum")
    assert "skew_reverse_kl" in repr(module)
    expected = fastkd.kd_loss(student, teacher, divergence="skew_reverse_kl", temperature=2.0, skew=0.3,
                              reduction="sum")
    assert torch.equal(module(student, teacher), expected)
