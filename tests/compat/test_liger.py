"""fastkd.compat.LigerFusedLinearJSDLoss against a float64 transcription of Liger 0.8's definition
(and against Liger itself when it is installed)."""

import pytest
import torch

from conftest import DEVICE
from fastkd.compat import LigerFusedLinearJSDLoss
from peers import skip_reason
from reference import rel_err


def _liger_definition(student_input, student_weight, teacher_input, teacher_weight, labels, weight_hard_loss,
                      weight_soft_loss, beta, ignore_index, temperature):
    student = student_input.double() @ student_weight.double().t()
    teacher = teacher_input.double() @ teacher_weight.double().t()
    hard = torch.nn.functional.cross_entropy(student, labels, ignore_index=ignore_index, reduction="sum")
    pad = teacher.shape[-1] - student.shape[-1]
    student = torch.cat([student, student.new_zeros(student.shape[0], pad)], -1) / temperature
    log_q = torch.log_softmax(student, -1)
    log_p = torch.log_softmax(teacher / temperature, -1)
    if beta == 0:
        jsd = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif beta == 1:
        jsd = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.log((1 - beta) * log_q.exp() + beta * log_p.exp())
        jsd = (beta * log_p.exp() * (log_p - log_m) + (1 - beta) * log_q.exp() * (log_q - log_m)).sum(-1)
    keep = labels != ignore_index
    soft = torch.where(keep, jsd, torch.zeros_like(jsd)).sum()
    count = max(int(keep.sum()), 1)
    return weight_hard_loss * hard / count + weight_soft_loss * soft / count, soft / count, hard / count


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("teacher_extra_rows", [0, 3])
def test_matches_liger_definition(beta, teacher_extra_rows):
    student_input = torch.randn(10, 16, device=DEVICE, requires_grad=True)
    student_weight = (torch.randn(97, 16, device=DEVICE) * 0.3).requires_grad_(True)
    teacher_input = torch.randn(10, 24, device=DEVICE)
    teacher_weight = torch.randn(97 + teacher_extra_rows, 24, device=DEVICE) * 0.3
    labels = torch.randint(0, 97, (10,), device=DEVICE)
    labels[[2, 7]] = -100
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.3, weight_soft_loss=0.7, beta=beta, temperature=1.7,
                                      return_soft_hard_loss=True)
    loss, soft, hard = loss_fn(student_input, student_weight, teacher_input, teacher_weight, labels)
    grads = torch.autograd.grad(loss, (student_input, student_weight))
    ref_input = student_input.detach().double().requires_grad_(True)
    ref_weight = student_weight.detach().double().requires_grad_(True)
    ref, ref_soft, ref_hard = _liger_definition(ref_input, ref_weight, teacher_input, teacher_weight, labels, 0.3,
                                                0.7, beta, -100, 1.7)
    ref_grads = torch.autograd.grad(ref, (ref_input, ref_weight))
    assert rel_err(loss, ref) < 2e-5 and rel_err(soft, ref_soft) < 2e-5 and rel_err(hard, ref_hard) < 2e-5
    assert all(rel_err(a, b) < 2e-5 for a, b in zip(grads, ref_grads))


@pytest.mark.skipif(skip_reason("liger_kernel") is not None, reason=str(skip_reason("liger_kernel")))
@pytest.mark.parametrize("teacher_extra_rows", [0, 3])
def test_matches_liger_itself(teacher_extra_rows):
    # Liger's chunked losses are plain PyTorch: they run on the CPU too.
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss as Liger

    student_input = torch.randn(64, 32, device=DEVICE, requires_grad=True)
    student_weight = (torch.randn(500, 32, device=DEVICE) * 0.3).requires_grad_(True)
    teacher_input = torch.randn(64, 48, device=DEVICE)
    teacher_weight = torch.randn(500 + teacher_extra_rows, 48, device=DEVICE) * 0.3
    labels = torch.randint(0, 500, (64,), device=DEVICE)
    labels[:5] = -100
    options = dict(beta=0.3, temperature=1.5, weight_hard_loss=0.4, weight_soft_loss=0.6, return_soft_hard_loss=True)
    ours = LigerFusedLinearJSDLoss(**options)(student_input, student_weight, teacher_input, teacher_weight, labels)
    theirs = Liger(compiled=False, **options)(student_input, student_weight, teacher_input, teacher_weight, labels)
    grads = [torch.autograd.grad(out[0], (student_input, student_weight)) for out in (ours, theirs)]
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(ours, theirs))
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(*grads))
