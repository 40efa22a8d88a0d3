"""fastkd.compat.mdistiller against float64 transcriptions of mdistiller's kd_loss / dkd_loss (with
the logit-standardisation paper's ``logit_stand``), values and gradients, and the documented
differences from the reference code."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastkd
from conftest import DEVICE, TOLERANCE
from fastkd.compat import mdistiller
from reference import rel_err


def _standardized(z):
    return (z - z.mean(dim=-1, keepdim=True)) / (1e-7 + z.std(dim=-1, keepdim=True))


def reference_kd(logits_student, logits_teacher, temperature, logit_stand):
    """mdistiller's kd_loss, transcribed: batch mean of the row KL, times T²."""
    if logit_stand:
        logits_student, logits_teacher = _standardized(logits_student), _standardized(logits_teacher)
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    return F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean() * temperature ** 2


def reference_dkd(logits_student, logits_teacher, target, alpha, beta, temperature, logit_stand):
    """mdistiller's dkd_loss, transcribed: the target masked with −1000 in the non-target softmaxes."""
    if logit_stand:
        logits_student, logits_teacher = _standardized(logits_student), _standardized(logits_teacher)
    gt = torch.zeros_like(logits_student).scatter_(1, target[:, None], 1).bool()
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)

    def two_masses(pred):
        return torch.cat([(pred * gt).sum(1, keepdim=True), (pred * ~gt).sum(1, keepdim=True)], dim=1)

    tckd = F.kl_div(torch.log(two_masses(pred_student)), two_masses(pred_teacher), reduction="sum")
    teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt, dim=1)
    log_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_student_part2, teacher_part2, reduction="sum")
    return (alpha * tckd + beta * nckd) * temperature ** 2 / target.shape[0]


def _problem(n_rows, n_classes, dtype=torch.float32, scale=3.0):
    student = (torch.randn(n_rows, n_classes, dtype=torch.float64) * scale).to(DEVICE, dtype)
    teacher = (torch.randn(n_rows, n_classes, dtype=torch.float64) * scale).to(DEVICE, dtype)
    target = torch.randint(0, n_classes, (n_rows,), device=DEVICE)
    target[0] = student[0].argmax()  # the target at the student's row max
    target[1] = teacher[1].argmin()  # and at the teacher's row min
    return student, teacher, target


def _loss_and_grad(loss, student):
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad


def _reference_and_grad(fn, student, *args, **kwargs):
    leaf = student.detach().double().requires_grad_(True)
    return _loss_and_grad(fn(leaf, *args, **kwargs), leaf)


# Rows per C: the float64 reference of the widest C stays cheap.
ROWS = {10: 7, 100: 7, 1000: 5, 21843: 3}


@pytest.mark.parametrize("logit_stand", [False, True])
@pytest.mark.parametrize("n_classes", [10, 100, 1000, 21843])
def test_dkd_matches_the_reference(n_classes, logit_stand):
    student, teacher, target = _problem(ROWS[n_classes], n_classes)
    student.requires_grad_(True)
    loss, grad = _loss_and_grad(mdistiller.dkd_loss(student, teacher, target, 1.5, 6.0, 3.0, logit_stand), student)
    ref, ref_grad = _reference_and_grad(reference_dkd, student, teacher.double(), target, 1.5, 6.0, 3.0,
                                        logit_stand)
    assert loss.shape == () and loss.dtype == torch.float32
    assert rel_err(loss, ref) < 2e-5 and rel_err(grad, ref_grad) < 2e-5


@pytest.mark.parametrize("logit_stand", [False, True])
@pytest.mark.parametrize("n_classes", [10, 100, 1000, 21843])
def test_kd_matches_the_reference(n_classes, logit_stand):
    student, teacher, _ = _problem(ROWS[n_classes], n_classes)
    student.requires_grad_(True)
    loss, grad = _loss_and_grad(mdistiller.kd_loss(student, teacher, 4.0, logit_stand), student)
    ref, ref_grad = _reference_and_grad(reference_kd, student, teacher.double(), 4.0, logit_stand)
    assert loss.shape == () and loss.dtype == torch.float32
    assert rel_err(loss, ref) < 2e-5 and rel_err(grad, ref_grad) < 2e-5


