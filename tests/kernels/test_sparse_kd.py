"""The sparse_kd kernels (tail mode's V passes: sparse/triton.py, sparse/native.py) on every backend
the registry lists here, at the inputs that break kernels: ±1e4 logits in ignored rows, repeated
and absent ids, ids outside [0, V), -inf logits, bf16 rows, shifted (B, T, V) views, the fused
linear path with a hard term. float64 references are written here, from the dense definition."""

import math

import pytest
import torch

import fastkd
from conftest import DEVICE, TOLERANCE, each_backend
from reference import rel_err


def _tail_reference(student, indices, logprobs, labels, divergence):
    """float64 per-row tail-mode losses at T = 1 (rows without a present entry or with an ignored
    label: 0): buckets are the present ids and everything else; KL(P‖Q), KL(Q‖P), JSD(½) or TVD."""
    s = student.double()
    q = s.softmax(-1)
    present = logprobs != -math.inf
    rows = []
    for r in range(s.shape[0]):
        ids = indices[r][present[r]]
        if ids.numel() == 0 or (labels is not None and labels[r] == -100):
            rows.append(s.new_zeros(()) * s[r].sum())
            continue
        p_support = logprobs[r][present[r]].double().exp()
        in_support = torch.zeros(s.shape[1], dtype=torch.bool, device=s.device)
        in_support[ids] = True
        P = torch.cat([p_support, (1 - p_support.sum()).clamp_min(0)[None]])
        Q = torch.cat([q[r][ids], (q[r] * ~in_support).sum()[None]])
        if divergence == "tvd":
            rows.append(0.5 * (P - Q).abs().sum())
            continue
        a, b = (P, Q) if divergence == "forward_kl" else (Q, P)
        if divergence == "jsd":
            M = 0.5 * (P + Q)
            kl = [torch.where(x > 0, x * (x.clamp_min(1e-300).log() - M.log()), 0.0).sum() for x in (P, Q)]
            rows.append(0.5 * kl[0] + 0.5 * kl[1])
            continue
        rows.append(torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), 0.0).sum())
    return torch.stack(rows)


def _teacher(n_rows, vocab, top_k):
    logprobs, indices = (torch.randn(n_rows, vocab, device=DEVICE, dtype=torch.float64) * 3).log_softmax(-1).topk(
        top_k, dim=-1)
    order = torch.argsort(torch.rand(n_rows, top_k, device=DEVICE), -1)
    return indices.gather(1, order), logprobs.float().gather(1, order)


