"""Per-token results of the fused linear losses: soft and hard losses per token and the student's
entropy (return_entropy), against float64 formulas written here from the definitions."""

import pytest
import torch

import fastkd
from conftest import DEVICE, each_backend
from fastkd.divergences import DivergenceSpec
from fastkd.ops.schema import flatten
from fastkd.options import FusedLinearOptions
from reference import rel_err, row_losses, sparse_rows

V = 777


def _problem(leading, hidden=16, dtype=torch.float32, logit_scale=0.3):
    return (torch.randn(*leading, hidden, device=DEVICE).to(dtype),
            (torch.randn(V, hidden, device=DEVICE) * logit_scale).to(dtype),
            torch.randn(*leading, hidden + 3, device=DEVICE).to(dtype),
            (torch.randn(V, hidden + 3, device=DEVICE) * logit_scale).to(dtype))


def _labels(leading):
    labels = torch.randint(0, V, leading, device=DEVICE)
    labels.view(-1)[::4] = -100
    return labels


def _entropy(logits, temperature, scale=1.0, softcap=0.0):
    """−Σ q log q of q = softmax(transformed logits / T), float64."""
    z = logits.double() * scale
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    log_q = torch.log_softmax(z / temperature, -1)
    return -(log_q.exp() * log_q).sum(-1)


def _cross_entropy(logits, labels):
    log_q = torch.log_softmax(logits.double(), -1)
    return -log_q.gather(-1, torch.where(labels == -100, 0, labels).unsqueeze(-1)).squeeze(-1)


@each_backend("kd_rows", "ce")
@pytest.mark.parametrize("reduction,transforms", [("mean", False), ("sum", False), ("none", False),
                                                  ("mean", True)])
def test_per_token_losses_and_entropy_match_float64(backend, reduction, transforms):
    leading = (3, 5)
    sh, sw, th, tw = _problem(leading)
    labels = _labels(leading)
    temperature, scale, softcap = 2.0, (1.5 if transforms else 1.0), (3.0 if transforms else 0.0)
    extra = dict(student_logit_scale=scale, student_softcap=softcap) if transforms else {}
    out = fastkd.fused_linear_kd_loss(sh, sw, th, tw, labels, divergence="jsd", temperature=temperature,
                                      temperature_squared=True, hard_weight=0.4, reduction=reduction,
                                      return_entropy=True, backend=backend, **extra)
    assert isinstance(out, fastkd.FusedLoss)
    student, teacher = sh.double() @ sw.double().t(), th.double() @ tw.double().t()
    capped = softcap * torch.tanh(student * scale / softcap) if transforms else student
    active = labels != -100
    soft = torch.where(active, row_losses("jsd", capped, teacher, temperature) * temperature ** 2, 0.0)
    hard = torch.where(active, _cross_entropy(capped, labels), 0.0)  # the model's (scaled, capped) logits
    entropy = torch.where(active, _entropy(student, temperature, scale, softcap), 0.0)
    for name, value, ref in (("soft_per_token", out.soft_per_token, soft), ("hard_per_token", out.hard_per_token, hard),
                             ("entropy", out.entropy, entropy)):
        assert value.shape == leading and value.dtype == torch.float32 and not value.requires_grad, name
        assert rel_err(value, ref) < 1e-5, name
        assert (value[~active] == 0).all(), name
    assert bool((out.entropy[active] > 0).all())


