"""Sparse (top-k) teacher losses against float64 references built from the top-k."""

import math

import pytest
import torch

import fastkd
from conftest import DEVICE, each_backend
from reference import rel_err, row_losses
from reference import sparse_rows as reference_rows


def _top_k_teacher(n_rows, vocab, top_k, scale=3.0):
    teacher = torch.randn(n_rows, vocab, dtype=torch.float64, device=DEVICE) * scale
    logprobs, indices = torch.log_softmax(teacher, -1).topk(top_k, dim=-1)
    perm = torch.argsort(torch.rand(n_rows, top_k, device=DEVICE), dim=-1)  # ids in no particular order
    return indices.gather(1, perm), logprobs.gather(1, perm)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("missing_mass,temperature", [("renormalize", 1.0), ("renormalize", 2.5), ("tail", 1.0)])
@pytest.mark.parametrize("top_k", [1, 5, 64])
def test_sparse_kd_loss_matches_reference(divergence, missing_mass, temperature, top_k):
    vocab = 301
    indices, logprobs = _top_k_teacher(7, vocab, top_k)
    student = (torch.randn(7, vocab, device=DEVICE) * 2).requires_grad_(True)
    labels = torch.tensor([1, -100, 3, 4, 5, -100, 0], device=DEVICE)
    grad_output = torch.rand(7, device=DEVICE) + 0.5
    loss = fastkd.sparse_kd_loss(student, indices, logprobs.float(), divergence=divergence, temperature=temperature,
                                 missing_mass=missing_mass, labels=labels, reduction="none")
    (grad,) = torch.autograd.grad(loss, student, grad_output)
    ref_student = student.detach().double().requires_grad_(True)
    ref = reference_rows(ref_student, indices, logprobs.float(), divergence, temperature, missing_mass)
    ref = torch.where(labels != -100, ref, torch.zeros_like(ref))
    (ref_grad,) = torch.autograd.grad(ref, ref_student, grad_output.double())
    assert rel_err(loss, ref) < 2e-5
    assert rel_err(grad, ref_grad) < 2e-5
    assert (grad[labels == -100] == 0).all()
    if missing_mass == "renormalize":  # no gradient outside the support
        outside = torch.ones_like(grad, dtype=torch.bool).scatter_(1, indices, False)
        assert (grad[outside] == 0).all()


def test_tail_keeps_precision_when_the_top_k_holds_almost_everything():
    # The student's leftover mass is ~1e-9: 1 − Σq would lose it in fp32, the direct sum does not.
    vocab = 50
    student = torch.zeros(1, vocab, device=DEVICE)
    student[0, :10] = 25.0
    indices = torch.arange(10, device=DEVICE)[None]
    logprobs = torch.full((1, 10), math.log(0.0999), device=DEVICE)  # teacher leftover 1e-3
    loss = fastkd.sparse_kd_loss(student, indices, logprobs, missing_mass="tail", reduction="sum")
    ref = reference_rows(student, indices, logprobs, "forward_kl", 1.0, "tail")
    assert rel_err(loss, ref) < 1e-5


@each_backend("sparse_kd", "ce")
@pytest.mark.parametrize("missing_mass", ["renormalize", "tail"])
def test_fused_linear_sparse_matches_reference_on_materialised_logits(backend, missing_mass):
    hidden = torch.randn(2, 4, 16, device=DEVICE, requires_grad=True)
    weight = (torch.randn(203, 16, device=DEVICE) * 0.3).requires_grad_(True)
    indices, logprobs = _top_k_teacher(8, 200, 9)
    indices, logprobs = indices.view(2, 4, 9), logprobs.float().view(2, 4, 9)
    labels = torch.randint(0, 200, (2, 4), device=DEVICE)
    labels[0, 1] = -100
    options = dict(divergence="reverse_kl", missing_mass=missing_mass, labels=labels)
    loss = fastkd.fused_linear_sparse_kd_loss(hidden, weight, indices, logprobs, vocab_size=200, hard_weight=0.3,
                                              backend=backend, **options)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_hidden = hidden.detach().double().requires_grad_(True)
    ref_weight = weight.detach().double().requires_grad_(True)
    logits = (ref_hidden @ ref_weight[:200].t()).view(8, 200)
    keep = labels.view(-1) != -100
    soft = reference_rows(logits, indices.view(8, 9), logprobs.view(8, 9), "reverse_kl", 1.0, missing_mass)
    ref = soft[keep].mean() + 0.3 * torch.nn.functional.cross_entropy(logits, labels.view(-1), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, (ref_hidden, ref_weight))
    assert rel_err(loss, ref) < 2e-5
    assert all(rel_err(a, b) < 2e-5 for a, b in zip(grads, ref_grads))


