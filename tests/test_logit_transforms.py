"""Logits as models compute them: per-side scale and soft-cap (Cohere/Granite, Gemma-2/3) and row
standardisation (Sun et al. 2024), against float64 formulas written from their definitions and
against a transcription of the standardisation paper's code, through kd_loss and the fused
linear loss, on every backend that implements them."""

import math

import pytest
import torch

import fastkd
from conftest import DEVICE, TOLERANCE
from fastkd.kernels import registry
from reference import rel_err, row_losses


def _backends(*features):
    return registry.usable_backends("kd_rows", DEVICE.type, features=frozenset(features))


def capped(x, scale, cap):
    y = x * scale
    return y if cap is None else cap * torch.tanh(y / cap)


def paper_standardize(logits):
    """The logit-standardisation paper's normalize(): torch.std (sample std) plus 1e-7."""
    mean = logits.mean(dim=-1, keepdims=True)
    stdv = logits.std(dim=-1, keepdims=True)
    return (logits - mean) / (1e-7 + stdv)


def _logits(*shape, scale=3.0, dtype=torch.float32):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(DEVICE, dtype)


@pytest.mark.parametrize("backend", _backends("logit_scale", "softcap"))
@pytest.mark.parametrize("divergence", fastkd.DIVERGENCES)
def test_scale_and_softcap_per_side(backend, divergence):
    # Logits of ±100 cross the cap of 30: the tanh saturates, where a missing cap would be wrong.
    student, teacher = _logits(5, 301, scale=40.0), _logits(5, 301, scale=40.0)
    student.requires_grad_(True)
    options = dict(divergence=divergence, temperature=2.0, beta=0.3, skew=0.2)
    loss = fastkd.kd_loss(student, teacher, student_logit_scale=0.8, student_softcap=30.0, teacher_softcap=50.0,
                          reduction="none", backend=backend, **options)
    grad_output = torch.rand(5, device=DEVICE) + 0.5
    (grad,) = torch.autograd.grad(loss, student, grad_output)
    leaf = student.detach().double().requires_grad_(True)
    ref = row_losses(divergence, capped(leaf, 0.8, 30.0), capped(teacher.double(), 1.0, 50.0), 2.0, 0.3, 0.2)
    (ref_grad,) = torch.autograd.grad(ref, leaf, grad_output.double())
    assert rel_err(loss, ref) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("backend", _backends("softcap"))
