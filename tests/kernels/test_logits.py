"""The logits families' kernels (kd_rows, kl_div) on every backend the registry lists here: the
custom ops under torch.library.opcheck and torch.compile(fullgraph=True), gradcheck in float64,
and rows beyond element 2³¹. The numbers themselves are checked against float64 through the
public functions (tests/test_functional.py, test_properties.py, compat/test_torch_kl.py)."""

import pytest
import torch

import fastkd
from conftest import DEVICE, TOLERANCE, each_backend
from fastkd.divergences import DivergenceSpec
from fastkd.ops.schema import flatten
from fastkd.options import KDOptions, KLDivOptions
from reference import kd_loss as reference_kd_loss
from reference import loss_and_grad, rel_err

kd_rows = torch.ops.fastkd.kd_rows.default


def _options(divergence, temperature, param, backend):
    """The op's primitive option arguments, in schema order."""
    return flatten(KDOptions(DivergenceSpec(divergence, temperature, param), -100, backend))


kl_div_rows = torch.ops.fastkd.kl_div_rows.default


@each_backend("kd_rows")
@pytest.mark.parametrize("divergence,param", [("forward_kl", 0.0), ("reverse_kl", 0.0), ("jsd", 0.3),
                                              ("skew_forward_kl", 0.1), ("skew_reverse_kl", 0.2),
                                              ("tvd", 0.0)])
def test_kd_rows_opcheck(backend, divergence, param):
    student = torch.randn(4, 37, device=DEVICE, requires_grad=True)
    teacher = torch.randn(4, 37, device=DEVICE)
    labels = torch.tensor([0, -100, 2, 3], device=DEVICE)
    torch.library.opcheck(kd_rows, (student, teacher, labels, *_options(divergence, 2.0, param, backend)))
    torch.library.opcheck(kd_rows, (student, teacher, None, *_options(divergence, 1.0, param, backend)))


@each_backend("kd_rows")
def test_kd_rows_opcheck_on_shifted_3d_view(backend):
    logits = torch.randn(2, 5, 19, device=DEVICE, requires_grad=True)
    teacher = torch.randn(2, 5, 19, device=DEVICE)
    torch.library.opcheck(kd_rows, (logits[:, :-1], teacher[:, 1:], None, *_options("forward_kl", 1.0, 0.0, backend)))


@each_backend("kl_div")
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_rows_opcheck(backend, log_target):
    log_q = torch.log_softmax(torch.randn(3, 29, device=DEVICE), -1).requires_grad_(True)
    target = torch.log_softmax(torch.randn(3, 29, device=DEVICE), -1)
    target = target if log_target else target.exp()
    torch.library.opcheck(kl_div_rows, (log_q, target, *flatten(KLDivOptions(log_target, backend))))


@pytest.mark.parametrize("divergence", fastkd.DIVERGENCES)
def test_gradcheck_torch_backend_float64(divergence):
    student = torch.randn(3, 9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    teacher = torch.randn(3, 9, dtype=torch.float64, device=DEVICE)
    labels = torch.tensor([1, -100, 4], device=DEVICE)

    def loss(x):
        return fastkd.kd_loss(x, teacher, divergence=divergence, temperature=1.7, beta=0.35, skew=0.25,
                              labels=labels, reduction="none", backend="torch")

    assert torch.autograd.gradcheck(loss, (student,))


@each_backend("kd_rows")
def test_torch_compile_fullgraph(backend):
    student = torch.randn(6, 50, device=DEVICE, requires_grad=True)
    teacher = torch.randn(6, 50, device=DEVICE)
    labels = torch.tensor([1, 2, -100, 4, 5, 6], device=DEVICE)

    def step(student, teacher, labels):
        return fastkd.kd_loss(student, teacher, divergence="jsd", beta=0.4, temperature=2.0,
                              temperature_squared=True, labels=labels, backend=backend)

    # aot_eager exercises Dynamo tracing, the fake kernels and AOT autograd without a C++ build;
    # inductor is run once below for the torch backend.
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(student, teacher, labels)
    (grad,) = torch.autograd.grad(loss, student)
    ref, ref_grad = loss_and_grad(student, teacher, divergence="jsd", beta=0.4, temperature=2.0,
                                  temperature_squared=True, labels=labels)
    assert rel_err(loss, ref) < TOLERANCE[torch.float32] and rel_err(grad, ref_grad) < TOLERANCE[torch.float32]
    (eager_grad,) = torch.autograd.grad(step(student, teacher, labels), student)
    assert rel_err(grad, eager_grad) < 1e-6  # compiling changes nothing


@pytest.mark.slow
def test_torch_compile_inductor():
    student = torch.randn(4, 40, device=DEVICE, requires_grad=True)
    teacher = torch.randn(4, 40, device=DEVICE)
    compiled = torch.compile(lambda s, t: fastkd.kd_loss(s, t, divergence="reverse_kl", backend="torch") * 3,
                             fullgraph=True)
    loss = compiled(student, teacher)
    loss.backward()
    ref = 3 * reference_kd_loss(student.detach(), teacher, divergence="reverse_kl")
    assert rel_err(loss, ref) < 1e-5 and torch.isfinite(student.grad).all()


# Rows that start beyond element 2³¹: the kernels' offsets must be 64-bit. A 4 GiB bf16 buffer is
# reserved with torch.empty but only the few rows used are ever touched (a few hundred MiB).

VOCAB = 1000


@pytest.fixture(scope="module")
def huge_buffer():
    return torch.empty(2**31 + 4 * VOCAB, dtype=torch.bfloat16, device=DEVICE)


@each_backend("kd_rows")
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


@each_backend("kd_rows")
def test_3d_rows_past_2_pow_31(huge_buffer, backend):
    # (B, T, V) addressing: batch stride 2³⁰, so batch 2 starts past 2³¹.
    student = huge_buffer.as_strided((3, 2, VOCAB), (2**30, VOCAB, 1))
    student.copy_(torch.randn(3, 2, VOCAB, device=DEVICE))
    teacher = torch.randn(3, 2, VOCAB, device=DEVICE)
    loss = fastkd.kd_loss(student, teacher, divergence="reverse_kl", reduction="none", backend=backend)
    ref_loss, _ = loss_and_grad(student, teacher, divergence="reverse_kl", reduction="none")
    assert rel_err(loss, ref_loss) < 5e-6
