"""fastkd.compat.torchtune against a float64 transcription of torchtune 0.6.1's KD losses, against
torchtune's own test cases, and against torchtune itself when it is installed."""

import math

import pytest
import torch

from conftest import TOLERANCE
from fastkd.compat import torchtune as tt
from peers import skip_reason, torchtune_kd_losses
from reference import rel_err

RATIO = 0.3


def _definition(kind, student, teacher, labels, normalize=True, ratio=RATIO, ignore_index=-100):
    """torchtune's formulas in float64: forward −Σ p log q over finite student logits, reverse
    Σ q (log q − log p) over entries where both are finite, rows masked, / number kept."""
    s, t = student.double().reshape(-1, student.shape[-1]), teacher.double().reshape(-1, teacher.shape[-1])
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    zero = torch.zeros((), dtype=torch.float64)
    forward = -torch.where(torch.isinf(s), zero, log_p.exp() * torch.where(torch.isinf(s), zero, log_q)).sum(-1)
    both = torch.isinf(s) | torch.isinf(t)
    reverse = torch.where(both, zero, log_q.exp() * torch.where(both, zero, log_q - log_p)).sum(-1)
    rows = {"forward": forward, "reverse": reverse, "symmetric": ratio * forward + (1 - ratio) * reverse}[kind]
    keep = labels.reshape(-1) != ignore_index
    total = torch.where(keep, rows, zero).sum()
    if not normalize:
        return total
    return total / keep.sum() if keep.any() else zero


MODULES = {"forward": (tt.ForwardKLLoss, {}), "reverse": (tt.ReverseKLLoss, {}),
           "symmetric": (tt.SymmetricKLLoss, {"sym_kd_ratio": RATIO})}
CHUNKED = {"forward": (tt.ForwardKLWithChunkedOutputLoss, {}), "reverse": (tt.ReverseKLWithChunkedOutputLoss, {}),
           "symmetric": (tt.SymmetricKLWithChunkedOutputLoss, {"sym_kd_ratio": RATIO})}


def _case(B=3, T=7, V=1271, scale=100.0, dtype=torch.float32, ignored=0.3):
    student = (torch.randn(B, T, V) * scale / 3).clamp(-scale, scale).to(dtype)
    teacher = (torch.randn(B, T, V) * scale / 3).clamp(-scale, scale).to(dtype)
    labels = torch.randint(0, V, (B, T))
    labels[torch.rand(B, T) < ignored] = -100
    return student, teacher, labels


def _check(ours, student, ref_fn, dtype):
    leaf = student.detach().double().requires_grad_(True)
    ref = ref_fn(leaf)
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    (grad,) = torch.autograd.grad(ours, student)
    loss_tol = TOLERANCE[torch.float64] * 1e3 if dtype == torch.float64 else 2e-5
    assert rel_err(ours, ref) < loss_tol
    assert rel_err(grad, ref_grad) < max(TOLERANCE[dtype], 1e-9) * 4
    assert grad.dtype == student.dtype


