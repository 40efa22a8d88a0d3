"""Every divergence on a sparse (top-k) teacher, in both missing-mass modes, against float64
references built from a dense problem restricted to the stored support; the teacher formats
(batched ids, masks, padding ids, ragged k, log-prob dtypes)."""

import math

import pytest
import torch

import fastkd
from conftest import DEVICE, TOLERANCE, each_backend
from reference import rel_err

DIVERGENCES = [("forward_kl", None), ("reverse_kl", None), ("jsd", 0.3), ("jsd", None), ("tvd", None)]


def _divergence(P, Q, divergence, beta):
    """float64 divergence between bucket distributions P (teacher) and Q (student), rows over the
    last dim; 0·log 0 = 0 (logs of clamped values so that autograd sees no 0·inf)."""
    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), 0.0).sum(-1)
    if divergence == "forward_kl":
        return kl(P, Q)
    if divergence == "reverse_kl":
        return kl(Q, P)
    if divergence == "tvd":
        return 0.5 * (P - Q).abs().sum(-1)
    beta = 0.5 if beta is None else beta
    M = beta * P + (1 - beta) * Q
    return beta * kl(P, M) + (1 - beta) * kl(Q, M)


def dense_on_support(student, teacher, support, temperature, missing_mass, divergence, beta):
    """float64 per-row losses. student, teacher: (R, V) logits; support: (R, V) bool, the stored
    entries. renormalize: both softmaxes restricted to the support; tail: the support's entries
    and one bucket holding each side's mass outside it (no such bucket where nothing is outside)."""
    s, z = student.double() / temperature, teacher.double() / temperature
    if missing_mass == "renormalize":
        P = z.masked_fill(~support, -math.inf).softmax(-1)
        Q = s.masked_fill(~support, -math.inf).softmax(-1)
    else:
        p, q = z.softmax(-1), s.softmax(-1)
        P = torch.cat([p * support, (p * ~support).sum(-1, keepdim=True)], -1)
        Q = torch.cat([q * support, (q * ~support).sum(-1, keepdim=True)], -1)
    return _divergence(P, Q, divergence, beta)


def _problem(n_rows, vocab, top_k, teacher_temperature, *, student_scale=4.0):
    """Dense teacher logits, a top-k of its log-probs at T_g (ids in random order), and student
    logits of LLM magnitudes (a few rows reaching ±100)."""
    teacher = torch.randn(n_rows, vocab, dtype=torch.float64, device=DEVICE) * 3
    logprobs, indices = (teacher / teacher_temperature).log_softmax(-1).topk(top_k, dim=-1)
    order = torch.argsort(torch.rand(n_rows, top_k, device=DEVICE), -1)
    student = torch.randn(n_rows, vocab, device=DEVICE) * student_scale
    student[::3] *= 25 / student_scale
    return teacher, indices.gather(1, order), logprobs.gather(1, order), student


def _support(indices, vocab, present=None):
    """(R, V) bool: True at each row's present ids."""
    present = torch.ones_like(indices, dtype=torch.bool) if present is None else present
    rows = torch.arange(indices.shape[0], device=indices.device)[:, None].expand_as(indices)
    support = torch.zeros(indices.shape[0], vocab, dtype=torch.bool, device=indices.device)
    support[rows[present], indices[present]] = True
    return support


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("missing_mass,temperature,teacher_temperature",
                         [("renormalize", 1.0, 1.0), ("renormalize", 2.5, 1.0), ("renormalize", 0.7, 1.5),
                          ("tail", 1.0, 1.0), ("tail", 2.0, 2.0)])