@each_backend("sparse_kd")
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tail_kernels_at_extreme_rows(backend, divergence, dtype):
    n_rows, vocab, top_k = 9, 1271, 12
    indices, logprobs = _teacher(n_rows, vocab, top_k)
    logprobs[2, :4] = -math.inf  # absent entries; their ids point anywhere
    indices[2, :4] = 10 ** 6
    logprobs[3] = -math.inf  # a row without an entry: ignored
    student = torch.randn(n_rows, vocab, device=DEVICE) * 3
    student[0] *= 30  # logits of ±100
    student[4] = torch.where(torch.rand(vocab, device=DEVICE) < 0.5, 1e4, -1e4)  # ignored below: no NaN may leak
    student[5, ::3] = -math.inf  # masked vocabulary entries carry no mass
    student[5, indices[5]] = torch.randn(top_k, device=DEVICE)
    labels = torch.randint(0, vocab, (n_rows,), device=DEVICE)
    labels[4] = -100
    x = student.to(dtype).requires_grad_(True)
    grad_output = torch.rand(n_rows, device=DEVICE) + 0.5
    beta = 0.5 if divergence == "jsd" else None
    loss = fastkd.sparse_kd_loss(x, indices, logprobs, labels, divergence=divergence, beta=beta, missing_mass="tail",
                                 reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(loss, x, grad_output)
    ref_x = x.detach().double().requires_grad_(True)
    ref = _tail_reference(ref_x, indices, logprobs, labels, divergence)
    (ref_grad,) = torch.autograd.grad(ref, ref_x, grad_output.double())
    tolerance = 2e-5 if dtype == torch.float32 else TOLERANCE[torch.bfloat16]
    assert grad.dtype == dtype and torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert rel_err(loss, ref) < tolerance and rel_err(grad.double(), ref_grad) < tolerance
    assert (grad[[3, 4]] == 0).all() and (loss[[3, 4]] == 0).all()
    assert (grad[5, ::3][~torch.isin(torch.arange(0, vocab, 3, device=DEVICE), indices[5])] == 0).all()


@each_backend("sparse_kd")
@pytest.mark.parametrize("missing_mass", ["renormalize", "tail"])
def test_an_id_outside_the_vocabulary_makes_its_row_nan(backend, missing_mass):
    indices, logprobs = _teacher(4, 300, 5)
    indices[1, 3] = 300
    x = (torch.randn(4, 300, device=DEVICE) * 5).requires_grad_(True)
    loss = fastkd.sparse_kd_loss(x, indices, logprobs, pad_id=None, missing_mass=missing_mass, reduction="none",
                                 backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
    assert torch.isfinite(loss[[0, 2, 3]]).all() and torch.isfinite(grad[[0, 2, 3]]).all()


@each_backend("sparse_kd")
def test_shifted_batch_view_and_the_fused_path_with_a_hard_term(backend):
    # logits[:, :-1] of a (B, T + 1, V) tensor, and fused_linear_sparse_kd_loss (tail + cross-entropy),
    # whose blocks go through the same kernels.
    B, T, vocab, top_k, H = 2, 6, 517, 8, 16
    indices, logprobs = _teacher(B * T, vocab, top_k)
    full = (torch.randn(B, T + 1, vocab, device=DEVICE) * 8).requires_grad_(True)
    labels = torch.randint(0, vocab, (B, T), device=DEVICE)
    labels[0, 1] = -100
    loss = fastkd.sparse_kd_loss(full[:, :-1], indices.view(B, T, top_k), logprobs.view(B, T, top_k), labels,
                                 divergence="reverse_kl", missing_mass="tail", reduction="sum", backend=backend)
    (grad,) = torch.autograd.grad(loss, full)
    ref_x = full.detach().double().requires_grad_(True)
    ref = _tail_reference(ref_x[:, :-1].reshape(B * T, vocab), indices, logprobs, labels.view(-1), "reverse_kl").sum()
    (ref_grad,) = torch.autograd.grad(ref, ref_x)
    assert rel_err(loss, ref) < 2e-5 and rel_err(grad, ref_grad) < 2e-5 and (grad[:, -1] == 0).all()

    hidden = torch.randn(B * T, H, device=DEVICE, requires_grad=True)
    weight = torch.randn(vocab, H, device=DEVICE) * 0.5
    fused = fastkd.fused_linear_sparse_kd_loss(hidden, weight, indices, logprobs, labels.view(-1), divergence="tvd",
                                               missing_mass="tail", hard_weight=0.3, backend=backend)
    (fused_grad,) = torch.autograd.grad(fused, hidden)
    ref_h = hidden.detach().double().requires_grad_(True)
    logits = ref_h @ weight.double().t()
    keep = labels.view(-1) != -100
    soft = _tail_reference(logits, indices, logprobs, labels.view(-1), "tvd").sum() / keep.sum()
    hard = torch.nn.functional.cross_entropy(logits, labels.view(-1), ignore_index=-100)
    (ref_fused_grad,) = torch.autograd.grad(soft + 0.3 * hard, ref_h)
    assert rel_err(fused, soft + 0.3 * hard) < 2e-5 and rel_err(fused_grad, ref_fused_grad) < 2e-5


@each_backend("sparse_kd")
@pytest.mark.parametrize("missing_mass", ["renormalize", "tail"])
def test_repeated_ids_are_summed_as_the_torch_backend_does(backend, missing_mass):
    # Repeated present ids are invalid data (validate=True rejects them); without validation every
    # backend takes each entry as its own bucket and adds their gradients on the one column.
    indices, logprobs = _teacher(5, 700, 9)
    indices[:, 4] = indices[:, 1]
    x = torch.randn(5, 700, device=DEVICE) * 4
    out = {}
    for name in (backend, "torch"):
        xb = x.clone().requires_grad_(True)
        loss = fastkd.sparse_kd_loss(xb, indices, logprobs, divergence="jsd", missing_mass=missing_mass,
                                     reduction="none", backend=name)
        out[name] = (loss, torch.autograd.grad(loss.sum(), xb)[0])
    assert rel_err(out[backend][0], out["torch"][0]) < 1e-6 and rel_err(out[backend][1], out["torch"][1]) < 1e-6


@each_backend("sparse_kd")
@pytest.mark.parametrize("missing_mass", ["renormalize", "tail"])
def test_sparse_kd_rows_opcheck_and_fullgraph_compile(backend, missing_mass):
    from fastkd.divergences import make_spec
    from fastkd.ops.schema import flatten
    from fastkd.options import SparseOptions

    indices, logprobs = _teacher(5, 97, 6)
    student = torch.randn(5, 97, device=DEVICE, requires_grad=True)
    labels = torch.tensor([0, -100, 2, 3, 4], device=DEVICE)
    options = flatten(SparseOptions(make_spec("jsd", 1.0, 0.3), missing_mass, -100, backend))
    torch.library.opcheck(torch.ops.fastkd.sparse_kd_rows.default, (student, indices, logprobs, labels, *options))

    def loss(x):
        return fastkd.sparse_kd_loss(x, indices, logprobs, labels, divergence="tvd", missing_mass=missing_mass,
                                     backend=backend)

    compiled = torch.compile(loss, fullgraph=True, backend="eager")
    eager, (eager_grad,) = loss(student), torch.autograd.grad(loss(student), student)
    out = compiled(student)
    (grad,) = torch.autograd.grad(out, student)
    assert rel_err(out, eager) < 1e-6 and rel_err(grad, eager_grad) < 1e-6


@each_backend("sparse_kd")
def test_rows_past_2_pow_31(backend):
    # Row r of the student starts at element r·2³⁰ of a 4 GiB bf16 buffer (reserved, only these
    # rows touched): the last row lies past 2³¹, so the kernels' row offsets must be 64-bit.
    vocab = 1000
    buffer = torch.empty(2**31 + 2 * vocab, dtype=torch.bfloat16, device=DEVICE)
    student = buffer.as_strided((3, vocab), (2**30, 1))
    student.copy_(torch.randn(3, vocab, device=DEVICE) * 3)
    indices, logprobs = _teacher(3, vocab, 7)
    student.requires_grad_(True)
    loss = fastkd.sparse_kd_loss(student, indices, logprobs, divergence="forward_kl", missing_mass="tail",
                                 reduction="sum", backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    ref_x = student.detach().double().requires_grad_(True)
    ref = _tail_reference(ref_x, indices, logprobs, None, "forward_kl").sum()
    (ref_grad,) = torch.autograd.grad(ref, ref_x)
    assert rel_err(loss, ref) < 1e-5 and rel_err(grad.double(), ref_grad) < TOLERANCE[torch.bfloat16]