BAD = [
    (dict(teacher_indices=torch.tensor([[0, 0]] * 3), validate=True), ValueError, ["repeats a token id"]),
    (dict(teacher_indices=torch.tensor([[0, 11]] * 3), validate=True), ValueError, ["outside [0, 11)"]),
    (dict(teacher_indices=torch.zeros(3, 12, dtype=torch.long), teacher_logprobs=torch.zeros(3, 12)), ValueError,
     ["k=12", "[1, V=11]"]),
    (dict(teacher_indices=torch.zeros(3, 2)), TypeError, ["teacher_indices", "integer"]),
    (dict(teacher_logprobs=torch.zeros(3, 3)), ValueError, ["teacher_logprobs shape"]),
    (dict(teacher_indices=torch.tensor([[0, 1]] * 4), teacher_logprobs=torch.zeros(4, 2)), ValueError,
     ["teacher_indices must have shape"]),
    (dict(teacher_logprobs=torch.full((3, 2), 0.5), validate=True), ValueError, ["log-probabilities"]),
    (dict(validate=1), TypeError, ["validate", "bool"]),
    (dict(divergence="skew_forward_kl"), ValueError, ["forward_kl", "reverse_kl", "jsd", "tvd", "sparse"]),
    (dict(missing_mass="drop"), ValueError, ["missing_mass", "'renormalize'", "'tail'"]),
    (dict(missing_mass="tail", temperature=2.0), ValueError, ["missing_mass='tail'", "temperature=1"]),
    (dict(student_logits=torch.randn(3, 11, dtype=torch.float64), backend="native"), ValueError,
     ["backend='native'", "float64", "'torch'"]),
]


@pytest.mark.parametrize("overrides,error,words", BAD)
def test_bad_sparse_input_names_the_argument(overrides, error, words):
    arguments = dict(student_logits=torch.randn(3, 11), teacher_indices=torch.tensor([[0, 1]] * 3),
                     teacher_logprobs=torch.log(torch.full((3, 2), 0.4)))
    options = {}
    for key, value in overrides.items():
        (arguments if key in arguments else options)[key] = value
    arguments = {k: v.to(DEVICE) for k, v in arguments.items()}
    with pytest.raises(error) as info:
        fastkd.sparse_kd_loss(*arguments.values(), **options)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_modules_match_functions():
    indices, logprobs = _top_k_teacher(4, 60, 6)
    logprobs = logprobs.float()
    student = torch.randn(4, 60, device=DEVICE)
    module = fastkd.SparseKDLoss("reverse_kl", missing_mass="tail", reduction="sum")
    assert "tail" in repr(module)
    assert torch.equal(module(student, indices, logprobs),
                       fastkd.sparse_kd_loss(student, indices, logprobs, divergence="reverse_kl",
                                             missing_mass="tail", reduction="sum"))
    hidden, weight = torch.randn(4, 8, device=DEVICE), torch.randn(60, 8, device=DEVICE)
    fused = fastkd.FusedLinearSparseKDLoss(temperature=2.0)
    assert torch.equal(fused(hidden, weight, indices, logprobs),
                       fastkd.fused_linear_sparse_kd_loss(hidden, weight, indices, logprobs, temperature=2.0))
    with pytest.raises(ValueError, match="missing_mass"):
        fastkd.SparseKDLoss(missing_mass="drop")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_tail_with_the_whole_vocabulary_is_the_dense_kl(dtype, divergence):
    # k = V: no token lies outside the support, so there is no tail bucket; the teacher's leftover
    # mass is rounding (it once made forward KL infinite).
    teacher = torch.randn(16, 8, device=DEVICE, dtype=torch.float64).log_softmax(-1)
    logprobs, indices = teacher.to(dtype).topk(8)
    student = torch.randn(16, 8, device=DEVICE, dtype=dtype).requires_grad_(True)
    loss = fastkd.sparse_kd_loss(student, indices, logprobs, divergence=divergence, missing_mass="tail",
                                 reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), student)
    dense_teacher = torch.zeros_like(teacher).scatter(1, indices, logprobs.double())
    ref_student = student.detach().double().requires_grad_(True)
    ref = row_losses(divergence, ref_student, dense_teacher)
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_student)
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert rel_err(loss, ref) < tolerance and rel_err(grad, ref_grad) < tolerance


