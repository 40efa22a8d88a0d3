"""fastkd.compat.LigerJSD / liger_jsd against a float64 transcription of Liger 0.8.5's JSD kernel
(its loss terms and the gradient it stores), and against Liger itself when it is installed."""

import math

import pytest
import torch

from conftest import TOLERANCE
from fastkd.compat import LigerJSD, liger_jsd
from peers import skip_reason
from reference import rel_err


def _kernel_definition(x, y, labels, beta, ignore_index=-100):
    """Liger's _jsd_kernel in float64: the loss Σ terms / n and the stored gradient dX / n, where
    X = log Q (student) and Y = log P (teacher) are used as given."""
    x, y = x.double(), y.double()
    q, p = x.exp(), y.exp()
    if beta == 0:
        terms, dx = p * (y - x), -p
    elif beta == 1:
        terms = q * (x - y)
        dx = terms + q
    else:
        log_m = torch.log(beta * p + (1 - beta) * q)
        terms = beta * p * (y - log_m) + (1 - beta) * q * (x - log_m)
        dx = (1 - beta) * q * (x - log_m)
    keep = torch.ones(x.shape[0], dtype=torch.bool) if labels is None else labels != ignore_index
    n = max(int(keep.sum()), 1) if labels is not None else x.shape[0]
    terms = torch.where(keep[:, None], terms, 0.0)
    dx = torch.where(keep[:, None], dx, 0.0)
    return terms.sum() / n, dx / n


def _case(N=37, V=1271, scale=100.0, dtype=torch.float32):
    # Log-probabilities of logits up to ±scale: most entries are far below 0 (P underflows).
    x = torch.log_softmax((torch.randn(N, V) * scale / 3).clamp(-scale, scale), -1).to(dtype)
    y = torch.log_softmax((torch.randn(N, V) * scale / 3).clamp(-scale, scale), -1).to(dtype)
    labels = torch.randint(0, V, (N,))
    labels[torch.rand(N) < 0.3] = -100
    return x, y, labels


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", [3.0, 100.0])
def test_matches_kernel_definition(beta, dtype, scale):
    x, y, labels = _case(scale=scale, dtype=dtype)
    x.requires_grad_(True)
    grad_output = torch.rand(()) + 0.5
    loss = LigerJSD(beta=beta)(x, y, labels)
    (grad,) = torch.autograd.grad(loss, x, grad_output.to(loss.dtype))
    ref, ref_grad = _kernel_definition(x.detach(), y, labels, beta)
    assert loss.dtype == dtype and grad.dtype == dtype
    assert rel_err(loss, ref) < max(TOLERANCE[dtype], 1e-7)
    assert rel_err(grad, grad_output.double() * ref_grad) < max(TOLERANCE[dtype], 1e-7)


def test_gradient_is_the_partial_derivative_not_through_a_softmax():
    # Liger differentiates the pointwise terms; a softmax re-normalisation would change dX.
    x, y, labels = _case(N=5, V=64, scale=3.0)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(liger_jsd(x, y, labels, beta=0.0), x)
    ref = -y.exp() * (labels != -100)[:, None] / int((labels != -100).sum())
    assert rel_err(grad, ref) < 1e-6
    assert grad.sum(-1).abs().max() > 1e-3  # a softmax gradient would sum to 0 per row


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_no_labels_all_ignored_and_masked_entries(beta):
    x, y, labels = _case(N=9, V=50, scale=5.0)
    x[0, :4] = -math.inf
    y[1, 4:9] = -math.inf
    x[2, 9:12] = y[2, 9:12] = -math.inf
    x.requires_grad_(True)
    loss = liger_jsd(x, y, None, beta)
    (grad,) = torch.autograd.grad(loss, x)
    ref, ref_grad = _kernel_definition(x.detach(), y, None, beta)
    # The true divergence is +inf where a side with mass meets -inf on the other (row 0 at beta = 0,
    # row 1 at beta = 1, with the +inf gradient Liger also stores there); elsewhere Liger's 0·inf
    # = NaN terms are 0 here.
    infinite_row = {0.0: None, 0.5: None, 1.0: 1}[beta]
    assert torch.isinf(loss) == (beta != 0.5) and (loss > 0)
    finite_rows = torch.ones(9, dtype=torch.bool)
    if infinite_row is not None:
        finite_rows[infinite_row] = False
    ref_grad = torch.nan_to_num(ref_grad, nan=0.0)
    assert torch.isfinite(grad[finite_rows]).all() and rel_err(grad[finite_rows], ref_grad[finite_rows]) < 1e-6
    labels[:] = -100
    loss = liger_jsd(x, y, labels, beta)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0 and not grad.any()


def test_teacher_gets_no_gradient():
    x, y, labels = _case(N=4, V=17, scale=3.0)
    y.requires_grad_(True)
    x.requires_grad_(True)
    grads = torch.autograd.grad(liger_jsd(x, y, labels), (x, y), allow_unused=True)
    assert grads[0] is not None and grads[1] is None


def test_bad_arguments_are_named():
    x, y, labels = _case(N=4, V=17)
    with pytest.raises(ValueError, match="shift_labels"):
        liger_jsd(x, y, labels[:3])
    with pytest.raises(ValueError, match="beta"):
        liger_jsd(x, y, labels, beta=1.5)
    with pytest.raises(ValueError, match="target"):
        liger_jsd(x, y[:, :16], labels)
    with pytest.raises(TypeError, match="shift_labels"):
        liger_jsd(x, y, labels.float())


@pytest.mark.skipif(skip_reason("liger_kernel") is not None, reason=str(skip_reason("liger_kernel")))
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_liger_itself(beta, dtype):
    from liger_kernel.transformers import LigerJSD as Liger

    x, y, labels = _case(N=24, V=1271, scale=100.0, dtype=dtype)
    x.requires_grad_(True)
    ours = LigerJSD(beta=beta)(x, y, labels)
    theirs = Liger(beta=beta)(x, y, labels)
    grads = [torch.autograd.grad(loss, x)[0] for loss in (ours, theirs)]
    assert ours.dtype == theirs.dtype
    tolerance = 1e-5 if dtype == torch.float32 else TOLERANCE[dtype]
    assert rel_err(ours, theirs) < tolerance and rel_err(grads[0], grads[1]) < tolerance
