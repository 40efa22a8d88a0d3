"""fastkd.fused_linear_kd_loss against a float64 reference that materialises the logits."""

import subprocess
import sys
import textwrap

import pytest
import torch

import fastkd
from conftest import DEVICE, FUSED_TOLERANCE, TOLERANCE, each_backend
from fastkd.divergences import DivergenceSpec
from fastkd.kernels.fused_linear import driver
from fastkd.ops.schema import flatten
from fastkd.options import FusedLinearOptions
from reference import fused_linear_loss as reference_loss
from reference import rel_err


def _problem(n_rows=9, student_h=24, teacher_h=40, vocab=1271, padded=0, dtype=torch.float32, leading=None):
    leading = leading or (n_rows,)
    scale = 0.3
    return dict(
        student_hidden=torch.randn(*leading, student_h, device=DEVICE).to(dtype),
        student_weight=(torch.randn(vocab + padded, student_h, device=DEVICE) * scale).to(dtype),
        teacher_hidden=torch.randn(*leading, teacher_h, device=DEVICE).to(dtype),
        teacher_weight=(torch.randn(vocab + padded, teacher_h, device=DEVICE) * scale).to(dtype),
    )


def _labels(leading, vocab, ignored=(1, 4)):
    labels = torch.randint(0, vocab, leading, device=DEVICE)
    flat = labels.view(-1)
    for index in ignored:
        if index < flat.numel():
            flat[index] = -100
    return labels


def _check(tensors, labels=None, grad_output=None, grad_tol=None, **options):
    tensors = {k: v.detach().requires_grad_(k.startswith("student")) for k, v in tensors.items()}
    loss = fastkd.fused_linear_kd_loss(**tensors, labels=labels, **options)
    ref_tensors = {k: v.detach().double().requires_grad_(k.startswith("student")) for k, v in tensors.items()}
    ref = reference_loss(**ref_tensors, labels=labels, **{k: v for k, v in options.items() if k != "backend"})
    if grad_output is None:
        grad_output = torch.rand(loss.shape, device=DEVICE) + 0.5
    student_keys = [k for k in tensors if k.startswith("student")]
    grads = torch.autograd.grad(loss, [tensors[k] for k in student_keys], grad_output)
    ref_grads = torch.autograd.grad(ref, [ref_tensors[k] for k in student_keys], grad_output.double())
    assert rel_err(loss, ref) <= FUSED_TOLERANCE
    dtype = tensors["student_hidden"].dtype
    for key, grad, ref_grad in zip(student_keys, grads, ref_grads):
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        assert rel_err(grad, ref_grad) <= (grad_tol or max(TOLERANCE[dtype], FUSED_TOLERANCE)), key
    for key in tensors:
        if key.startswith("teacher"):
            assert tensors[key].grad is None
    return loss