@each_backend("sparse_kd")
def test_ids_out_of_range_make_their_row_nan_without_a_sync(backend):
    # The default path reads no tensor value on the host: a bad id cannot raise, so its row (and
    # only its row) becomes NaN, loss and gradient.
    student = torch.randn(3, 11, device=DEVICE, requires_grad=True)
    indices = torch.tensor([[0, 1], [4, 11], [2, -2]], device=DEVICE)  # -1 is the padding id
    logprobs = torch.log(torch.full((3, 2), 0.4, device=DEVICE))
    loss = fastkd.sparse_kd_loss(student, indices, logprobs, reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()
    assert torch.isfinite(grad[0]).all() and torch.isnan(grad[1:]).all()


def _dense_reference(divergence, student, teacher_logits, indices, temperature, missing_mass):
    """float64 per-row losses from the dense teacher logits at T, restricted to the stored support
    (renormalize) or with everything outside it as one bucket (tail)."""
    s, z = student.double() / temperature, teacher_logits.double() / temperature
    outside = torch.ones_like(s, dtype=torch.bool).scatter_(1, indices, False)
    if missing_mass == "renormalize":
        log_p = z.masked_fill(outside, -math.inf).log_softmax(-1).gather(1, indices)
        log_q = s.masked_fill(outside, -math.inf).log_softmax(-1).gather(1, indices)
    else:
        p, q = z.softmax(-1), s.softmax(-1)
        log_p = torch.cat([p.gather(1, indices), (p * outside).sum(-1, keepdim=True)], 1).log()
        log_q = torch.cat([q.gather(1, indices), (q * outside).sum(-1, keepdim=True)], 1).log()
    a, b = (log_p, log_q) if divergence == "forward_kl" else (log_q, log_p)
    return (a.exp() * (a - b)).sum(-1)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("missing_mass,temperature,teacher_temperature",
                         [("renormalize", 1.0, 0.6), ("renormalize", 2.0, 0.6), ("renormalize", 0.5, 1.5),
                          ("tail", 0.6, 0.6), ("tail", 2.0, 2.0)])
@pytest.mark.parametrize("logprobs_dtype", [torch.float32, torch.bfloat16])
def test_teacher_temperature_retempers_the_stored_teacher(divergence, missing_mass, temperature,
                                                          teacher_temperature, logprobs_dtype):
    # Log-probs stored at T_g from dense teacher logits z; the loss at T against the dense
    # teacher softmax(z / T) restricted to the support (or with its tail bucket).
    vocab, top_k = 211, 13
    teacher = torch.randn(9, vocab, dtype=torch.float64, device=DEVICE) * 3
    logprobs, indices = (teacher / teacher_temperature).log_softmax(-1).topk(top_k, dim=-1)
    student = (torch.randn(9, vocab, device=DEVICE) * 2).requires_grad_(True)
    grad_output = torch.rand(9, device=DEVICE) + 0.5
    stored = logprobs.to(logprobs_dtype)
    loss = fastkd.sparse_kd_loss(student, indices, stored, divergence=divergence, temperature=temperature,
                                 teacher_temperature=teacher_temperature, missing_mass=missing_mass, reduction="none")
    (grad,) = torch.autograd.grad(loss, student, grad_output)
    ref_student = student.detach().double().requires_grad_(True)
    # The reference's teacher: the dense logits; for bf16-rounded log-probs, what they still say:
    # T_g·log p_g on the support (the logits up to a row constant), or for the tail (T = T_g) the
    # stored probabilities themselves.
    if logprobs_dtype == torch.float32:
        ref = _dense_reference(divergence, ref_student, teacher, indices, temperature, missing_mass)
    elif missing_mass == "renormalize":
        support_logits = torch.full_like(teacher, -math.inf).scatter(1, indices, stored.double() * teacher_temperature)
        ref = _dense_reference(divergence, ref_student, support_logits, indices, temperature, missing_mass)
    else:
        ref = reference_rows(ref_student, indices, stored.double(), divergence, temperature, "tail")
    (ref_grad,) = torch.autograd.grad(ref, ref_student, grad_output.double())
    assert rel_err(loss, ref) < 2e-5
    assert rel_err(grad, ref_grad) < 2e-5


def test_teacher_temperature_in_the_fused_loss_and_the_modules():
    vocab, top_k = 150, 7
    teacher = torch.randn(6, vocab, dtype=torch.float64, device=DEVICE) * 2
    logprobs, indices = (teacher / 0.7).log_softmax(-1).topk(top_k, dim=-1)
    hidden = torch.randn(6, 12, dtype=torch.float64, device=DEVICE, requires_grad=True)
    weight = torch.randn(vocab, 12, dtype=torch.float64, device=DEVICE) * 0.5
    options = dict(divergence="reverse_kl", temperature=1.3, teacher_temperature=0.7)
    loss = fastkd.fused_linear_sparse_kd_loss(hidden, weight, indices, logprobs, **options)
    (grad,) = torch.autograd.grad(loss, hidden)
    ref_hidden = hidden.detach().requires_grad_(True)
    ref = _dense_reference("reverse_kl", ref_hidden @ weight.t(), teacher, indices, 1.3, "renormalize").mean()
    (ref_grad,) = torch.autograd.grad(ref, ref_hidden)
    assert rel_err(loss, ref) < 1e-10 and rel_err(grad, ref_grad) < 1e-10
    module = fastkd.FusedLinearSparseKDLoss(**options)
    assert "teacher_temperature=0.7" in repr(module)
    assert torch.equal(module(hidden, weight, indices, logprobs), loss)
    student = hidden.detach() @ weight.t()
    assert torch.equal(fastkd.SparseKDLoss(**options)(student, indices, logprobs),
                       fastkd.sparse_kd_loss(student, indices, logprobs, **options))


@pytest.mark.parametrize("options,error,words", [
    (dict(missing_mass="tail", temperature=1.0, teacher_temperature=0.7), ValueError,
     ["missing_mass='tail'", "temperature == teacher_temperature", "teacher_temperature=0.7"]),
    (dict(teacher_temperature=0.0), ValueError, ["teacher_temperature", "> 0"]),
    (dict(teacher_temperature=math.inf), ValueError, ["teacher_temperature", "finite"]),
    (dict(teacher_temperature="1"), TypeError, ["teacher_temperature"]),
])
def test_teacher_temperature_refuses_what_is_not_exact(options, error, words):
    indices, logprobs = _top_k_teacher(3, 11, 2)
    for call in (lambda: fastkd.sparse_kd_loss(torch.randn(3, 11, device=DEVICE), indices, logprobs, **options),
                 lambda: fastkd.SparseKDLoss(**options)):
        with pytest.raises(error) as info:
            call()
        for word in words:
            assert word in str(info.value), f"{word!r} missing from: {info.value}"
