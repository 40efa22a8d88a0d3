"""fastkd.compat's Liger fused-linear drop-ins (LigerFusedLinearJSD, LigerFusedLinearKLDivLoss,
LigerFusedLinearCosineSimilarityLoss) against float64 transcriptions of Liger 0.8.5's definitions,
and against Liger itself when it is installed (its kernels run under TRITON_INTERPRET on a CPU)."""

import pytest
import torch

import fastkd.compat._chunked_linear as chunked_linear
from conftest import TOLERANCE
from fastkd.compat import (LigerFusedLinearCosineSimilarityLoss, LigerFusedLinearJSD, LigerFusedLinearKLDivLoss,
                           liger_fused_linear_jsd, liger_fused_linear_kl_div)
from peers import skip_reason
from reference import rel_err

LIGER_SKIP = skip_reason("liger_kernel")


def _logits(hidden, weight, bias=None, gemm_dtype=torch.float64):
    """Logits from a GEMM in gemm_dtype, then in float64, or in float32 for the eager-error budget
    (float32 GEMMs)."""
    out = hidden.to(gemm_dtype) @ weight.to(gemm_dtype).t()
    if bias is not None:
        out = out + bias.to(gemm_dtype)
    return out.float() if gemm_dtype == torch.float32 else out.double()


