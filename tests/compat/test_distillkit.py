"""fastkd.compat.distillkit.sparse_kl_div against a float64 transcription of DistillKit's sparse KL
(distillkit/lossfuncs/kl.py and common.py; DistillKit is not on PyPI, so there is no direct
comparison here)."""

import math

import pytest
import torch

from conftest import TOLERANCE
from fastkd.compat.distillkit import MissingProbabilityHandling as Missing
from fastkd.compat.distillkit import sparse_kl_div
from reference import rel_err


def _definition(logits, ids, values, mask, missing, log_target, temperature, generation_temperature, eps=1e-8):
    """DistillKit's formulas in float64."""
    log_q = torch.log_softmax(logits.double() / temperature, -1)  # student generation temperature 1
    s = log_q.gather(-1, ids)
    v = values.double()
    alpha = generation_temperature / temperature
    changed = not math.isclose(temperature, generation_temperature)
    if not log_target:
        logits_t = v * alpha if changed else v
        t = logits_t - torch.logsumexp(logits_t, -1, keepdim=True)
    elif not changed and missing == Missing.SYMMETRIC_UNIFORM:
        t = v
    else:
        leftover = (1 - v.exp().sum(-1, keepdim=True)).clamp(0, 1)
        norm = (alpha * v).exp().sum(-1, keepdim=True)
        if missing == Missing.SYMMETRIC_UNIFORM:
            norm = norm + leftover ** alpha
        t = alpha * v - norm.log()
    loss = (t.exp() * (t - s)).sum(-1)
    if missing == Missing.SYMMETRIC_UNIFORM:
        teacher_missing = 1 - t.exp().sum(-1).clamp(eps, 1 - eps)
        student_missing = 1 - s.exp().sum(-1).clamp(eps, 1 - eps)
        loss = loss + teacher_missing * (teacher_missing.log() - student_missing.log())
    if mask is not None:
        loss = torch.where(mask.bool(), loss * mask, 0.0)
    return loss.sum()


def _case(B=3, S=7, V=1271, K=8, scale=30.0, dtype=torch.float32, generation_temperature=1.0):
    logits = (torch.randn(B, S, V) * scale / 3).clamp(-scale, scale).to(dtype)
    teacher = torch.log_softmax((torch.randn(B, S, V) * scale / 3) / generation_temperature, -1)
    ids = teacher.topk(K, -1).indices
    values = teacher.gather(-1, ids)
    mask = torch.rand(B, S) > 0.3
    return logits, ids, values, mask


@pytest.mark.parametrize("missing", [Missing.ZERO, Missing.SYMMETRIC_UNIFORM])
@pytest.mark.parametrize("temperatures", [(1.0, 1.0), (2.0, 1.0), (1.5, 0.7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_matches_definition(missing, temperatures, dtype):
    temperature, generation_temperature = temperatures
    logits, ids, values, mask = _case(dtype=dtype, generation_temperature=generation_temperature)
    logits.requires_grad_(True)
    ours = sparse_kl_div(logits, ids, values, mask, missing=missing, temperature=temperature,
                         target_generation_temperature=generation_temperature)
    leaf = logits.detach().double().requires_grad_(True)
    ref = _definition(leaf, ids, values, mask, missing, True, temperature, generation_temperature)
    assert ours.dtype == dtype
    loss_tol = {torch.float64: 1e-10, torch.float32: 5e-6, torch.bfloat16: 4e-3}[dtype]  # bf16: the output's rounding
    assert rel_err(ours, ref) < loss_tol
    (grad,) = torch.autograd.grad(ours * 1.7, logits)
    (ref_grad,) = torch.autograd.grad(ref * 1.7, leaf)
    assert rel_err(grad, ref_grad) < max(TOLERANCE[dtype], 1e-9) * 4


def test_modes_differ_from_fastkd_renormalize_and_tail_where_documented():
    # ZERO keeps the student's full softmax: it equals fastkd's "renormalize" plus log Σ_k q, and
    # SYMMETRIC_UNIFORM clamps the missing masses; both are exact here, not mapped.
    import fastkd

    logits, ids, values, mask = _case(B=1, S=4, V=97, K=5, scale=5.0)
    mask[:] = True
    zero = sparse_kl_div(logits, ids, values, mask, missing="zero")
    renormalized = fastkd.sparse_kd_loss(logits, ids, values - torch.logsumexp(values, -1, keepdim=True),
                                         missing_mass="renormalize", reduction="sum")
    log_q_support = torch.logsumexp(torch.log_softmax(logits.double(), -1).gather(-1, ids), -1).sum()
    assert rel_err(zero, renormalized.double() - log_q_support) < 1e-5


def test_logit_targets_and_mask_shapes():
    logits, ids, _, mask = _case(V=211)
    teacher_logits = torch.randn(3, 7, 8) * 4
    ours = sparse_kl_div(logits, ids, teacher_logits, mask[..., None].float(), log_target=False, temperature=1.3,
                         target_generation_temperature=0.9)
    ref = _definition(logits, ids, teacher_logits, mask.float(), Missing.ZERO, False, 1.3, 0.9)
    assert rel_err(ours, ref) < 5e-6
    assert rel_err(sparse_kl_div(logits, ids, teacher_logits, None, log_target=False),
                   _definition(logits, ids, teacher_logits, None, Missing.ZERO, False, 1.0, 1.0)) < 5e-6


def test_all_masked_and_full_support_are_finite():
    logits, ids, values, mask = _case(B=2, S=3, V=16, K=16, scale=5.0)  # the top-k is the whole vocabulary
    logits.requires_grad_(True)
    loss = sparse_kl_div(logits, ids, values, mask, missing=Missing.SYMMETRIC_UNIFORM)
    assert torch.isfinite(loss) and torch.isfinite(torch.autograd.grad(loss, logits)[0]).all()
    mask[:] = False
    loss = sparse_kl_div(logits, ids, values, mask, missing=Missing.SYMMETRIC_UNIFORM)
    assert loss.item() == 0.0 and not torch.autograd.grad(loss, logits)[0].any()


def test_bad_arguments_are_named():
    logits, ids, values, mask = _case(V=50)
    with pytest.raises(ValueError, match="missing"):
        sparse_kl_div(logits, ids, values, missing="uniform")
    with pytest.raises(ValueError, match="log_target"):
        sparse_kl_div(logits, ids, values, log_target=False, missing=Missing.SYMMETRIC_UNIFORM)
    with pytest.raises(ValueError, match="target_values"):
        sparse_kl_div(logits, ids, values[..., :3])
    with pytest.raises(ValueError, match="mask"):
        sparse_kl_div(logits, ids, values, mask[:, :3])
    with pytest.raises(ValueError, match="temperature"):
        sparse_kl_div(logits, ids, values, temperature=0.0)
    with pytest.raises(ValueError, match="logits"):
        sparse_kl_div(logits[0], ids[0], values[0])