def test_softcap_keeps_masked_entries_masked(backend):
    student, teacher = _logits(3, 40), _logits(3, 40)
    student[:, ::4] = -math.inf
    teacher[:, ::4] = -math.inf
    student.requires_grad_(True)
    loss = fastkd.kd_loss(student, teacher, student_softcap=5.0, teacher_softcap=5.0, backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    keep = torch.ones(40, dtype=torch.bool, device=DEVICE)
    keep[::4] = False
    leaf = student.detach()[:, keep].double().requires_grad_(True)
    ref = row_losses("forward_kl", capped(leaf, 1.0, 5.0), capped(teacher[:, keep].double(), 1.0, 5.0)).mean()
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    assert torch.isfinite(grad).all() and (grad[:, ~keep] == 0).all()
    assert rel_err(loss, ref) < 1e-5 and rel_err(grad[:, keep], ref_grad) < 1e-5


@pytest.mark.parametrize("backend", _backends("standardize"))
@pytest.mark.parametrize("divergence", fastkd.DIVERGENCES)
def test_standardize_matches_the_paper_code(backend, divergence):
    # The paper standardises both sides, then applies the temperature (and T²) of plain KD.
    student, teacher = _logits(6, 100, scale=5.0) + 3.0, _logits(6, 100, scale=2.0) - 1.0
    student.requires_grad_(True)
    loss = fastkd.kd_loss(student, teacher, divergence=divergence, temperature=2.0, temperature_squared=True,
                          standardize=True, reduction="none", backend=backend)
    grad_output = torch.rand(6, device=DEVICE) + 0.5
    (grad,) = torch.autograd.grad(loss, student, grad_output)
    leaf = student.detach().double().requires_grad_(True)
    ref = 4.0 * row_losses(divergence, paper_standardize(leaf), paper_standardize(teacher.double()), 2.0)
    (ref_grad,) = torch.autograd.grad(ref, leaf, grad_output.double())
    assert rel_err(loss, ref) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("backend", _backends("standardize"))
def test_standardize_constant_rows_and_low_precision(backend):
    student = _logits(4, 77, dtype=torch.bfloat16)
    teacher = _logits(4, 77)
    student[1] = 2.5  # a constant row: std 0, eps keeps it finite, its gradient is the plain one
    teacher[2] = -1.0
    student.requires_grad_(True)
    loss = fastkd.kd_loss(student, teacher, divergence="jsd", standardize=True, reduction="sum", backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    leaf = student.detach().double().requires_grad_(True)
    ref = row_losses("jsd", paper_standardize(leaf), paper_standardize(teacher.double())).sum()
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert rel_err(loss, ref) < 1e-5 and rel_err(grad, ref_grad) < TOLERANCE[torch.bfloat16]


def test_gradcheck_float64_through_every_transform():
    student = torch.randn(3, 9, dtype=torch.float64, device=DEVICE) * 4
    teacher = torch.randn(3, 9, dtype=torch.float64, device=DEVICE) * 4

    def loss(x):
        return fastkd.kd_loss(x, teacher, divergence="skew_reverse_kl", temperature=1.7, student_logit_scale=1.3,
                              student_softcap=6.0, teacher_softcap=4.0, standardize=True, reduction="none",
                              backend="torch")

    assert torch.autograd.gradcheck(loss, (student.requires_grad_(True),))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_with_a_gemma_style_softcap(reduction):
    # Gemma-2/3 cap the final logits at 30: the fused loss must apply it to every logit block.
    hidden = torch.randn(7, 16, device=DEVICE).requires_grad_(True)
    weight = (torch.randn(211, 16, device=DEVICE) * 3).requires_grad_(True)
    teacher_hidden, teacher_weight = torch.randn(7, 12, device=DEVICE), torch.randn(211, 12, device=DEVICE) * 3
    labels = torch.randint(0, 211, (7,), device=DEVICE)
    labels[2] = -100
    options = dict(divergence="reverse_kl", temperature=1.5, reduction=reduction)
    loss = fastkd.fused_linear_kd_loss(hidden, weight, teacher_hidden, teacher_weight, labels, student_softcap=30.0,
                                       teacher_softcap=30.0, teacher_logit_scale=0.5, **options)
    grad_output = torch.rand(loss.shape, device=DEVICE) + 0.5
    grads = torch.autograd.grad(loss, (hidden, weight), grad_output)
    leaves = [hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)]
    student = capped(leaves[0] @ leaves[1].t(), 1.0, 30.0)
    teacher = capped(teacher_hidden.double() @ teacher_weight.double().t(), 0.5, 30.0)
    rows = torch.where(labels != -100, row_losses("reverse_kl", student, teacher, 1.5), 0.0)
    ref = rows if reduction == "none" else rows.sum() / (labels != -100).sum()
    ref_grads = torch.autograd.grad(ref, leaves, grad_output.double())
    assert rel_err(loss, ref) < 2e-5
    assert all(rel_err(g, r) < 2e-5 for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("backend", _backends("logit_scale", "softcap"))
@pytest.mark.parametrize("scale,cap", [(0.5, None), (2.0, 30.0), (1.0, 5.0)])
def test_fused_hard_term_sees_the_model_logits(backend, scale, cap):
    # The hard cross-entropy is the model's own loss: on scale·x, soft-capped, as the model outputs
    # them (a Gemma or Granite student), never on the raw lm_head product.
    hidden = (torch.randn(23, 16, device=DEVICE) * 3).requires_grad_(True)
    weight = (torch.randn(101, 16, device=DEVICE) * 3).requires_grad_(True)
    teacher_hidden, teacher_weight = torch.randn(23, 12, device=DEVICE), torch.randn(101, 12, device=DEVICE)
    labels = torch.randint(0, 101, (23,), device=DEVICE)
    labels[::4] = -100
    loss = fastkd.fused_linear_kd_loss(hidden, weight, teacher_hidden, teacher_weight, labels, hard_weight=0.7,
                                       soft_weight=0.4, temperature=2.0, student_logit_scale=scale,
                                       student_softcap=cap, backend=backend)
    grads = torch.autograd.grad(loss, (hidden, weight))
    leaves = [hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)]
    student = capped(leaves[0] @ leaves[1].t(), scale, cap)
    teacher = teacher_hidden.double() @ teacher_weight.double().t()
    active = labels != -100
    soft = torch.where(active, row_losses("forward_kl", student, teacher, 2.0), 0.0).sum() / active.sum()
    hard = torch.nn.functional.cross_entropy(student, labels, ignore_index=-100)
    ref = 0.4 * soft + 0.7 * hard
    ref_grads = torch.autograd.grad(ref, leaves)
    assert rel_err(loss, ref) < 2e-5
    assert all(rel_err(g, r) < 2e-5 for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("call,error,words", [
    (lambda s, t: fastkd.kd_loss(s, t, student_softcap=0.0), ValueError, "student_softcap"),
    (lambda s, t: fastkd.kd_loss(s, t, teacher_logit_scale=-1.0), ValueError, "teacher_logit_scale"),
    (lambda s, t: fastkd.kd_loss(s, t, standardize=1), TypeError, "standardize"),
    (lambda s, t: fastkd.kd_loss(s, t, standardize=True, standardize_eps=0.0), ValueError, "standardize_eps"),
    (lambda s, t: fastkd.kd_loss(s, t, student_softcap="30"), TypeError, "student_softcap"),
])
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error, match=words):
        call(_logits(2, 5), _logits(2, 5))


@pytest.mark.parametrize("backend", _backends("softcap"))
def test_a_side_without_transforms_keeps_its_logits(backend):
    # The torch backend once divided the untransformed side's logits by T in place (the caller's tensor).
    student, teacher = _logits(4, 50), _logits(4, 50)
    kept = teacher.clone()
    loss = fastkd.kd_loss(student, teacher, temperature=2.0, student_softcap=5.0, backend=backend)
    assert torch.equal(teacher, kept)
    ref = row_losses("forward_kl", capped(student.double(), 1.0, 5.0), teacher.double(), 2.0).mean()
    assert rel_err(loss, ref) < 1e-5


@pytest.mark.parametrize("missing_mass", ["renormalize", "tail"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_sparse_teacher_with_a_soft_capped_scaled_student(divergence, missing_mass):
    # A Gemma-style student (cap 30) against stored top-k log-probs, logits of ±100: the cap must
    # reach the sparse losses, unfused (sparse_kd_loss) and fused (every logit block), hard term too.
    from reference import sparse_rows

    n, hidden_size, vocab, top_k = 13, 16, 97, 7
    hidden = (torch.randn(n, hidden_size, device=DEVICE) * 4).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, device=DEVICE) * 4).requires_grad_(True)
    teacher = torch.randn(n, vocab, dtype=torch.float64, device=DEVICE) * 3
    logprobs, indices = torch.log_softmax(teacher, -1).topk(top_k, -1)
    labels = torch.randint(0, vocab, (n,), device=DEVICE)
    labels[::5] = -100
    options = dict(divergence=divergence, missing_mass=missing_mass, student_logit_scale=0.7, student_softcap=30.0)
    leaves = [hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)]
    student = capped(leaves[0] @ leaves[1].t(), 0.7, 30.0)
    active = labels != -100
    soft = torch.where(active, sparse_rows(student, indices, logprobs, divergence, 1.0, missing_mass), 0.0)
    soft = soft.sum() / active.sum()

    logits = (hidden @ weight.t()).detach().requires_grad_(True)
    loss = fastkd.sparse_kd_loss(logits, indices, logprobs.float(), labels, **options)
    (grad,) = torch.autograd.grad(loss, logits)
    raw = (leaves[0] @ leaves[1].t()).detach().requires_grad_(True)
    (ref_logit_grad,) = torch.autograd.grad(
        torch.where(active, sparse_rows(capped(raw, 0.7, 30.0), indices, logprobs, divergence, 1.0, missing_mass),
                    0.0).sum() / active.sum(), raw)
    assert rel_err(loss, soft) < 2e-5 and rel_err(grad, ref_logit_grad) < 2e-5

    fused = fastkd.fused_linear_sparse_kd_loss(hidden, weight, indices, logprobs.float(), labels, hard_weight=0.3,
                                               **options)
    grads = torch.autograd.grad(fused, (hidden, weight))
    ref = soft + 0.3 * torch.nn.functional.cross_entropy(student, labels, ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, leaves)
    assert rel_err(fused, ref) < 2e-5
    assert all(rel_err(g, r) < 2e-5 for g, r in zip(grads, ref_grads))