def _jsd_definition(h, w, ht, wt, labels, beta, temperature, gemm_dtype=torch.float64):
    log_q = torch.log_softmax(_logits(h, w, gemm_dtype=gemm_dtype) / temperature, -1)
    log_p = torch.log_softmax(_logits(ht, wt, gemm_dtype=gemm_dtype) / temperature, -1)
    q, p = log_q.exp(), log_p.exp()
    if beta == 0:
        rows = (p * (log_p - log_q)).sum(-1)
    elif beta == 1:
        rows = (q * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.log(beta * p + (1 - beta) * q)
        rows = (beta * p * (log_p - log_m) + (1 - beta) * q * (log_q - log_m)).sum(-1)
    keep = labels != -100
    return torch.where(keep, rows, 0.0).sum() / max(int(keep.sum()), 1)


def _kl_definition(h, w, target, labels, reduction, temperature, eps, gemm_dtype=torch.float64):
    log_s = torch.log_softmax(_logits(h, w, gemm_dtype=gemm_dtype) / temperature, -1)
    q = target.double()
    rows = (q * (torch.log(q.clamp(min=eps)) - log_s)).sum(-1)
    keep = torch.ones_like(rows, dtype=torch.bool) if labels is None else labels != -100
    n = int(keep.sum())
    total = torch.where(keep, rows, 0.0).sum()
    return total * {"batchmean": 1 / max(n, 1), "mean": 1 / max(n * w.shape[0], 1), "sum": 1.0}[reduction] * (n > 0)


def _cosine_definition(h, w, b, ht, wt, labels, w_hard, w_soft, beta, temperature, gemm_dtype=torch.float64):
    s, t = _logits(h, w, b, gemm_dtype), _logits(ht, wt, gemm_dtype=gemm_dtype)
    keep = labels != -100
    n = max(int(keep.sum()), 1)
    log_probs = torch.log_softmax(s, -1)
    hard = -log_probs.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    hard = torch.where(keep, hard, 0.0).sum() / n
    s = torch.cat([s / temperature, s.new_zeros(s.shape[0], t.shape[1] - s.shape[1])], -1)
    t = t / temperature
    cosine = (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
    soft = torch.where(keep, beta * (1 - cosine), 0.0).sum() / n
    return w_hard * hard + w_soft * soft, soft, hard


def _case(N=41, V=1271, H=16, Ht=24, dtype=torch.float32, extra=0, scale=1.0):
    # logits of about ±100 at scale 1 (std ≈ 25)
    h = (torch.randn(N, H) * 3 * scale).to(dtype)
    w = (torch.randn(V, H) * 2).to(dtype)
    ht = (torch.randn(N, Ht) * 3 * scale).to(dtype)
    wt = (torch.randn(V + extra, Ht) * 1.7).to(dtype)
    labels = torch.randint(0, V, (N,))
    labels[torch.rand(N) < 0.3] = -100
    return h, w, ht, wt, labels


def _budget(dtype, ref, ref_grads, eager_fn, leaves):
    """Error budgets (loss, gradients) in CCE's spirit: the dtype's tolerance, or 10× the error of
    the same definition run eagerly with GEMMs in the inputs' dtype (float32 for float32 and
    float64 inputs) where that is larger — peaked softmaxes (logits of ±100) make the JSD gradient
    cancel in any float32 implementation."""
    gemm = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    eager_leaves = [t.detach().to(gemm).requires_grad_(True) for t in leaves]
    eager = eager_fn(*eager_leaves, gemm)
    eager_grads = _grads(eager, eager_leaves)
    table = TOLERANCE[dtype] if dtype != torch.float64 else 1e-9
    if dtype == torch.float64:
        return table, [table] * len(leaves)
    return (max(table, 10 * rel_err(eager, ref)),
            [max(table, 10 * rel_err(a, b)) for a, b in zip(eager_grads, ref_grads)])


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fused_linear_jsd_matches_definition(beta, dtype):
    h, w, ht, wt, labels = _case(dtype=dtype, scale=1.0 if dtype != torch.bfloat16 else 0.2)
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss = LigerFusedLinearJSD(jsd_beta=beta, temperature=1.7)(h, w, ht, wt, labels)
    grads = _grads(loss, (h, w))
    leaves = [t.detach().double().requires_grad_(True) for t in (h, w)]
    ref = _jsd_definition(*leaves, ht, wt, labels, beta, 1.7)
    ref_grads = _grads(ref, leaves)
    tol, grad_tols = _budget(dtype, ref, ref_grads,
                             lambda a, b, gemm: _jsd_definition(a, b, ht, wt, labels, beta, 1.7, gemm), (h, w))
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(loss, ref) < tol
    assert all(rel_err(a, b) < t for a, b, t in zip(grads, ref_grads, grad_tols))


def test_fused_linear_jsd_all_ignored_and_no_labels():
    h, w, ht, wt, labels = _case(N=7, V=97)
    h.requires_grad_(True)
    labels[:] = -100
    loss = liger_fused_linear_jsd(h, w, ht, wt, labels)
    assert loss.item() == 0.0 and not _grads(loss, h)[0].any()
    ref = _jsd_definition(h.detach(), w, ht, wt, torch.zeros(7, dtype=torch.long), 0.5, 1.0)
    assert rel_err(liger_fused_linear_jsd(h, w, ht, wt), ref) < 5e-6


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_labels", [True, False])
def test_fused_linear_kl_div_matches_definition(reduction, dtype, with_labels, monkeypatch):
    monkeypatch.setattr(chunked_linear, "BLOCK_ELEMENTS", 1271 * 8)  # several token blocks
    h, w, _, _, labels = _case(dtype=dtype, scale=1.0 if dtype != torch.bfloat16 else 0.2)
    labels = labels if with_labels else None
    target = torch.softmax(torch.randn(41, 1271) * 4, -1)
    target[0, :100] = 0  # zero target entries: 0·log 0 = 0
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss = LigerFusedLinearKLDivLoss(reduction=reduction, temperature=2.3)(h, w, target, labels)
    grads = _grads(loss * 1.3, (h, w))  # a grad_output other than 1
    leaves = [t.detach().double().requires_grad_(True) for t in (h, w)]
    ref = _kl_definition(*leaves, target, labels, reduction, 2.3, 1e-10)
    ref_grads = _grads(ref * 1.3, leaves)
    ref = ref.detach()
    tol, grad_tols = _budget(dtype, 1.3 * ref, ref_grads, lambda a, b, gemm: 1.3 * _kl_definition(
        a, b, target, labels, reduction, 2.3, 1e-10, gemm), (h, w))
    assert loss.dtype == torch.float32 and rel_err(loss, ref) < tol
    assert all(rel_err(a, b) < t for a, b, t in zip(grads, ref_grads, grad_tols))


def test_fused_linear_kl_div_eps_and_unnormalised_target():
    h, w, _, _, labels = _case(N=9, V=50, scale=0.3)
    target = torch.rand(9, 50) * 0.05  # not a distribution; tiny entries below eps
    target[:, :5] = 1e-13
    h.requires_grad_(True)
    loss = liger_fused_linear_kl_div(h, w, target, labels, eps=1e-9)
    leaf = h.detach().double().requires_grad_(True)
    ref = _kl_definition(leaf, w, target, labels, "batchmean", 1.0, 1e-9)
    assert rel_err(loss, ref) < 5e-6
    assert rel_err(_grads(loss, h)[0], _grads(ref, leaf)[0]) < 5e-6


@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cosine_matches_definition(extra, dtype, monkeypatch):
    monkeypatch.setattr(chunked_linear, "BLOCK_ELEMENTS", 1271 * 16)
    h, w, ht, wt, labels = _case(dtype=dtype, extra=extra, scale=1.0 if dtype != torch.bfloat16 else 0.2)
    b = (torch.randn(1271) * 0.5).to(dtype)
    for t in (h, w, b):
        t.requires_grad_(True)
    loss_fn = LigerFusedLinearCosineSimilarityLoss(weight_hard_loss=0.3, weight_soft_loss=0.7, beta=0.8,
                                                   temperature=1.9, return_soft_hard_loss=True)
    loss, soft, hard = loss_fn(h, w, ht, wt, labels, b)
    grads = _grads(loss, (h, w, b))
    leaves = [t.detach().double().requires_grad_(True) for t in (h, w, b)]
    ref, ref_soft, ref_hard = _cosine_definition(*leaves, ht, wt, labels, 0.3, 0.7, 0.8, 1.9)
    ref_grads = _grads(ref, leaves)
    tol, grad_tols = _budget(dtype, ref, ref_grads, lambda h_, w_, b_, gemm: _cosine_definition(
        h_, w_, b_, ht, wt, labels, 0.3, 0.7, 0.8, 1.9, gemm)[0], (h, w, b))
    assert rel_err(loss, ref) < tol and rel_err(soft, ref_soft) < tol and rel_err(hard, ref_hard) < tol
    assert all(rel_err(a, b) < t for a, b, t in zip(grads, ref_grads, grad_tols))


def test_cosine_all_ignored_is_zero():
    h, w, ht, wt, labels = _case(N=6, V=40)
    labels[:] = -100
    h.requires_grad_(True)
    loss = LigerFusedLinearCosineSimilarityLoss()(h, w, ht, wt, labels)
    assert loss.item() == 0.0 and not _grads(loss, h)[0].any()


def test_bad_arguments_are_named():
    h, w, ht, wt, labels = _case(N=6, V=40)
    with pytest.raises(ValueError, match="teacher_weight"):
        liger_fused_linear_jsd(h, w, ht, wt[:39], labels)
    with pytest.raises(ValueError, match="shift_labels"):
        liger_fused_linear_jsd(h, w, ht, wt, labels[:5])
    with pytest.raises(ValueError, match="temperature"):
        LigerFusedLinearJSD(temperature=0)
    with pytest.raises(ValueError, match="reduction"):
        liger_fused_linear_kl_div(h, w, torch.rand(6, 40), reduction="none")
    with pytest.raises(ValueError, match="target"):
        liger_fused_linear_kl_div(h, w, torch.rand(6, 39))
    with pytest.raises(TypeError, match="accum_dtype"):
        liger_fused_linear_kl_div(h, w, torch.rand(6, 40), accum_dtype=torch.int32)
    with pytest.raises(ValueError, match="teacher_weight"):
        LigerFusedLinearCosineSimilarityLoss()(h, w[:, :], ht, wt[:30], labels)
    with pytest.raises(ValueError, match="true_labels"):
        LigerFusedLinearCosineSimilarityLoss()(h, w, ht, wt, labels[:4])


@pytest.mark.skipif(LIGER_SKIP is not None, reason=str(LIGER_SKIP))
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_fused_linear_jsd_matches_liger_itself(beta):
    from liger_kernel.transformers import LigerFusedLinearJSD as Liger

    h, w, ht, wt, labels = _case(N=40, V=1271)
    h.requires_grad_(True)
    w.requires_grad_(True)
    losses = [cls(jsd_beta=beta, temperature=1.7)(h, w, ht, wt, labels) for cls in (LigerFusedLinearJSD, Liger)]
    grads = [_grads(loss, (h, w)) for loss in losses]
    leaves = [t.detach().double().requires_grad_(True) for t in (h, w)]
    ref = _jsd_definition(*leaves, ht, wt, labels, beta, 1.7)
    _agree_as_peer(losses, grads, ref, _grads(ref, leaves))


def _agree_as_peer(losses, grads, ref, ref_grads):
    """Ours equals Liger to 1e-5, or, where Liger's own float32 error against the float64
    definition is larger (JSD gradients of peaked softmaxes cancel), to within 3× that error, and
    is no less accurate than Liger (2× slack)."""
    for ours, theirs, exact in [(losses[0], losses[1], ref), *zip(grads[0], grads[1], ref_grads)]:
        their_err = rel_err(theirs, exact)
        assert rel_err(ours, theirs) < max(1e-5, 3 * their_err)
        assert rel_err(ours, exact) < max(1e-5, 2 * their_err)


@pytest.mark.skipif(LIGER_SKIP is not None, reason=str(LIGER_SKIP))
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
@pytest.mark.parametrize("accum_dtype", [None, torch.float32])
def test_fused_linear_kl_div_matches_liger_itself(reduction, accum_dtype):
    from liger_kernel.transformers import LigerFusedLinearKLDivLoss as Liger

    h, w, _, _, labels = _case(N=40, V=1271)
    target = torch.softmax(torch.randn(40, 1271) * 4, -1)
    h.requires_grad_(True)
    w.requires_grad_(True)
    losses = [cls(reduction=reduction, temperature=2.3, accum_dtype=accum_dtype)(h, w, target, labels)
              for cls in (LigerFusedLinearKLDivLoss, Liger)]
    grads = [_grads(loss, (h, w)) for loss in losses]
    assert rel_err(losses[0], losses[1]) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(*grads))


@pytest.mark.skipif(LIGER_SKIP is not None, reason=str(LIGER_SKIP))
@pytest.mark.parametrize("extra", [0, 3])
def test_cosine_matches_liger_itself(extra):
    from liger_kernel.chunked_loss import LigerFusedLinearCosineSimilarityLoss as Liger

    h, w, ht, wt, labels = _case(N=40, V=1271, extra=extra)
    b = torch.randn(1271, requires_grad=True)
    h.requires_grad_(True)
    w.requires_grad_(True)
    options = dict(weight_hard_loss=0.3, weight_soft_loss=0.7, beta=0.8, temperature=1.9, return_soft_hard_loss=True)
    ours = LigerFusedLinearCosineSimilarityLoss(**options)(h, w, ht, wt, labels, b)
    theirs = Liger(compiled=False, **options)(h, w, ht, wt, labels, b)
    grads = [_grads(out[0], (h, w, b)) for out in (ours, theirs)]
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(ours, theirs))
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(*grads))
