"""fp32_logits of the fused linear losses (fastkd/kernels/fused_linear/block_logits.py): bf16 inputs
whose logit blocks stay in fp32 give gradients close to the float64 ones, rounding them does not."""

import math

import pytest
import torch

import fastkd
from conftest import DEVICE, FUSED_TOLERANCE, each_backend
from fastkd.kernels.fused_linear import block_logits
from reference import fused_linear_loss as reference_loss
from reference import rel_err, sparse_rows

# Measured on the 2-core CPU (2026-12-06; N=64, H=256, V=4000, logits of std ≈ 4, forward KL plus
# 0.2 CE, seeds 0-3): the gradient error without fp32 logits is 5.1-6.6x (T=0.5), 4.6-5.5x (T=1)
# and 2.7-3.7x (T=2) that with them; with them it stays at 1.25-1.5x the floor of rounding the
# float64 gradient to bf16 (the rest: the gradient block rounded to bf16 for its two GEMMs).
MIN_GAIN = {0.5: 4.0, 1.0: 3.0, 2.0: 2.0}
MAX_OVER_FLOOR = 2.0


def _bf16_problem(n_rows, hidden, vocab, logit_std):
    # Weights scaled so the logits have std ≈ logit_std (trained LLMs: a few units, peaks of 20-30).
    scale = logit_std / math.sqrt(hidden)
    return (torch.randn(n_rows, hidden, device=DEVICE).bfloat16(),
            (torch.randn(vocab, hidden, device=DEVICE) * scale).bfloat16(),
            torch.randn(n_rows, hidden, device=DEVICE).bfloat16(),
            (torch.randn(vocab, hidden, device=DEVICE) * scale).bfloat16())


def _labels(n_rows, vocab):
    labels = torch.randint(0, vocab, (n_rows,), device=DEVICE)
    labels[::7] = -100
    return labels


def _fused_grads(tensors, labels, **options):
    sh, sw, th, tw = (t.detach() for t in tensors)
    sh.requires_grad_(True)
    sw.requires_grad_(True)
    loss = fastkd.fused_linear_kd_loss(sh, sw, th, tw, labels, **options)
    return torch.autograd.grad(loss, (sh, sw))


def _reference_grads(tensors, labels, **options):
    sh, sw, th, tw = (t.detach().double() for t in tensors)
    sh.requires_grad_(True)
    sw.requires_grad_(True)
    return torch.autograd.grad(reference_loss(sh, sw, th, tw, labels, **options), (sh, sw))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_fp32_logits_gradient_error_against_float64(temperature):
    tensors = _bf16_problem(64, 256, 4000, logit_std=4.0)
    labels = _labels(64, 4000)
    options = dict(temperature=temperature, hard_weight=0.2)
    ref = _reference_grads(tensors, labels, **options)
    errors = {}
    for fp32 in (True, False):
        grads = _fused_grads(tensors, labels, fp32_logits=fp32, **options)
        errors[fp32] = [rel_err(grad, ref_grad) for grad, ref_grad in zip(grads, ref)]
    floor = [rel_err(ref_grad.to(torch.bfloat16), ref_grad) for ref_grad in ref]
    print(f"\nT={temperature}: grad rel. error (hidden, weight) fp32 logits {errors[True]}, bf16 logits "
          f"{errors[False]}, bf16 rounding floor {floor}")
    for name, with_fp32, without, lowest in zip(("hidden", "weight"), errors[True], errors[False], floor):
        assert without >= MIN_GAIN[temperature] * with_fp32, name
        assert with_fp32 <= MAX_OVER_FLOOR * lowest, name


def test_fp32_logits_sparse_teacher_gradient_error():
    sh, sw, _, _ = _bf16_problem(48, 128, 3000, logit_std=4.0)
    logits = torch.randn(48, 3000, device=DEVICE) * 3
    logprobs, indices = torch.log_softmax(logits, -1).topk(64, dim=-1)
    labels = _labels(48, 3000)
    leaves = [sh.double().requires_grad_(True), sw.double().requires_grad_(True)]
    rows = sparse_rows(leaves[0] @ leaves[1].t(), indices, logprobs, "forward_kl", 1.0, "renormalize")
    ref = torch.autograd.grad(torch.where(labels != -100, rows, 0).sum() / (labels != -100).sum(), leaves)
    errors = {}
    for fp32 in (True, False):
        student = [sh.detach().requires_grad_(True), sw.detach().requires_grad_(True)]
        loss = fastkd.fused_linear_sparse_kd_loss(*student, indices, logprobs, labels, fp32_logits=fp32)
        errors[fp32] = [rel_err(g, r) for g, r in zip(torch.autograd.grad(loss, student), ref)]
    print(f"\nsparse teacher: grad rel. error fp32 logits {errors[True]}, bf16 logits {errors[False]}")
    assert all(without >= 2 * with_fp32 for with_fp32, without in zip(errors[True], errors[False]))