@each_backend("kd_rows", "ce")
@pytest.mark.parametrize("divergence", fastkd.DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_every_divergence_with_hard_loss_biases_and_padding(backend, divergence, reduction, monkeypatch):
    monkeypatch.setitem(driver.BLOCK_ELEMENTS, DEVICE.type, 4 * 1271)  # several row blocks
    tensors = _problem(padded=5)
    tensors["student_bias"] = torch.randn(1276, device=DEVICE) * 0.1
    tensors["teacher_bias"] = torch.randn(1276, device=DEVICE) * 0.1
    _check(tensors, labels=_labels((9,), 1271), divergence=divergence, temperature=2.0, beta=0.3, skew=0.2,
           soft_weight=0.7, hard_weight=0.4, vocab_size=1271, reduction=reduction, backend=backend)


@each_backend("kd_rows", "ce")
@pytest.mark.parametrize("reduction,normalizer", [("sum", None), ("mean", 13.0), ("mean", None)])
def test_reductions_without_labels_or_hard_loss(backend, reduction, normalizer):
    _check(_problem(n_rows=6, vocab=333), divergence="reverse_kl", temperature_squared=True, temperature=1.5,
           reduction=reduction, normalizer=normalizer, backend=backend)


@each_backend("kd_rows", "ce")
def test_batched_hidden_states_and_a_frozen_weight(backend):
    tensors = _problem(leading=(2, 5), vocab=257)
    labels = _labels((2, 5), 257)
    hidden = tensors["student_hidden"].requires_grad_(True)
    weight = tensors["student_weight"]  # frozen: no gradient wanted
    loss = fastkd.fused_linear_kd_loss(hidden, weight, tensors["teacher_hidden"], tensors["teacher_weight"], labels,
                                       hard_weight=1.0, divergence="jsd", backend=backend)
    (grad,) = torch.autograd.grad(loss, hidden)
    ref_hidden = hidden.detach().double().requires_grad_(True)
    ref = reference_loss(ref_hidden, weight, tensors["teacher_hidden"], tensors["teacher_weight"], labels,
                         hard_weight=1.0, divergence="jsd")
    (ref_grad,) = torch.autograd.grad(ref, ref_hidden)
    assert rel_err(loss, ref) < FUSED_TOLERANCE and rel_err(grad, ref_grad) < FUSED_TOLERANCE


@each_backend("kd_rows", "ce")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    # Logits are formed in the input dtype, as an eager matmul would: compare with the reference
    # at that rounding (loss within 1e-2), gradients within the dtype's tolerance.
    tensors = _problem(n_rows=8, vocab=300, dtype=dtype)
    labels = _labels((8,), 300)
    tensors = {k: v.requires_grad_(k.startswith("student")) for k, v in tensors.items()}
    loss = fastkd.fused_linear_kd_loss(**tensors, labels=labels, hard_weight=0.5, divergence="forward_kl",
                                       backend=backend)
    ref_tensors = {k: v.detach().double().requires_grad_(k.startswith("student")) for k, v in tensors.items()}
    ref = reference_loss(**ref_tensors, labels=labels, hard_weight=0.5)
    assert rel_err(loss, ref) < 1e-2
    grads = torch.autograd.grad(loss, [tensors["student_hidden"], tensors["student_weight"]])
    ref_grads = torch.autograd.grad(ref, [ref_tensors["student_hidden"], ref_tensors["student_weight"]])
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == dtype and rel_err(grad, ref_grad) <= TOLERANCE[dtype]


@each_backend("kd_rows", "ce")
def test_all_rows_ignored_and_empty_input(backend):
    tensors = _problem(n_rows=4, vocab=50)
    tensors = {k: v.requires_grad_(k.startswith("student")) for k, v in tensors.items()}
    labels = torch.full((4,), -100, device=DEVICE)
    loss = fastkd.fused_linear_kd_loss(**tensors, labels=labels, hard_weight=1.0, backend=backend)
    assert loss.item() == 0.0
    grads = torch.autograd.grad(loss, [tensors["student_hidden"], tensors["student_weight"]])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    empty = _problem(n_rows=0, vocab=50)
    for reduction in ("mean", "sum", "none"):
        out = fastkd.fused_linear_kd_loss(**empty, reduction=reduction, backend=backend)
        assert out.shape == ((0,) if reduction == "none" else ()) and out.sum().item() == 0.0


def test_module_matches_function():
    tensors = _problem(n_rows=3, vocab=64)
    module = fastkd.FusedLinearKDLoss("tvd", temperature=3.0, reduction="sum")
    assert "tvd" in repr(module)
    expected = fastkd.fused_linear_kd_loss(**tensors, divergence="tvd", temperature=3.0, reduction="sum")
    assert torch.equal(module(**tensors), expected)


@each_backend("kd_rows", "ce")
def test_opcheck_and_compile(backend):
    tensors = _problem(n_rows=3, vocab=40, student_h=8, teacher_h=6)
    sh, sw, th, tw = (tensors[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight"))
    sh.requires_grad_(True)
    sw.requires_grad_(True)
    labels = torch.tensor([1, -100, 3], device=DEVICE)
    scale = torch.full((3,), 0.5, device=DEVICE)
    jsd = flatten(FusedLinearOptions(DivergenceSpec("jsd", 2.0, 0.3), "renormalize", -100, True, backend, backend))
    torch.library.opcheck(torch.ops.fastkd.fused_linear_kd_weighted.default,
                          (sh, sw, None, th, tw, None, None, None, labels, scale, scale, *jsd, True, True, False))
    forward_kl = flatten(FusedLinearOptions(DivergenceSpec("forward_kl"), "renormalize", -100, True, backend,
                                            backend))
    torch.library.opcheck(torch.ops.fastkd.fused_linear_kd_rows.default,
                          (sh, sw, None, th, tw, None, None, None, labels, *forward_kl))

    def step(sh, sw, th, tw, labels):
        return fastkd.fused_linear_kd_loss(sh, sw, th, tw, labels, hard_weight=0.5, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(sh, sw, th, tw, labels)
    grads = torch.autograd.grad(loss, (sh, sw))
    leaves = [sh.detach().double().requires_grad_(True), sw.detach().double().requires_grad_(True)]
    ref = reference_loss(*leaves, th.double(), tw.double(), labels, hard_weight=0.5)
    ref_grads = torch.autograd.grad(ref, leaves)
    assert rel_err(loss, ref) < FUSED_TOLERANCE
    assert all(rel_err(a, b) < FUSED_TOLERANCE for a, b in zip(grads, ref_grads))


BAD_INPUTS = [
    (dict(student_weight=torch.randn(50, 7)), ValueError, ["student_weight", "H=7", "student_hidden", "H=24"]),
    (dict(teacher_hidden=torch.randn(5, 40)), ValueError, ["teacher_hidden leading shape", "student_hidden"]),
    (dict(teacher_weight=torch.randn(60, 40)), ValueError, ["V=50", "V=60", "vocab_size"]),
    (dict(teacher_weight=torch.randn(60, 40), vocab_size=55), ValueError, ["vocab_size", "[1, 50]"]),
    (dict(vocab_size=2.0), TypeError, ["vocab_size", "int"]),
    (dict(hard_weight=0.5), ValueError, ["labels are required", "hard_weight"]),
    (dict(student_weight=torch.ones(50, 24, dtype=torch.long)), TypeError, ["student_weight", "floating-point"]),
    (dict(student_bias=torch.randn(49)), ValueError, ["student_bias", "(50,)"]),
    (dict(teacher_weight=torch.randn(50, 40, device="meta")), ValueError, ["teacher_weight is on meta"]),
    (dict(soft_weight=float("nan")), ValueError, ["soft_weight", "finite"]),
    (dict(student_hidden=torch.ones(9, 24, dtype=torch.long)), TypeError, ["student_hidden", "floating-point"]),
    (dict(divergence="kl"), ValueError, ["divergence", "forward_kl"]),
]


@pytest.mark.parametrize("overrides,error,words", BAD_INPUTS)
def test_bad_input_names_the_argument(overrides, error, words):
    tensors = _problem(vocab=50)
    options = {}
    for key, value in overrides.items():
        if key in tensors or key.endswith("_bias"):
            tensors[key] = value.to(DEVICE) if value.device.type != "meta" else value
        else:
            options[key] = value
    with pytest.raises(error) as info:
        fastkd.fused_linear_kd_loss(**tensors, **options)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads peak RSS from getrusage")
def test_torch_backend_memory_is_bounded_by_the_blocks():
    # N=2048 tokens, V=32000: one (N, V) fp32 tensor is 250 MiB. The forward+backward's peak RSS
    # growth, beyond the gradients it returns, must stay far below that.
    script = textwrap.dedent("""
        import resource, torch, fastkd
        torch.set_num_threads(2)
        n, v, h = 2048, 32000, 64
        sh = torch.randn(n, h, requires_grad=True); sw = (torch.randn(v, h) * 0.1).requires_grad_(True)
        th = torch.randn(n, h); tw = torch.randn(v, h) * 0.1
        labels = torch.randint(0, v, (n,))
        def step(rows):
            loss = fastkd.fused_linear_kd_loss(sh[:rows], sw, th[:rows], tw, labels[:rows], hard_weight=0.5,
                                               divergence="jsd", backend="torch")
            return torch.autograd.grad(loss, (sh, sw))
        step(8)  # warm-up allocations
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step(n)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth_mib = float(out.stdout.strip().splitlines()[-1])
    returned_grads_mib = (2048 * 64 + 32000 * 64) * 4 / 2**20
    one_full_logits_mib = 2048 * 32000 * 4 / 2**20
    assert growth_mib - returned_grads_mib < one_full_logits_mib / 2, growth_mib