def test_entropy_with_logits_of_plus_minus_100():
    sh, sw, th, tw = _problem((6,), logit_scale=1.0)
    bias = torch.zeros(V, device=DEVICE)
    bias[:V // 2], bias[V // 2:V // 2 + 3] = -100.0, 100.0  # three near-certain tokens, half masked by −100
    labels = _labels((6,))
    for temperature in (0.5, 1.0, 4.0):
        out = fastkd.fused_linear_kd_loss(sh, sw, th, tw, labels, student_bias=bias, temperature=temperature,
                                          return_entropy=True)
        student = sh.double() @ sw.double().t() + bias.double()
        ref = torch.where(labels != -100, _entropy(student, temperature), 0.0)
        assert torch.isfinite(out.entropy).all()
        assert (out.entropy - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("fp32_logits,tolerance", [(True, 2e-5), (False, 2e-2)])
def test_bf16_entropy(fp32_logits, tolerance):
    sh, sw, th, tw = _problem((40,), hidden=64, dtype=torch.bfloat16, logit_scale=0.6)
    labels = _labels((40,))
    out = fastkd.fused_linear_kd_loss(sh, sw, th, tw, labels, temperature=1.0, return_entropy=True,
                                      fp32_logits=fp32_logits)
    ref = torch.where(labels != -100, _entropy(sh.double() @ sw.double().t(), 1.0), 0.0)
    assert out.entropy.dtype == torch.float32
    assert rel_err(out.entropy, ref) < tolerance


def test_sparse_teacher_per_token_results():
    leading = (9,)
    sh, sw, _, _ = _problem(leading)
    logprobs, indices = torch.log_softmax(torch.randn(9, V, device=DEVICE) * 2, -1).topk(20, dim=-1)
    labels = _labels(leading)
    out = fastkd.fused_linear_sparse_kd_loss(sh, sw, indices, logprobs, labels, hard_weight=0.5, temperature=2.0,
                                             return_entropy=True)
    student = sh.double() @ sw.double().t()
    active = labels != -100
    soft = torch.where(active, sparse_rows(student, indices, logprobs, "forward_kl", 2.0, "renormalize"), 0.0)
    assert rel_err(out.soft_per_token, soft) < 1e-5
    assert rel_err(out.hard_per_token, torch.where(active, _cross_entropy(student, labels), 0.0)) < 1e-5
    assert rel_err(out.entropy, torch.where(active, _entropy(student, 2.0), 0.0)) < 1e-5


def test_components_without_entropy_and_entropy_without_components():
    sh, sw, th, tw = _problem((7,))
    labels = _labels((7,))
    components = fastkd.fused_linear_kd_loss(sh, sw, th, tw, labels, return_components=True)
    assert components.entropy is None and components.soft_per_token.shape == (7,)
    # return_entropy alone returns the FusedLoss too; the loss and its gradient do not change.
    leaves = [sh.clone().requires_grad_(True), sw.clone().requires_grad_(True)]
    with_entropy = fastkd.fused_linear_kd_loss(*leaves, th, tw, labels, return_entropy=True)
    plain = fastkd.fused_linear_kd_loss(sh.requires_grad_(True), sw.requires_grad_(True), th, tw, labels)
    assert isinstance(with_entropy, fastkd.FusedLoss) and with_entropy.entropy.shape == (7,)
    assert torch.equal(with_entropy.loss, plain)
    grads = torch.autograd.grad(with_entropy.loss, leaves)
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(plain, (sh, sw))))
    assert torch.allclose(components.soft, components.soft_per_token.sum() / (labels != -100).sum())


def test_reduction_none_gradient_with_entropy():
    sh, sw, th, tw = _problem((6,))
    leaves = [sh.requires_grad_(True), sw.requires_grad_(True)]
    out = fastkd.fused_linear_kd_loss(*leaves, th, tw, reduction="none", return_entropy=True)
    grad_output = torch.rand(6, device=DEVICE)
    grads = torch.autograd.grad(out.loss, leaves, grad_output)
    ref_leaves = [leaf.detach().double().requires_grad_(True) for leaf in leaves]
    ref = row_losses("forward_kl", ref_leaves[0] @ ref_leaves[1].t(), th.double() @ tw.double().t())
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_output.double())
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(grads, ref_grads))
    assert rel_err(out.entropy, _entropy(sh.detach() @ sw.detach().t(), 1.0)) < 1e-5


def test_opcheck_with_entropy_and_fp32_logits():
    sh, sw, th, tw = _problem((3,), hidden=8)
    sh, sw, th, tw = (t.bfloat16() for t in (sh, sw, th, tw))
    sh.requires_grad_(True)
    sw.requires_grad_(True)
    labels = torch.tensor([1, -100, 3], device=DEVICE)
    scale = torch.full((3,), 0.5, device=DEVICE)
    options = flatten(FusedLinearOptions(DivergenceSpec("jsd", 2.0, 0.3), "renormalize", -100, True, "torch",
                                         "torch", True, True))
    torch.library.opcheck(torch.ops.fastkd.fused_linear_kd_weighted.default,
                          (sh, sw, None, th, tw, None, None, None, labels, scale, scale, *options, True, True, False))
    torch.library.opcheck(torch.ops.fastkd.fused_linear_kd_rows.default,
                          (sh, sw, None, th, tw, None, None, None, labels, *options))


@pytest.mark.parametrize("value", [1, "yes"])
def test_return_entropy_must_be_a_bool(value):
    with pytest.raises(TypeError, match="return_entropy"):
        fastkd.fused_linear_kd_loss(*_problem((2,)), return_entropy=value)


def test_module_returns_entropy():
    sh, sw, th, tw = _problem((4,))
    module = fastkd.FusedLinearKDLoss("forward_kl", temperature=2.0, return_entropy=True)
    out = module(sh, sw, th, tw)
    assert rel_err(out.entropy, _entropy(sh @ sw.t(), 2.0)) < 1e-5