@pytest.mark.parametrize("kind", ["forward", "reverse", "symmetric"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_definition(kind, dtype, normalize):
    student, teacher, labels = _case(dtype=dtype)
    student.requires_grad_(True)
    cls, kwargs = MODULES[kind]
    ours = cls(**kwargs)(student, teacher, labels, normalize)
    assert ours.shape == () and ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _check(ours, student, lambda s: _definition(kind, s, teacher, labels, normalize), dtype)


@pytest.mark.parametrize("kind", ["forward", "reverse", "symmetric"])
def test_chunked_lists_match_definition(kind):
    student, teacher, labels = _case(T=50, V=97, scale=10.0)
    student.requires_grad_(True)
    cls, kwargs = CHUNKED[kind]
    loss_fn = cls(num_output_chunks=8, **kwargs)
    chunks = list(student.chunk(8, dim=1))
    ours = loss_fn(chunks, list(teacher.chunk(8, dim=1)), labels)
    _check(ours, student, lambda s: _definition(kind, s, teacher, labels), torch.float32)


@pytest.mark.parametrize("kind", ["forward", "reverse", "symmetric"])
def test_infinite_logits_are_dropped_as_in_torchtune(kind):
    student, teacher, labels = _case(B=2, T=5, V=64, scale=8.0)
    student[0, 0, :5] = -math.inf           # student masks tokens the teacher gives mass to
    teacher[0, 1, 5:9] = -math.inf          # teacher masks tokens the student gives mass to
    student[1, 2, 10:20] = -math.inf        # both mask the same tokens
    teacher[1, 2, 10:20] = -math.inf
    labels[0, :2] = 3
    student.requires_grad_(True)
    cls, kwargs = MODULES[kind]
    ours = cls(**kwargs)(student, teacher, labels)
    assert torch.isfinite(ours)
    _check(ours, student, lambda s: _definition(kind, s, teacher, labels), torch.float32)


@pytest.mark.parametrize("kind", ["forward", "reverse", "symmetric"])
def test_all_rows_ignored_is_zero_with_zero_gradient(kind):
    student, teacher, labels = _case(B=2, T=8, V=33)
    labels[:] = -100
    student.requires_grad_(True)
    for loss in (MODULES[kind][0](**MODULES[kind][1])(student, teacher, labels),
                 CHUNKED[kind][0](num_output_chunks=4, **CHUNKED[kind][1])(
                     list(student.chunk(4, dim=1)), list(teacher.chunk(4, dim=1)), labels)):
        (grad,) = torch.autograd.grad(loss, student)
        assert loss.item() == 0.0 and not grad.any()


# torchtune's own test cases (tests/torchtune/modules/loss/test_kd_losses.py at v0.6.1).
_STUDENT = [[[1.1250, -0.4102, -0.0879, -2.5000], [0.2676, 0.3535, 0.8711, -1.4688],
             [-0.1084, 1.6641, 0.0084, 0.1196], [0.5000, -0.6406, -0.2236, -1.5938]],
            [[-1.5312, -1.9219, 0.0000, -0.5039], [-1.5391, 1.5312, 0.5820, 0.2695],
             [-0.3887, 1.2188, 0.0000, 0.6055], [0.5000, 1.3828, 0.1309, -1.0312]]]
_TEACHER = [[[-0.0381, -1.2578, -1.2031, 0.0947], [-0.7852, 0.4492, 1.5547, 0.0972],
             [0.8203, 0.0012, 0.7656, 0.3477], [-1.5781, 0.4297, 0.5977, 0.3926]],
            [[1.5156, 0.1641, 2.0781, -0.7734], [-0.5898, 0.4453, -0.7969, 0.6328],
             [0.6289, -0.8359, 0.9258, 0.2109], [0.0006, 0.5195, 3.2344, -1.5781]]]


@pytest.mark.parametrize("kind, expected", [("forward", 1.7209), ("reverse", 0.6775), ("symmetric", 1.1992)])
def test_torchtune_expected_values(kind, expected):
    student = torch.tensor(_STUDENT, dtype=torch.bfloat16)
    teacher = torch.tensor(_TEACHER, dtype=torch.bfloat16)
    labels = torch.tensor([[0, 3, 3, 1], [1, 1, 1, 1]])
    kwargs = {"sym_kd_ratio": 0.5} if kind == "symmetric" else {}
    standard = MODULES[kind][0](**kwargs)(student, teacher, labels)
    chunked = CHUNKED[kind][0](num_output_chunks=2, **kwargs)(student.chunk(2, dim=1), teacher.chunk(2, dim=1), labels)
    assert standard.item() == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert chunked.item() == pytest.approx(standard.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["forward", "reverse", "symmetric"])
def test_torchtune_chunked_equals_standard_case(kind):
    # torchtune's random case: bf16, 3×50×50, 8 chunks, ~20 % of the labels ignored.
    student, teacher, labels = _case(T=50, V=50, scale=3.0, dtype=torch.bfloat16, ignored=0.2)
    chunked = CHUNKED[kind][0](num_output_chunks=8, **CHUNKED[kind][1])(
        student.chunk(8, dim=1), teacher.chunk(8, dim=1), labels)
    standard = MODULES[kind][0](**MODULES[kind][1])(student.reshape(-1, 50), teacher.reshape(-1, 50), labels.reshape(-1))
    assert rel_err(chunked, standard) < 1e-6
    assert rel_err(standard, _definition(kind, student, teacher, labels)) < 2e-6


def test_bad_arguments_are_named():
    student, teacher, labels = _case(B=2, T=4, V=11)
    with pytest.raises(ValueError, match="sym_kd_ratio"):
        tt.SymmetricKLLoss(sym_kd_ratio=1.5)
    with pytest.raises(ValueError, match="labels"):
        tt.ForwardKLLoss()(student, teacher, labels[:, :3])
    with pytest.raises(ValueError, match="teacher_logits"):
        tt.ReverseKLLoss()(student, teacher[..., :10], labels)
    with pytest.raises(ValueError, match="chunks"):
        tt.ForwardKLWithChunkedOutputLoss(num_output_chunks=4)(student.chunk(2, dim=1), teacher.chunk(2, dim=1),
                                                              labels)
    with pytest.raises(ValueError, match=r"student_logits\[1\]"):
        tt.ReverseKLWithChunkedOutputLoss(num_output_chunks=2)(
            [student[:, :2], student[:, 2:3]], list(teacher.chunk(2, dim=1)), labels)


@pytest.mark.skipif(skip_reason("torchtune") is not None, reason=str(skip_reason("torchtune")))
@pytest.mark.parametrize("kind", ["forward", "reverse", "symmetric"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torchtune_itself(kind, dtype):
    peer = torchtune_kd_losses()
    names = {"forward": "ForwardKL", "reverse": "ReverseKL", "symmetric": "SymmetricKL"}[kind]
    kwargs = {"sym_kd_ratio": RATIO} if kind == "symmetric" else {}
    student, teacher, labels = _case(T=16, V=1271, scale=100.0, dtype=dtype)
    student[0, 0, :7] = -math.inf
    teacher[1, 3, 7:20] = -math.inf
    labels[0, 0] = 5
    student.requires_grad_(True)
    ours = MODULES[kind][0](**kwargs)(student, teacher, labels)
    theirs = getattr(peer, names + "Loss")(**kwargs)(student, teacher, labels)
    _agree(ours, theirs, student, teacher)
    chunked_kwargs = dict(num_output_chunks=4, **kwargs)
    ours = CHUNKED[kind][0](**chunked_kwargs)(student.chunk(4, dim=1), teacher.chunk(4, dim=1), labels)
    theirs = getattr(peer, names + "WithChunkedOutputLoss")(**chunked_kwargs)(
        student.chunk(4, dim=1), teacher.chunk(4, dim=1), labels)
    _agree(ours, theirs, student, teacher)


def _agree(ours, theirs, student, teacher):
    """Equal values and gradients; where torchtune's gradient is NaN (its reverse KL through a row
    with an infinite logit: 0·inf in autograd), ours is finite (the documented difference)."""
    grad, their_grad = (torch.autograd.grad(loss, student)[0] for loss in (ours, theirs))
    finite_rows = torch.isfinite(their_grad).all(-1)
    assert rel_err(ours, theirs) < 1e-5
    assert torch.isfinite(grad).all()
    assert rel_err(grad[finite_rows], their_grad[finite_rows]) < 1e-5
    assert (finite_rows | (torch.isinf(student) | torch.isinf(teacher)).any(-1)).all()