@each_backend("sparse_kd")
def test_every_divergence_matches_the_dense_problem_on_the_support(divergence, beta, missing_mass, temperature,
                                                                    teacher_temperature, backend):
    vocab, top_k, n_rows = 307, 11, 9
    teacher, indices, logprobs, student = _problem(n_rows, vocab, top_k, teacher_temperature)
    student.requires_grad_(True)
    labels = torch.randint(0, vocab, (n_rows,), device=DEVICE)
    labels[[1, 5]] = -100
    grad_output = torch.rand(n_rows, device=DEVICE) + 0.5
    loss = fastkd.sparse_kd_loss(student, indices, logprobs.float(), labels, divergence=divergence, beta=beta,
                                 temperature=temperature, teacher_temperature=teacher_temperature,
                                 missing_mass=missing_mass, reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(loss, student, grad_output)
    ref_student = student.detach().double().requires_grad_(True)
    ref = dense_on_support(ref_student, teacher, _support(indices, vocab), temperature, missing_mass, divergence,
                           beta)
    ref = torch.where(labels != -100, ref, 0.0)
    (ref_grad,) = torch.autograd.grad(ref, ref_student, grad_output.double())
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert rel_err(loss, ref) < 2e-5
    assert rel_err(grad, ref_grad) < 2e-5
    assert (grad[labels == -100] == 0).all()
    if missing_mass == "renormalize":
        assert (grad[~_support(indices, vocab)] == 0).all()


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("missing_mass", ["renormalize", "tail"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@each_backend("sparse_kd")
def test_the_whole_vocabulary_as_support_is_kd_loss(divergence, beta, missing_mass, dtype, backend):
    if dtype == torch.float64 and backend != "torch":
        pytest.skip("float64 is the torch backend's")
    vocab, temperature = 40, 2.0
    teacher = torch.randn(6, vocab, dtype=torch.float64, device=DEVICE) * 4
    logprobs, indices = (teacher / temperature).log_softmax(-1).topk(vocab)  # every id, sorted by log-prob
    student = (torch.randn(6, vocab, device=DEVICE, dtype=dtype) * 4).requires_grad_(True)
    loss = fastkd.sparse_kd_loss(student, indices, logprobs.to(dtype), divergence=divergence, beta=beta,
                                 temperature=temperature, teacher_temperature=temperature,
                                 missing_mass=missing_mass, reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    dense = fastkd.kd_loss(student, teacher.to(dtype), divergence=divergence, beta=beta, temperature=temperature,
                           reduction="none")
    (dense_grad,) = torch.autograd.grad(dense.sum(), student)
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    assert rel_err(loss, dense) < tolerance and rel_err(grad, dense_grad) < tolerance
    ref_student = student.detach().double().requires_grad_(True)
    ref = dense_on_support(ref_student, teacher, torch.ones_like(teacher, dtype=torch.bool), temperature,
                           missing_mass, divergence, beta)
    assert rel_err(loss, ref) < tolerance


@pytest.mark.parametrize("divergence,beta", [("jsd", None), ("tvd", None), ("reverse_kl", None)])
@pytest.mark.parametrize("missing_mass", ["renormalize", "tail"])
@pytest.mark.parametrize("logprobs_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@each_backend("sparse_kd")
def test_log_prob_dtypes_and_a_bf16_student(divergence, beta, missing_mass, logprobs_dtype, backend):
    if logprobs_dtype == torch.float64 and backend != "torch":
        pytest.skip("float64 is the torch backend's")
    # The reference's teacher is what the stored (rounded) log-probs say: their probabilities on
    # the support, and 1 − Σ of them as the tail bucket.
    vocab, top_k = 211, 17
    _, indices, logprobs, student = _problem(8, vocab, top_k, 1.0)
    stored = logprobs.to(logprobs_dtype)
    for student_dtype in (torch.float32, torch.bfloat16):
        x = student.to(student_dtype).requires_grad_(True)
        loss = fastkd.sparse_kd_loss(x, indices, stored, divergence=divergence, beta=beta,
                                     missing_mass=missing_mass, reduction="none", backend=backend)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        assert loss.dtype == (torch.float64 if logprobs_dtype == torch.float64 else torch.float32)
        assert grad.dtype == student_dtype
        ref_student = x.detach().double().requires_grad_(True)
        p = stored.double().exp()
        dense_teacher = torch.full((8, vocab), -math.inf, dtype=torch.float64, device=DEVICE)
        if missing_mass == "renormalize":
            dense_teacher.scatter_(1, indices, stored.double())
        else:
            # Spread the stored leftover mass evenly outside the support: the tail bucket holds it.
            outside = vocab - top_k
            dense_teacher.fill_(0).add_(((1 - p.sum(-1)).clamp_min(0) / outside).log()[:, None])
            dense_teacher.scatter_(1, indices, stored.double())
        ref = dense_on_support(ref_student, dense_teacher, _support(indices, vocab), 1.0, missing_mass, divergence,
                               beta)
        (ref_grad,) = torch.autograd.grad(ref.sum(), ref_student)
        tolerance = TOLERANCE[student_dtype] if student_dtype == torch.bfloat16 else 2e-5
        assert rel_err(loss, ref) < tolerance
        assert rel_err(grad, ref_grad) < tolerance


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("missing_mass", ["renormalize", "tail"])
@each_backend("sparse_kd")
def test_batched_ids_with_a_mask_padding_ids_and_ragged_k(divergence, beta, missing_mass, backend):
    # vLLM/axolotl-style (B, T, K) batches: absent entries by mask, by padding id (-1) or by a
    # log-prob of -inf; their ids may be anything (out of range too). Reference: each row's
    # present entries only, on the dense problem.
    B, T, K, vocab = 2, 5, 9, 120
    teacher, indices, logprobs, student = _problem(B * T, vocab, K, 1.0)
    present = torch.rand(B * T, K, device=DEVICE) < 0.7
    present[3] = False  # a row with no entry at all: an ignored row
    present[4] = True  # one with all
    mask = present.clone()
    ids = indices.clone()
    lps = logprobs.float().clone()
    # Spread the three ways of saying "absent" over the absent entries.
    way = torch.randint(0, 3, (B * T, K), device=DEVICE)
    absent = ~present
    mask[absent & (way != 0)] = True
    ids[absent & (way == 1)] = -1
    lps[absent & (way == 2)] = -math.inf
    ids[absent & (way == 0)] = 10 ** 6  # masked entries' ids are never read
    labels = torch.randint(0, vocab, (B, T), device=DEVICE)
    labels[1, 2] = -100
    x = student.view(B, T, vocab).clone().requires_grad_(True)
    grad_output = torch.rand(B, T, device=DEVICE) + 0.5
    loss = fastkd.sparse_kd_loss(x, ids.view(B, T, K), lps.view(B, T, K), labels, teacher_mask=mask.view(B, T, K),
                                 divergence=divergence, beta=beta, missing_mass=missing_mass, reduction="none",
                                 backend=backend)
    (grad,) = torch.autograd.grad(loss, x, grad_output)
    assert loss.shape == (B, T) and grad.shape == x.shape

    ref_student = x.detach().double().view(B * T, vocab).requires_grad_(True)
    support = _support(indices, vocab, present)
    # The dense teacher as its stored top-k says it: log-probs on the present entries, and for the
    # tail the stored leftover 1 − Σ_present p spread evenly over the rest.
    p_present = torch.where(present, logprobs.float().double().exp(), 0.0)
    dense_teacher = ((1 - p_present.sum(-1)) / (vocab - present.sum(-1))).log()[:, None].expand(-1, vocab).clone()
    if missing_mass == "renormalize":
        dense_teacher.fill_(-math.inf)
    rows = torch.arange(B * T, device=DEVICE)[:, None].expand(-1, K)
    dense_teacher[rows[present], indices[present]] = logprobs.float().double()[present]
    ref = dense_on_support(ref_student, dense_teacher, support, 1.0, missing_mass, divergence, beta)
    keep = (labels.view(-1) != -100) & present.any(-1)
    ref = torch.where(keep, ref, 0.0)
    (ref_grad,) = torch.autograd.grad(ref, ref_student, grad_output.view(-1).double())
    assert rel_err(loss.view(-1), ref) < 2e-5
    assert rel_err(grad.view(B * T, vocab), ref_grad) < 2e-5
    assert loss.view(-1)[3] == 0 and (grad.view(B * T, vocab)[3] == 0).all()
    # The mean leaves out the row without entries, as it leaves out the ignored one.
    mean = fastkd.sparse_kd_loss(x, ids.view(B, T, K), lps.view(B, T, K), labels, teacher_mask=mask.view(B, T, K),
                                 divergence=divergence, beta=beta, missing_mass=missing_mass, backend=backend)
    assert rel_err(mean, ref.sum() / keep.sum()) < 2e-5
    # The fused form takes the same batch (in float64 on the torch backend, fp32 on the others).
    dtype, tolerance = (torch.float64, 1e-5) if backend == "torch" else (torch.float32, 2e-5)
    hidden = torch.randn(B, T, 16, dtype=dtype, device=DEVICE, requires_grad=True)
    weight = torch.randn(vocab, 16, dtype=dtype, device=DEVICE) * 0.5
    fused = fastkd.fused_linear_sparse_kd_loss(hidden, weight, ids.view(B, T, K), lps.view(B, T, K), labels,
                                               teacher_mask=mask.view(B, T, K), divergence=divergence, beta=beta,
                                               missing_mass=missing_mass, backend=backend)
    (fused_grad,) = torch.autograd.grad(fused, hidden)
    ref_hidden = hidden.detach().double().requires_grad_(True)
    logits = (ref_hidden @ weight.double().t()).view(B * T, vocab)
    ref_fused = dense_on_support(logits, dense_teacher, support, 1.0, missing_mass, divergence, beta)
    ref_fused = torch.where(keep, ref_fused, 0.0).sum() / keep.sum()
    (ref_fused_grad,) = torch.autograd.grad(ref_fused, ref_hidden)
    assert rel_err(fused, ref_fused) < tolerance and rel_err(fused_grad, ref_fused_grad) < tolerance


def test_padding_id_can_be_changed_or_switched_off():
    student = torch.randn(2, 11, device=DEVICE)
    ids = torch.tensor([[3, 7, 5], [2, 4, 5]], device=DEVICE)  # id 5 pads both rows
    logprobs = torch.log(torch.tensor([[0.5, 0.3, 0.1], [0.6, 0.2, 0.2]], device=DEVICE))
    padded = fastkd.sparse_kd_loss(student, ids, logprobs, pad_id=5, reduction="none")
    trimmed = fastkd.sparse_kd_loss(student, ids[:, :2], logprobs[:, :2], reduction="none")
    assert rel_err(padded, trimmed) < 1e-6
    ids[1, 1] = -1
    no_pad = fastkd.sparse_kd_loss(student, ids, logprobs, pad_id=None, reduction="none")
    assert torch.isfinite(no_pad[0]) and torch.isnan(no_pad[1])  # -1 is then an id out of range
    # validate reads only present entries: padding ids pass, repeated present ids do not.
    fastkd.sparse_kd_loss(student, ids, logprobs, validate=True)
    with pytest.raises(ValueError, match="repeats a token id"):
        fastkd.sparse_kd_loss(student, torch.tensor([[3, 3, -1], [2, 4, 6]], device=DEVICE), logprobs, validate=True)


@pytest.mark.parametrize("call,error,words", [
    (dict(teacher_mask=torch.ones(3, 2)), TypeError, ["teacher_mask", "bool"]),
    (dict(teacher_mask=torch.ones(3, 3, dtype=torch.bool)), ValueError, ["teacher_mask shape"]),
    (dict(teacher_mask=[[True, True]] * 3), TypeError, ["teacher_mask", "torch.Tensor"]),
    (dict(pad_id=1.0), TypeError, ["pad_id", "int"]),
    (dict(divergence="jsd", beta=1.5), ValueError, ["beta", "[0, 1]"]),
])
def test_bad_formats_name_the_argument(call, error, words):
    student, ids = torch.randn(3, 11, device=DEVICE), torch.tensor([[0, 1]] * 3, device=DEVICE)
    logprobs = torch.log(torch.full((3, 2), 0.4, device=DEVICE))
    call = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    with pytest.raises(error) as info:
        fastkd.sparse_kd_loss(student, ids, logprobs, **call)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_modules_take_the_new_options():
    _, indices, logprobs, student = _problem(4, 60, 6, 1.0)
    mask = torch.rand(4, 6, device=DEVICE) < 0.8
    module = fastkd.SparseKDLoss("jsd", beta=0.2, missing_mass="tail", pad_id=None, reduction="sum")
    assert "beta=0.2" in repr(module)
    assert torch.equal(module(student, indices, logprobs.float(), teacher_mask=mask),
                       fastkd.sparse_kd_loss(student, indices, logprobs.float(), divergence="jsd", beta=0.2,
                                             missing_mass="tail", pad_id=None, teacher_mask=mask, reduction="sum"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_renormalized_reads_only_the_support_logits(dtype, reduction):
    # No hard term, renormalize: the fused loss forms the k logits per row as dot products
    # (kernels/fused_linear/support.py). Against float64 on the materialised logits, with a bias.
    N, H, vocab, K = 37, 24, 509, 13
    _, indices, logprobs, _ = _problem(N, vocab, K, 1.0)
    mask = torch.rand(N, K, device=DEVICE) < 0.9
    hidden = torch.randn(N, H, device=DEVICE).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab + 3, H, device=DEVICE) * 0.4).to(dtype).requires_grad_(True)
    bias = torch.randn(vocab + 3, device=DEVICE).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (N,), device=DEVICE)
    labels[::5] = -100
    grad_output = torch.rand(N, device=DEVICE) + 0.5 if reduction == "none" else torch.tensor(1.0, device=DEVICE)
    loss = fastkd.fused_linear_sparse_kd_loss(hidden, weight, indices, logprobs.float(), labels, student_bias=bias,
                                              vocab_size=vocab, teacher_mask=mask, divergence="jsd",
                                              temperature=1.5, reduction=reduction)
    grads = torch.autograd.grad(loss, (hidden, weight, bias), grad_output)
    refs = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    logits = refs[0] @ refs[1][:vocab].t() + refs[2][:vocab]
    dense_teacher = torch.full((N, vocab), -math.inf, dtype=torch.float64, device=DEVICE)
    rows = torch.arange(N, device=DEVICE)[:, None].expand(-1, K)
    dense_teacher[rows[mask], indices[mask]] = logprobs.float().double()[mask]  # T_g = 1: the logits up to a constant
    ref = dense_on_support(logits, dense_teacher, _support(indices, vocab, mask), 1.5, "renormalize", "jsd", None)
    keep = labels != -100
    ref = torch.where(keep, ref, 0.0)
    ref = ref if reduction == "none" else ref.sum() / keep.sum()
    ref_grads = torch.autograd.grad(ref, refs, grad_output.double())
    tolerance = 2e-5 if dtype == torch.float32 else TOLERANCE[torch.bfloat16]
    assert rel_err(loss, ref) < tolerance
    assert all(rel_err(a, b) < tolerance for a, b in zip(grads, ref_grads))
    assert grads[1].dtype == dtype and (grads[1][vocab:] == 0).all()


def test_both_weight_gradient_forms_of_the_support_path_agree():
    # The GPU's atomic index_add_ form and the CPU's sparse product, run here side by side
    # against float64 (repeated ids across rows, as top-k sets overlap).
    from fastkd.kernels.fused_linear.support import _weight_grad
    N, K, H, vocab = 23, 7, 12, 40
    grad = torch.randn(N, K, device=DEVICE)
    index = torch.randint(0, vocab, (N, K), device=DEVICE)
    hidden = torch.randn(N, H, device=DEVICE)
    ref = torch.zeros(vocab, H, dtype=torch.float64, device=DEVICE)
    for n in range(N):
        for j in range(K):
            ref[index[n, j]] += grad[n, j].double() * hidden[n].double()
    chunks = [(0, 10), (10, 20), (20, 23)]
    for atomic in (True, False):
        out = _weight_grad(grad, index, hidden, vocab, torch.float32, chunks, atomic=atomic)
        assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-6


def test_padding_rows_of_fused_linear_topk_need_no_labels():
    # Rows fused_linear_topk leaves as padding (ignored labels: ids -1, log-probs -inf) have no
    # present entry: the sparse loss ignores them whether it is given the labels or not.
    hidden, weight = torch.randn(10, 16, device=DEVICE), torch.randn(90, 16, device=DEVICE)
    labels = torch.randint(0, 90, (10,), device=DEVICE)
    labels[[2, 7]] = -100
    top = fastkd.fused_linear_topk(hidden, weight, 6, labels=labels)
    student = torch.randn(10, 90, device=DEVICE)
    with_labels = fastkd.sparse_kd_loss(student, *top, labels, divergence="tvd")
    without = fastkd.sparse_kd_loss(student, *top, divergence="tvd")
    assert torch.isfinite(without) and rel_err(without, with_labels) < 1e-6
