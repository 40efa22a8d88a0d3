"""Random-sampling KD (fastkd.sampled_kd_loss and its fused linear form) against float64
formulas, and its gradient's expectation against the dense forward-KL gradient."""

import math

import pytest
import torch

import fastkd
from conftest import DEVICE, each_backend
from reference import rel_err


def reference_rows(student, ids, weights, temperature, num_samples=None):
    """float64 −Σ_j (w_j/W)·log softmax(student/T)_{x_j}, W = Σ w or num_samples; 0 for rows
    without weight."""
    log_q = torch.log_softmax(student.double() / temperature, -1)
    w = weights.double()
    total = w.sum(-1, keepdim=True)
    norm = total if num_samples is None else torch.full_like(total, float(num_samples))
    picked = log_q.gather(1, ids.clamp(0, student.shape[1] - 1))
    loss = -(torch.where(w > 0, w * picked, 0.0)).sum(-1) / norm[:, 0]
    return torch.where(total[:, 0] > 0, loss, 0.0)


@each_backend("sampled_kd")
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("num_samples", [None, 40])
def test_sampled_loss_and_gradient_match_the_formula(backend, temperature, num_samples):
    # Draws with replacement (repeated ids), integer counts, ignored rows, ±100 logits.
    n_rows, vocab, n_draws = 9, 203, 40
    teacher = torch.randn(n_rows, vocab, dtype=torch.float64, device=DEVICE) * 3
    ids = torch.multinomial((teacher / temperature).softmax(-1), n_draws, replacement=True)
    counts = torch.ones(n_rows, n_draws, dtype=torch.int64, device=DEVICE)
    student = torch.randn(n_rows, vocab, device=DEVICE) * 4
    student[::4] *= 25
    student.requires_grad_(True)
    labels = torch.randint(0, vocab, (n_rows,), device=DEVICE)
    labels[2] = -100
    grad_output = torch.rand(n_rows, device=DEVICE) + 0.5
    loss = fastkd.sampled_kd_loss(student, ids, counts, labels, temperature=temperature, num_samples=num_samples,
                                  reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(loss, student, grad_output)
    ref_student = student.detach().double().requires_grad_(True)
    ref = torch.where(labels != -100, reference_rows(ref_student, ids, counts, temperature, num_samples), 0.0)
    (ref_grad,) = torch.autograd.grad(ref, ref_student, grad_output.double())
    assert rel_err(loss, ref) < 2e-5 and rel_err(grad, ref_grad) < 2e-5
    # Unique ids with their counts are the same loss as the draws one by one.
    unique = [torch.unique(row, return_counts=True) for row in ids]
    width = max(len(u) for u, _ in unique)
    uids = torch.full((n_rows, width), -1, dtype=torch.int64, device=DEVICE)
    ucounts = torch.zeros(n_rows, width, dtype=torch.int64, device=DEVICE)
    for row, (u, c) in enumerate(unique):
        uids[row, :len(u)], ucounts[row, :len(u)] = u, c
    compact = fastkd.sampled_kd_loss(student, uids, ucounts, labels, temperature=temperature,
                                     num_samples=num_samples, reduction="none", backend=backend)
    assert rel_err(compact, loss) < 1e-6


def _draws(p, n_draws, generator):
    return torch.multinomial(p, n_draws, replacement=True, generator=generator)


@pytest.mark.parametrize("proposal_temperature", [None, 2.0])
def test_the_sampled_gradient_is_unbiased_for_the_forward_kl_gradient(proposal_temperature):
    # One row, 20000 draws in one batch: their mean gradient against the dense ∇KL(p‖q) = (q − p)/T,
    # within 5 standard errors per coordinate, the errors from the draws' own sample variance.
    # None: draws from p, weight 1 each (self-normalised: W = K exactly). 2.0: draws from the
    # proposal r = softmax(z/2) with importance weights p/r and W = the number of draws.
    vocab, n_draws, temperature = 60, 20000, 1.5
    generator = torch.Generator(device=DEVICE).manual_seed(1234)
    z = torch.randn(1, vocab, dtype=torch.float64, device=DEVICE, generator=generator) * 2
    student = (torch.randn(1, vocab, device=DEVICE, generator=generator, dtype=torch.float64) * 2)
    p = (z / temperature).softmax(-1)
    if proposal_temperature is None:
        ids = _draws(p, n_draws, generator)
        weights = torch.ones(1, n_draws, dtype=torch.float64, device=DEVICE)
        num_samples = None
    else:
        r = (z / proposal_temperature).softmax(-1)
        ids = _draws(r, n_draws, generator)
        weights = (p / r).gather(1, ids)
        num_samples = n_draws
    x = student.clone().requires_grad_(True)
    loss = fastkd.sampled_kd_loss(x, ids, weights, temperature=temperature, num_samples=num_samples)
    (grad,) = torch.autograd.grad(loss, x)
    dense = (student / temperature).softmax(-1) - p
    dense = dense / temperature
    # Each draw's own gradient is (q − w_j·e_{x_j})/T (weights normalised to a mean of 1 per draw
    # when self-normalised): the spread of w_j·e_{x_j} per coordinate gives the standard error.
    per_draw = torch.zeros(n_draws, vocab, dtype=torch.float64, device=DEVICE)
    scale = weights[0] if num_samples else weights[0] * n_draws / weights[0].sum()
    per_draw[torch.arange(n_draws, device=DEVICE), ids[0]] = scale
    standard_error = per_draw.std(0) / math.sqrt(n_draws) / temperature
    deviation = (grad[0] - dense[0]).abs()
    # A coordinate never drawn has a sample spread of 0: its resolution is one draw's share.
    resolution = per_draw.max() / n_draws / temperature
    assert (deviation <= 5 * torch.clamp(standard_error, min=resolution)).all()
    # and the estimate is not trivially loose: it is closer to ∇KL than ∇KL is to zero.
    assert (grad[0] - dense[0]).norm() < 0.1 * dense[0].norm()


@each_backend("sampled_kd", "ce")
def test_fused_linear_sampled_matches_the_formula_on_materialised_logits(backend):
    hidden = torch.randn(2, 4, 16, device=DEVICE, requires_grad=True)
    weight = (torch.randn(203, 16, device=DEVICE) * 0.3).requires_grad_(True)
    ids = torch.randint(0, 200, (2, 4, 12), device=DEVICE)
    weights = torch.rand(2, 4, 12, device=DEVICE)
    mask = torch.rand(2, 4, 12, device=DEVICE) < 0.8
    mask[1, 3] = False  # a row without samples
    labels = torch.randint(0, 200, (2, 4), device=DEVICE)
    labels[0, 1] = -100
    loss = fastkd.fused_linear_sampled_kd_loss(hidden, weight, ids, weights, labels, vocab_size=200,
                                               teacher_mask=mask, temperature=1.7, hard_weight=0.3, backend=backend)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_hidden = hidden.detach().double().requires_grad_(True)
    ref_weight = weight.detach().double().requires_grad_(True)
    logits = (ref_hidden @ ref_weight[:200].t()).view(8, 200)
    soft = reference_rows(logits, ids.view(8, 12), torch.where(mask, weights, 0.0).view(8, 12), 1.7)
    keep = labels.view(-1) != -100  # with a hard term, the row without samples still counts (its CE)
    ref = soft[keep].sum() / keep.sum() + 0.3 * torch.nn.functional.cross_entropy(logits, labels.view(-1))
    ref_grads = torch.autograd.grad(ref, (ref_hidden, ref_weight))
    assert rel_err(loss, ref) < 2e-5
    assert all(rel_err(a, b) < 2e-5 for a, b in zip(grads, ref_grads))
    # Without the hard term, the row without samples leaves the mean.
    loss = fastkd.fused_linear_sampled_kd_loss(hidden, weight, ids, weights, labels, vocab_size=200,
                                               teacher_mask=mask, temperature=1.7, backend=backend)
    keep = keep & mask.view(8, 12).any(-1)
    assert rel_err(loss, soft[keep].sum() / keep.sum()) < 2e-5


def test_padding_absent_rows_and_out_of_range_ids():
    student = torch.randn(3, 11, device=DEVICE, requires_grad=True)
    ids = torch.tensor([[0, 4, -1], [-1, -1, -1], [2, 11, 3]], device=DEVICE)
    weights = torch.tensor([[2.0, 1.0, 5.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], device=DEVICE)
    loss = fastkd.sampled_kd_loss(student, ids, weights, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), student)
    ref = reference_rows(student.detach(), ids[:1, :2], weights[:1, :2], 1.0)
    assert rel_err(loss[0], ref[0]) < 1e-6
    assert loss[1] == 0 and (grad[1] == 0).all()  # padding only: an ignored row
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()  # id 11 ≥ V: NaN, no crash, no sync
    mean = fastkd.sampled_kd_loss(student[:2], ids[:2], weights[:2])
    assert rel_err(mean, ref[0]) < 1e-6  # the row without samples leaves the mean


@pytest.mark.parametrize("call,error,words", [
    (dict(sample_weights=torch.ones(3, 2, dtype=torch.bool)), TypeError, ["sample_weights"]),
    (dict(sampled_ids=torch.ones(3, 2)), TypeError, ["sampled_ids", "integer"]),
    (dict(sample_weights=torch.ones(3, 3)), ValueError, ["sample_weights shape"]),
    (dict(num_samples=0), ValueError, ["num_samples", "> 0"]),
    (dict(num_samples="8"), TypeError, ["num_samples"]),
    (dict(sample_weights=-torch.ones(3, 2), validate=True), ValueError, ["sample_weights", "≥ 0"]),
    (dict(sampled_ids=torch.tensor([[0, 11]] * 3), validate=True), ValueError, ["outside [0, 11)"]),
    (dict(teacher_mask=torch.ones(3, 2)), TypeError, ["teacher_mask", "bool"]),
])
def test_bad_sampled_input_names_the_argument(call, error, words):
    arguments = dict(student_logits=torch.randn(3, 11), sampled_ids=torch.tensor([[0, 1]] * 3),
                     sample_weights=torch.ones(3, 2))
    options = {}
    for key, value in call.items():
        (arguments if key in arguments else options)[key] = value
    arguments = {k: v.to(DEVICE) for k, v in arguments.items()}
    options = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    with pytest.raises(error) as info:
        fastkd.sampled_kd_loss(*arguments.values(), **options)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_modules_and_compile_without_graph_breaks():
    student = torch.randn(4, 30, device=DEVICE, requires_grad=True)
    ids = torch.randint(0, 30, (4, 7), device=DEVICE)
    weights = torch.rand(4, 7, device=DEVICE)
    module = fastkd.SampledKDLoss(temperature=2.0, num_samples=7)
    assert "num_samples=7" in repr(module)
    expected = fastkd.sampled_kd_loss(student, ids, weights, temperature=2.0, num_samples=7)
    assert torch.equal(module(student, ids, weights), expected)
    hidden, weight = torch.randn(4, 8, device=DEVICE), torch.randn(30, 8, device=DEVICE)
    fused = fastkd.FusedLinearSampledKDLoss(temperature=2.0)
    assert torch.equal(fused(hidden, weight, ids, weights),
                       fastkd.fused_linear_sampled_kd_loss(hidden, weight, ids, weights, temperature=2.0))
    with pytest.raises(ValueError, match="num_samples"):
        fastkd.SampledKDLoss(num_samples=-1)
    compiled = torch.compile(lambda s, i, w: fastkd.sampled_kd_loss(s, i, w, temperature=2.0, num_samples=7),
                             fullgraph=True, backend="eager")
    assert rel_err(compiled(student, ids, weights), expected) < 1e-6
