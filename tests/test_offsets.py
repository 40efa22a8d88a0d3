"""Rows that start beyond element 2³¹: the kernels' offsets must be 64-bit.

A 4 GiB bf16 buffer is reserved with torch.empty but only the few rows used are ever touched, so
this runs in a few hundred MiB on the CPU (and on a GPU)."""

import pytest
import torch

import fastkd
from conftest import BACKENDS, DEVICE
from reference import loss_and_grad, rel_err

VOCAB = 1000


@pytest.fixture(scope="module")
def huge_buffer():
    return torch.empty(2**31 + 4 * VOCAB, dtype=torch.bfloat16, device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_rows_past_2_pow_31(huge_buffer, backend, divergence):
    # Row k starts at element k·2³⁰: the last row lies past 2³¹ (byte offset 2³²).
    student = huge_buffer.as_strided((3, VOCAB), (2**30, 1))
    student.copy_(torch.randn(3, VOCAB, device=DEVICE) * 2)
    teacher = huge_buffer.as_strided((3, VOCAB), (2**30, 1), storage_offset=2 * VOCAB)
    teacher.copy_(torch.randn(3, VOCAB, device=DEVICE) * 2)
    student.requires_grad_(True)
    loss = fastkd.kd_loss(student, teacher, divergence=divergence, reduction="sum", backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    ref_loss, ref_grad = loss_and_grad(student, teacher, divergence=divergence, reduction="sum")
    assert rel_err(loss, ref_loss) < 5e-6
    assert rel_err(grad, ref_grad) < 1.6e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_3d_rows_past_2_pow_31(huge_buffer, backend):
    # (B, T, V) addressing: batch stride 2³⁰, so batch 2 starts past 2³¹.
    student = huge_buffer.as_strided((3, 2, VOCAB), (2**30, VOCAB, 1))
    student.copy_(torch.randn(3, 2, VOCAB, device=DEVICE))
    teacher = torch.randn(3, 2, VOCAB, device=DEVICE)
    loss = fastkd.kd_loss(student, teacher, divergence="reverse_kl", reduction="none", backend=backend)
    ref_loss, _ = loss_and_grad(student, teacher, divergence="reverse_kl", reduction="none")
    assert rel_err(loss, ref_loss) < 5e-6
