"""The Triton kd_rows kernels with the logit transforms (per-side scale and soft-cap, row
standardisation) and decoupled KD, under the interpreter on the CPU: against float64 formulas
written here from the definitions, values and gradients, at logits of ±100, fp32 and bf16, with
ignored rows, (B, T, V) views and an unaligned vocabulary, plus the fused linear path."""

import math

import pytest
import torch

import fastkd
from conftest import DEVICE, TOLERANCE
from fastkd.divergences import make_spec
from fastkd.kernels import registry
from fastkd.ops.schema import flatten
from fastkd.options import KDOptions
from reference import rel_err, row_losses

pytestmark = pytest.mark.skipif("triton" not in registry.usable_backends("kd_rows", DEVICE.type),
                                reason="Triton does not run here")

DIVERGENCES = fastkd.DIVERGENCES + ("dkd",)
# (student scale, student cap, teacher scale, teacher cap, standardize): each transform alone, per
# side, and all of them at once.
TRANSFORMS = {
    "scale": (0.8, None, 1.3, None, False),
    "softcap": (1.0, 30.0, 1.0, 50.0, False),
    "scale+softcap": (0.8, 30.0, 1.5, 20.0, False),
    "student only": (0.5, 25.0, 1.0, None, False),
    "standardize": (1.0, None, 1.0, None, True),
    "all": (0.8, 30.0, 1.2, 40.0, True),
}


def transformed(x, scale, cap, standardize):
    """float64 definition: scale, then cap·tanh(·/cap), then (y − mean)/(sample std + 1e-7)."""
    y = x * scale
    if cap is not None:
        y = cap * torch.tanh(y / cap)
    if standardize:
        y = (y - y.mean(-1, keepdim=True)) / (y.std(-1, keepdim=True) + 1e-7)
    return y


def dkd_rows(student, teacher, target, alpha, beta, temperature):
    """alpha·TCKD + beta·NCKD per row (float64, log space), Zhao et al. 2022."""
    others = torch.ones_like(student, dtype=torch.bool).scatter_(-1, target[:, None], False)

    def parts(x):
        x = x / temperature
        log_all = torch.logsumexp(x, -1)
        rest = x[others].view(x.shape[0], -1)
        return (x.gather(-1, target[:, None])[:, 0] - log_all, torch.logsumexp(rest, -1) - log_all,
                torch.log_softmax(rest, -1))

    (lq_y, lq_rest, lq_hat), (lp_y, lp_rest, lp_hat) = parts(student), parts(teacher)
    tckd = lp_y.exp() * (lp_y - lq_y) + lp_rest.exp() * (lp_rest - lq_rest)
    return alpha * tckd + beta * (lp_hat.exp() * (lp_hat - lq_hat)).sum(-1)


def reference_rows(divergence, student, teacher, labels, transforms, temperature=2.0):
    """Per-row float64 losses of the (R, V) logits, 0 on ignored rows."""
    s_scale, s_cap, t_scale, t_cap, standardize = transforms
    s = transformed(student, s_scale, s_cap, standardize)
    t = transformed(teacher.double(), t_scale, t_cap, standardize)
    active = labels != -100
    if divergence == "dkd":
        target = torch.where(active, labels, 0)
        rows = dkd_rows(s, t, target, 1.5, 4.0, temperature)
    else:
        rows = row_losses(divergence, s, t, temperature, 0.3, 0.2)
    return torch.where(active, rows, torch.zeros((), dtype=rows.dtype))


def _options(transforms):
    s_scale, s_cap, t_scale, t_cap, standardize = transforms
    return dict(student_logit_scale=s_scale, student_softcap=s_cap, teacher_logit_scale=t_scale,
                teacher_softcap=t_cap, standardize=standardize)


