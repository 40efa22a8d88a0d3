"""fastkd.compat.generalized_jsd_loss against an independent float64 transcription of TRL's
GKDTrainer.generalized_jsd_loss, and against TRL itself when it is installed."""

import pytest
import torch

from conftest import DEVICE
from fastkd.compat import generalized_jsd_loss
from peers import skip_reason, trl_functions
from reference import rel_err


def _trl_formula(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                 reduction="batchmean", num_items_in_batch=None):
    """TRL's definition, element-wise in float64."""
    log_q = torch.log_softmax(student_logits.double() / temperature, -1)
    log_p = torch.log_softmax(teacher_logits.double() / temperature, -1)
    if beta == 0:
        jsd = log_p.exp() * (log_p - log_q)
    elif beta == 1:
        jsd = log_q.exp() * (log_q - log_p)
    else:
        log_m = torch.log(beta * log_p.exp() + (1 - beta) * log_q.exp())
        jsd = beta * log_p.exp() * (log_p - log_m) + (1 - beta) * log_q.exp() * (log_q - log_m)
    mask = None
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if num_items_in_batch is not None:
        return jsd.sum() / num_items_in_batch
    if reduction == "batchmean":
        return jsd.sum() / (max(int(mask.sum()), 1) if mask is not None else max(jsd.size(0), 1))
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def _case(with_labels):
    student = torch.randn(2, 6, 71, device=DEVICE) * 2
    teacher = torch.randn(2, 6, 71, device=DEVICE) * 2
    labels = None
    if with_labels:
        labels = torch.randint(0, 71, (2, 6), device=DEVICE)
        labels[0, :2] = -100
        labels[1, 4:] = -100
    return student, teacher, labels


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_matches_trl_formula(beta, reduction, with_labels):
    student, teacher, labels = _case(with_labels)
    student.requires_grad_(True)
    ours = generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=1.7,
                                reduction=reduction)
    ref_student = student.detach().double().requires_grad_(True)
    ref = _trl_formula(ref_student, teacher, labels, beta, 1.7, reduction)
    assert ours.shape == ref.shape and ours.dtype == student.dtype
    assert rel_err(ours, ref) < 5e-6
    (grad,) = torch.autograd.grad(ours.sum(), student)
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_student)
    assert rel_err(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("num_items", [7, torch.tensor(13)])
def test_num_items_in_batch(num_items):
    student, teacher, labels = _case(with_labels=True)
    ours = generalized_jsd_loss(student, teacher, labels=labels, beta=0.3, num_items_in_batch=num_items)
    ref = _trl_formula(student, teacher, labels, 0.3, num_items_in_batch=num_items)
    assert rel_err(ours, ref) < 5e-6


def test_all_tokens_masked_is_zero():
    student, teacher, labels = _case(with_labels=True)
    labels[:] = -100
    for reduction in ("batchmean", "mean", "sum"):
        assert generalized_jsd_loss(student, teacher, labels=labels, reduction=reduction).item() == 0.0


@pytest.mark.skipif(skip_reason("trl") is not None, reason=str(skip_reason("trl")))
def test_matches_trl_itself():
    # TRL 1.16's GKDTrainer lives in trl.experimental and imports transformers: its loss is taken
    # from the installed source (see peers.py).
    (trl_loss,) = trl_functions("experimental/gkd/gkd_trainer.py", "GKDTrainer.generalized_jsd_loss")
    student, teacher, labels = _case(with_labels=True)
    for beta in (0.0, 0.5, 1.0):
        theirs = trl_loss(student, teacher, labels=labels, beta=beta)
        assert rel_err(generalized_jsd_loss(student, teacher, labels=labels, beta=beta), theirs) < 1e-5


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_float64_inputs_keep_float64_precision(reduction):
    student, teacher, labels = _case(with_labels=True)
    student, teacher = student.double(), teacher.double()
    ours = generalized_jsd_loss(student, teacher, labels=labels, beta=0.4, temperature=1.3, reduction=reduction)
    ref = _trl_formula(student, teacher, labels, 0.4, 1.3, reduction)
    assert ours.dtype == torch.float64 and rel_err(ours, ref) < 1e-10


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_teacher_gradient_flows_as_in_trl(reduction, beta):
    student, teacher, labels = _case(with_labels=True)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    ours = generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=2.0, reduction=reduction)
    grads = torch.autograd.grad(ours.sum(), (student, teacher))
    ref_student = student.detach().double().requires_grad_(True)
    ref_teacher = teacher.detach().double().requires_grad_(True)
    ref = _trl_formula(ref_student, ref_teacher, labels, beta, 2.0, reduction)
    ref_grads = torch.autograd.grad(ref.sum(), (ref_student, ref_teacher))
    assert rel_err(ours, ref) < 5e-6
    assert all(rel_err(grad, ref_grad) < 1e-5 for grad, ref_grad in zip(grads, ref_grads))