def test_kd_without_logit_stand_takes_the_original_three_arguments():
    student, teacher, _ = _problem(5, 100)
    ref = reference_kd(student.double(), teacher.double(), 2.0, False)
    assert rel_err(mdistiller.kd_loss(student, teacher, 2.0), ref) < 2e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("loss_name", ["kd", "dkd"])
@pytest.mark.parametrize("logit_stand", [False, True])
def test_dtypes(dtype, loss_name, logit_stand):
    student, teacher, target = _problem(6, 1000, dtype)
    student.requires_grad_(True)
    if loss_name == "kd":
        ours = mdistiller.kd_loss(student, teacher, 2.0, logit_stand)
        ref, ref_grad = _reference_and_grad(reference_kd, student, teacher.double(), 2.0, logit_stand)
    else:
        ours = mdistiller.dkd_loss(student, teacher, target, 1.0, 8.0, 2.0, logit_stand)
        ref, ref_grad = _reference_and_grad(reference_dkd, student, teacher.double(), target, 1.0, 8.0, 2.0,
                                            logit_stand)
    loss, grad = _loss_and_grad(ours, student)
    assert loss.dtype == dtype and grad.dtype == dtype  # the reference's dtypes
    # float64: the result of float64 arithmetic in another order; the others: rounded to dtype.
    tolerance = 1e-9 if dtype == torch.float64 else TOLERANCE[dtype]
    assert rel_err(loss, ref) < tolerance and rel_err(grad, ref_grad) < tolerance


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("logit_stand", [False, True])
def test_logits_of_plus_minus_100(temperature, logit_stand):
    student, teacher, target = _problem(8, 1000)
    student = torch.where(torch.rand_like(student) < 0.5, -100.0, 100.0) * torch.rand_like(student).sqrt()
    teacher = (teacher * 40).clamp(-100, 100)
    student[2] = -100.0
    student[2, target[2]] = 100.0  # the student's target 200 above every other class
    teacher[3] = -100.0
    teacher[3, target[3]] = 100.0  # and the teacher's
    student.requires_grad_(True)
    for ours, fn, args in [
        (mdistiller.dkd_loss(student, teacher, target, 1.0, 8.0, temperature, logit_stand), reference_dkd,
         (teacher.double(), target, 1.0, 8.0, temperature, logit_stand)),
        (mdistiller.kd_loss(student, teacher, temperature, logit_stand), reference_kd,
         (teacher.double(), temperature, logit_stand)),
    ]:
        loss, grad = _loss_and_grad(ours, student)
        ref, ref_grad = _reference_and_grad(fn, student, *args)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert rel_err(loss, ref) < 2e-5 and rel_err(grad, ref_grad) < 2e-5


def test_the_reference_in_float32_overflows_where_fastkd_does_not():
    """The documented TCKD difference: a target that takes all the float32 mass."""
    student, teacher, target = _problem(4, 100)
    student[1] = -100.0
    student[1, target[1]] = 100.0
    ours = mdistiller.dkd_loss(student, teacher, target, 1.0, 8.0, 1.0)
    assert not torch.isfinite(reference_dkd(student, teacher, target, 1.0, 8.0, 1.0, False))
    assert torch.isfinite(ours)
    assert rel_err(ours, reference_dkd(student.double(), teacher.double(), target, 1.0, 8.0, 1.0, False)) < 2e-5