def _check(divergence, student, teacher, labels, transforms, dtype):
    student = student.to(dtype).requires_grad_(True)
    teacher = teacher.to(dtype)
    options = dict(divergence=divergence, temperature=2.0, beta=4.0 if divergence == "dkd" else 0.3, skew=0.2)
    if divergence == "dkd":
        options["alpha"] = 1.5
    loss = fastkd.kd_loss(student, teacher, labels, reduction="none", backend="triton", **options,
                          **_options(transforms))
    grad_output = torch.rand(loss.shape, device=DEVICE) + 0.5
    (grad,) = torch.autograd.grad(loss, student, grad_output)
    leaf = student.detach().double().requires_grad_(True)
    vocab = student.shape[-1]
    ref = reference_rows(divergence, leaf.reshape(-1, vocab), teacher.reshape(-1, vocab), labels.reshape(-1),
                         transforms).reshape(loss.shape)
    (ref_grad,) = torch.autograd.grad(ref, leaf, grad_output.double())
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    ignored = labels == -100
    assert (loss[ignored] == 0).all() and (grad[ignored] == 0).all()
    assert grad.dtype == dtype
    assert rel_err(loss, ref) < (2e-5 if dtype == torch.float32 else 1e-4)
    assert rel_err(grad, ref_grad) < (2e-5 if dtype == torch.float32 else TOLERANCE[dtype])


def _logits(*shape, scale=6.0):
    # ±100: a per-row offset of up to ±80 (past the soft-caps of 20–50, where a missing or wrong cap
    # shows) plus a spread that keeps the softmax away from one-hot (whose fp32 gradients are noise).
    offset = (torch.rand(*shape[:-1], 1, dtype=torch.float64) * 2 - 1) * 80
    return (offset + torch.randn(*shape, dtype=torch.float64) * scale).to(DEVICE, torch.float32)


@pytest.mark.parametrize("transforms", TRANSFORMS.values(), ids=TRANSFORMS.keys())
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_divergence_and_transform_fp32(divergence, transforms):
    student, teacher = _logits(5, 1001), _logits(5, 1001)  # V = 1001: unaligned rows, a partial tile
    labels = torch.randint(0, 1001, (5,), device=DEVICE)
    labels[1] = -100
    student[1] *= 100.0  # an ignored row of ±1e4 logits: zero loss and gradient, no NaN
    _check(divergence, student, teacher, labels, transforms, torch.float32)


@pytest.mark.parametrize("transforms", ["softcap", "all"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "tvd", "dkd"])
def test_rows_of_several_tiles(divergence, transforms):
    # V = 9001: full (unmasked) tiles of 4096 or 2048 columns, then a partial one.
    student, teacher = _logits(2, 9001), _logits(2, 9001)
    labels = torch.tensor([4500, 9000], device=DEVICE)
    _check(divergence, student, teacher, labels, TRANSFORMS[transforms], torch.float32)


@pytest.mark.parametrize("transforms", ["scale+softcap", "standardize", "all"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "dkd"])
def test_bf16_inputs(divergence, transforms):
    student, teacher = _logits(4, 300), _logits(4, 300)
    labels = torch.randint(0, 300, (4,), device=DEVICE)
    labels[2] = -100
    _check(divergence, student, teacher, labels, TRANSFORMS[transforms], torch.bfloat16)


@pytest.mark.parametrize("divergence", ["reverse_kl", "skew_forward_kl", "dkd"])
def test_shifted_3d_views(divergence):
    # The (B, T − 1, V) views of a causal LM's logits and the teacher's, labels (B, T − 1).
    student, teacher = _logits(2, 5, 257), _logits(2, 5, 257)
    labels = torch.randint(0, 257, (2, 4), device=DEVICE)
    labels[1, 2] = -100
    student = student.requires_grad_(True)
    view = student[:, :-1]
    extra = {"alpha": 1.5, "beta": 4.0} if divergence == "dkd" else {"beta": 0.3}
    loss = fastkd.kd_loss(view, teacher[:, 1:], labels, divergence=divergence, temperature=2.0, skew=0.2,
                          reduction="none", backend="triton", **_options(TRANSFORMS["all"]), **extra)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    leaf = student.detach().double().requires_grad_(True)
    ref = reference_rows(divergence, leaf[:, :-1].reshape(-1, 257), teacher[:, 1:].reshape(-1, 257),
                         labels.reshape(-1), TRANSFORMS["all"]).reshape(2, 4)
    (ref_grad,) = torch.autograd.grad(ref.sum(), leaf)
    assert rel_err(loss, ref) < 2e-5 and rel_err(grad, ref_grad) < 2e-5
    assert (grad[:, -1] == 0).all()