@each_backend("kd_rows", "ce")
def test_fp32_logits_reach_every_backend(backend):
    tensors = _bf16_problem(12, 64, 1271, logit_std=6.0)
    labels = _labels(12, 1271)
    options = dict(divergence="jsd", temperature=1.0, hard_weight=0.3)
    ref = _reference_grads(tensors, labels, **options)
    errors = {fp32: rel_err(_fused_grads(tensors, labels, fp32_logits=fp32, backend=backend, **options)[0], ref[0])
              for fp32 in (True, False)}
    assert errors[False] >= 2 * errors[True]


def test_fp32_logits_change_nothing_for_fp32_inputs():
    tensors = [t.float() for t in _bf16_problem(10, 32, 500, logit_std=3.0)]
    labels = _labels(10, 500)
    on = _fused_grads(tensors, labels, fp32_logits=True, hard_weight=0.5)
    off = _fused_grads(tensors, labels, fp32_logits=False, hard_weight=0.5)
    assert all(torch.equal(a, b) for a, b in zip(on, off))


def test_default_is_on_for_cuda_only():
    assert block_logits.default_fp32(torch.device("cuda")) is True
    assert block_logits.default_fp32(torch.device("cpu")) is False


@pytest.mark.parametrize("with_bias", [False, True])
def test_upcast_path_in_several_vocabulary_chunks(with_bias, monkeypatch):
    monkeypatch.setattr(block_logits, "UPCAST_ELEMENTS", 7 * 24)  # chunks of 7 vocabulary rows, one partial
    hidden = torch.randn(5, 24, device=DEVICE).bfloat16()
    weight = (torch.randn(100, 24, device=DEVICE) * 3).bfloat16()
    bias = (torch.randn(100, device=DEVICE) * 50).bfloat16() if with_bias else None
    logits = block_logits.block(hidden, weight, bias, fp32=True)
    ref = hidden.double() @ weight.double().t() + (0 if bias is None else bias.double())
    assert logits.dtype == torch.float32 and logits.shape == (5, 100)
    assert rel_err(logits, ref) < FUSED_TOLERANCE / 10
    rounded = block_logits.block(hidden, weight, bias, fp32=False)
    assert rounded.dtype == torch.bfloat16 and rel_err(rounded, ref) > rel_err(logits, ref)


@pytest.mark.parametrize("fp32_logits", [1, "yes"])
def test_fp32_logits_must_be_a_bool_or_none(fp32_logits):
    tensors = _bf16_problem(3, 8, 20, logit_std=1.0)
    with pytest.raises(TypeError, match="fp32_logits"):
        fastkd.fused_linear_kd_loss(*tensors, fp32_logits=fp32_logits)


def test_fp32_weight_next_to_bf16_activations_gets_an_unrounded_gradient():
    # What autocast leaves: bf16 hidden states, an fp32 lm_head (cast to bf16 for the GEMMs).
    sh, sw, th, tw = _bf16_problem(32, 64, 1500, logit_std=4.0)
    weight = sw.float().requires_grad_(True)
    hidden = sh.detach().requires_grad_(True)
    loss = fastkd.fused_linear_kd_loss(hidden, weight, th, tw, temperature=1.0, fp32_logits=True)
    grad_weight = torch.autograd.grad(loss, weight)[0]
    leaves = [sh.double(), sw.double().requires_grad_(True)]  # the weight as the GEMM sees it
    ref = torch.autograd.grad(reference_loss(*leaves, th.double(), tw.double()), leaves[1])[0]
    assert grad_weight.dtype == torch.float32
    assert rel_err(grad_weight, ref) < 1e-5  # far below bf16's 2e-3: no bf16 rounding on its way