@pytest.mark.parametrize("loss_name", ["kd", "dkd"])
def test_constant_rows_under_logit_stand(loss_name):
    student, teacher, target = _problem(5, 100)
    student[1] = 2.5  # std 0: the row standardises to zeros, a uniform softmax
    teacher[2] = -7.0
    student.requires_grad_(True)
    if loss_name == "kd":
        fn, args = reference_kd, (teacher.double(), 2.0, True)
        ours = mdistiller.kd_loss(student, teacher, 2.0, True)
    else:
        fn, args = reference_dkd, (teacher.double(), target, 1.0, 8.0, 2.0, True)
        ours = mdistiller.dkd_loss(student, teacher, target, 1.0, 8.0, 2.0, True)
    loss, grad = _loss_and_grad(ours, student)
    # torch.std's backward takes the derivative at std = 0 as 0, as fastkd does: finite, and equal.
    ref, ref_grad = _reference_and_grad(fn, student, *args)
    assert torch.isfinite(grad).all() and torch.isfinite(ref_grad).all()
    assert rel_err(loss, ref) < 2e-5 and rel_err(grad, ref_grad) < 2e-5


def test_target_minus_100_drops_the_row_from_the_mean():
    student, teacher, target = _problem(6, 50)
    target[4] = -100
    student.requires_grad_(True)
    loss, grad = _loss_and_grad(mdistiller.dkd_loss(student, teacher, target, 1.0, 8.0, 4.0), student)
    keep = torch.tensor([0, 1, 2, 3, 5], device=DEVICE)
    leaf = student.detach().double().requires_grad_(True)
    ref = reference_dkd(leaf[keep], teacher.double()[keep], target[keep], 1.0, 8.0, 4.0, False)
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    assert rel_err(loss, ref) < 2e-5 and rel_err(grad, ref_grad) < 2e-5
    assert torch.equal(grad[4], torch.zeros_like(grad[4]))


def test_kdloss_module_with_dkd_matches_the_reference():
    student, teacher, target = _problem(9, 100)
    student.requires_grad_(True)
    module = fastkd.KDLoss(divergence="dkd", temperature=4.0, alpha=1.0, beta=8.0, temperature_squared=True)
    loss, grad = _loss_and_grad(module(student, teacher, target), student)
    ref, ref_grad = _reference_and_grad(reference_dkd, student, teacher.double(), target, 1.0, 8.0, 4.0, False)
    assert rel_err(loss, ref) < 2e-5 and rel_err(grad, ref_grad) < 2e-5
    standardized = fastkd.KDLoss(divergence="dkd", temperature=2.0, temperature_squared=True, standardize=True)
    ref = reference_dkd(student.double(), teacher.double(), target, 1.0, 8.0, 2.0, True)
    assert rel_err(standardized(student, teacher, target), ref) < 2e-5


@pytest.mark.parametrize("call,error,words", [
    (lambda s, t, y: mdistiller.dkd_loss(s[None], t[None], y, 1.0, 8.0, 4.0), ValueError, "logits_student must be"),
    (lambda s, t, y: mdistiller.kd_loss(s, t[:, :-1], 4.0), ValueError, "vocabulary sizes differ"),
    (lambda s, t, y: mdistiller.kd_loss(s.long(), t, 4.0), TypeError, "logits_student"),
    (lambda s, t, y: mdistiller.dkd_loss(s, t, y.double(), 1.0, 8.0, 4.0), TypeError, "target must be an integer"),
    (lambda s, t, y: mdistiller.dkd_loss(s, t, y[:-1], 1.0, 8.0, 4.0), ValueError, "target must be"),
    (lambda s, t, y: mdistiller.dkd_loss(s, t, y, -1.0, 8.0, 4.0), ValueError, "alpha"),
    (lambda s, t, y: mdistiller.dkd_loss(s, t, y, 1.0, math.nan, 4.0), ValueError, "beta"),
    (lambda s, t, y: mdistiller.kd_loss(s, t, 0.0), ValueError, "temperature"),
    (lambda s, t, y: mdistiller.kd_loss(s, t, 4.0, "yes"), TypeError, "logit_stand"),
])
def test_bad_arguments_name_the_argument(call, error, words):
    with pytest.raises(error, match=words):
        call(*_problem(3, 9))