@pytest.mark.parametrize("offset,tolerance", [(1e3, 1e-4), (1e4, 5e-4)])
def test_standardize_is_robust_to_a_large_offset(offset, tolerance):
    # Rows of offset + O(3) logits: E[y²] − E[y]² would cancel to noise in fp32 (ulp(1e8) = 8 at
    # 1e4, more than the variance); the pairwise (Chan) merge keeps the std. What is left is the
    # fp32 rounding of the mean itself (ulp(1e4) ≈ 1e-3 against a spread of 3) in y − mean.
    student = _logits(3, 700, scale=3.0) + offset
    teacher = _logits(3, 700, scale=3.0) - offset
    labels = torch.tensor([1, -100, 5], device=DEVICE)
    transforms = TRANSFORMS["standardize"]
    student.requires_grad_(True)
    loss = fastkd.kd_loss(student, teacher, labels, divergence="forward_kl", reduction="none", standardize=True,
                          backend="triton")
    (grad,) = torch.autograd.grad(loss.sum(), student)
    leaf = student.detach().double().requires_grad_(True)
    ref = reference_rows("forward_kl", leaf, teacher, labels, transforms, temperature=1.0)
    (ref_grad,) = torch.autograd.grad(ref.sum(), leaf)
    assert rel_err(loss, ref) < tolerance and rel_err(grad, ref_grad) < tolerance


def test_standardize_saves_each_sides_mean_and_std():
    # O(N) saved state: the forward keeps the row mean and sample std of each side's capped logits.
    student, teacher = _logits(3, 513), _logits(3, 513)
    spec = make_spec("jsd", 2.0, 0.5, student_softcap=30.0, standardize=True)
    options = flatten(KDOptions(spec, -100, "triton"))
    _, stats = torch.ops.fastkd.kd_rows.default(student, teacher, None, *options)
    assert stats.shape == (3, 9)
    y_s = transformed(student.double(), 1.0, 30.0, False)
    y_t = teacher.double()
    expected = torch.stack([y_s.mean(-1), y_s.std(-1), y_t.mean(-1), y_t.std(-1)], 1)
    assert rel_err(stats[:, 5:], expected) < 1e-6


def test_standardize_constant_row_and_single_class():
    # std 0: eps keeps the row finite and its gradient is the plain one (0 here: both sides constant).
    student, teacher = _logits(2, 40), _logits(2, 40)
    student[0], teacher[0] = 2.5, -1.0
    student.requires_grad_(True)
    loss = fastkd.kd_loss(student, teacher, divergence="reverse_kl", standardize=True, reduction="none",
                          backend="triton")
    (grad,) = torch.autograd.grad(loss.sum(), student)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all() and loss[0] == 0
    one = torch.randn(3, 1, device=DEVICE).requires_grad_(True)
    loss = fastkd.kd_loss(one, torch.randn(3, 1, device=DEVICE), standardize=True, backend="triton")
    (grad,) = torch.autograd.grad(loss, one)
    assert loss == 0 and torch.isfinite(grad).all()


def test_dkd_ignored_and_out_of_range_rows():
    student, teacher = _logits(4, 60) * 100.0, _logits(4, 60) * 100.0  # ±1e4
    labels = torch.tensor([-100, 3, 60, -100], device=DEVICE)
    student.requires_grad_(True)
    loss = fastkd.kd_loss(student, teacher, labels, divergence="dkd", reduction="none", backend="triton",
                          student_softcap=30.0, standardize=True)
    (grad,) = torch.autograd.grad(loss.nan_to_num().sum(), student)
    assert (loss[[0, 3]] == 0).all() and (grad[[0, 3]] == 0).all() and torch.isfinite(grad[[0, 1, 3]]).all()
    assert torch.isnan(loss[2]) and torch.isfinite(loss[1])  # label 60 is not a class of 60


def test_softcap_keeps_masked_entries_masked():
    student, teacher = _logits(3, 130), _logits(3, 130)
    student[:, ::7] = -math.inf
    teacher[:, ::7] = -math.inf
    student.requires_grad_(True)
    loss = fastkd.kd_loss(student, teacher, divergence="jsd", student_softcap=20.0, teacher_softcap=20.0,
                          backend="triton")
    (grad,) = torch.autograd.grad(loss, student)
    keep = torch.ones(130, dtype=torch.bool, device=DEVICE)
    keep[::7] = False
    leaf = student.detach()[:, keep].double().requires_grad_(True)
    ref = row_losses("jsd", transformed(leaf, 1.0, 20.0, False), transformed(teacher[:, keep].double(), 1.0, 20.0,
                                                                              False)).mean()
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    assert (grad[:, ~keep] == 0).all()
    assert rel_err(loss, ref) < 2e-5 and rel_err(grad[:, keep], ref_grad) < 2e-5


@pytest.mark.parametrize("divergence,extra", [("reverse_kl", {}), ("dkd", {"alpha": 1.0, "beta": 8.0})])
def test_fused_linear_on_triton_with_transforms(divergence, extra):
    hidden = torch.randn(6, 16, device=DEVICE).requires_grad_(True)
    weight = (torch.randn(301, 16, device=DEVICE) * 3).requires_grad_(True)
    teacher_hidden, teacher_weight = torch.randn(6, 12, device=DEVICE), torch.randn(301, 12, device=DEVICE) * 3
    labels = torch.randint(0, 301, (6,), device=DEVICE)
    labels[2] = -100
    transforms = (1.0, 30.0, 0.5, 30.0, True)
    loss = fastkd.fused_linear_kd_loss(hidden, weight, teacher_hidden, teacher_weight, labels, divergence=divergence,
                                       temperature=1.5, backend="triton", **_options(transforms), **extra)
    grads = torch.autograd.grad(loss, (hidden, weight))
    leaves = [hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)]
    student = leaves[0] @ leaves[1].t()
    teacher = teacher_hidden.double() @ teacher_weight.double().t()
    s = transformed(student, 1.0, 30.0, True)
    t = transformed(teacher, 0.5, 30.0, True)
    active = labels != -100
    if divergence == "dkd":
        rows = dkd_rows(s, t, torch.where(active, labels, 0), 1.0, 8.0, 1.5)
    else:
        rows = row_losses(divergence, s, t, 1.5)
    ref = torch.where(active, rows, 0.0).sum() / active.sum()
    ref_grads = torch.autograd.grad(ref, leaves)
    assert rel_err(loss, ref) < 2e-5 and all(rel_err(g, r) < 2e-5 for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("divergence", ["forward_kl", "tvd", "dkd"])
def test_opcheck_with_every_transform(divergence):
    # The fake's statistics width follows the spec: (N, 9) with standardize.
    student = torch.randn(4, 37, device=DEVICE, requires_grad=True)
    teacher = torch.randn(4, 37, device=DEVICE)
    labels = torch.tensor([0, -100, 2, 3], device=DEVICE)
    spec = make_spec(divergence, 2.0, 4.0 if divergence == "dkd" else None, alpha=1.0 if divergence == "dkd" else None,
                     student_logit_scale=0.7, student_softcap=5.0, teacher_softcap=6.0, standardize=True)
    torch.library.opcheck(torch.ops.fastkd.kd_rows.default, (student, teacher, labels,
                                                              *flatten(KDOptions(spec, -100, "triton"))))


_COMPILE_SINGLE_CLASS = """
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, "scripts")
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kreport import triton_build, triton_launches
from fastkd.divergences import make_spec
from fastkd.kernels import registry
from fastkd.kernels.logits.contract import stats_width
launchers = registry.implementation("kd_rows", "triton", "cuda")
meta = lambda *shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype, device="meta")
labels = meta(64, dtype=torch.int64)
with triton_launches.recording(triton_launches.discover()) as launches:
    for divergence in ("reverse_kl", "dkd"):
        spec = make_spec(divergence, 2.0, 8.0 if divergence == "dkd" else None,
                         alpha=1.0 if divergence == "dkd" else None, student_softcap=30.0, standardize=True)
        launchers.kd_rows_forward(meta(64, 1), meta(64, 1), labels, spec, -100)
        launchers.kd_rows_backward(meta(64), meta(64, 1), meta(64, 1), labels, meta(64, stats_width(spec)), spec, -100)
for launch in launches:
    kernel = triton_build._kernel(launch.kernel)
    job = triton_build.specialise(kernel, launch, 90, "test")
    triton.compile(ASTSource(kernel, job.signature, job.constexprs, job.attrs), target=GPUTarget("cuda", 90, 32),
                   options=job.options)
print("compiled", len(launches))
"""


def test_single_class_rows_compile_for_the_gpu():
    # Triton turns an integer argument equal to 1 into a constant: V = 1 once broke the compiled
    # (not the interpreted) standardisation backward. Compiled for sm_90 here, without a GPU.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _COMPILE_SINGLE_CLASS], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "compiled 4" in done.stdout
