"""The native CPU kernels (csrc/logits/cpu.cpp, dkd_cpu.cpp) with the logit transforms: per-side
logit scale and soft-cap, row standardisation, each alone and together, for every divergence and
dkd, against float64 formulas written here from the definitions (not fastkd's code), values and
gradients through autograd; fp32/bf16/fp16, ignored rows of ±1e4 logits, (B, T, V) strided
views, an unaligned V, constant rows, rows far from 0, and thread-count independence."""

import math

import pytest
import torch

import fastkd
from fastkd.kernels import registry
from reference import rel_err

pytestmark = pytest.mark.skipif(
    "native" not in registry.usable_backends("kd_rows", "cpu", features=frozenset({"standardize", "softcap"})),
    reason="the native CPU kernels with logit transforms are not built here")

DIVERGENCES = fastkd.DIVERGENCES + ("dkd",)
EPS = 1e-7


def side(x, scale, cap, standardize, eps=EPS):
    """The logits a softmax sees, float64: scale, then cap·tanh(·/cap), then (y − mean)/(std + eps)
    with the sample std (divisor V − 1). A constant row has std 0, where the std has no derivative:
    the definition takes none (the clamp stops autograd there; sqrt'(0) would give NaN)."""
    y = x * scale
    if cap is not None:
        y = cap * torch.tanh(y / cap)
    if standardize:
        centred = y - y.mean(-1, keepdim=True)
        variance = (centred * centred).sum(-1, keepdim=True) / max(y.shape[-1] - 1, 1)
        y = centred / (variance.clamp_min(1e-300).sqrt() + eps)
    return y


def dkd_rows(s, t, target, alpha, beta):
    """alpha·TCKD + beta·NCKD per row (Zhao et al. 2022), float64, in log space."""
    others = torch.ones_like(s, dtype=torch.bool).scatter_(-1, target[:, None], False)

    def parts(x):
        log_all = torch.logsumexp(x, -1)
        rest = x[others].view(x.shape[0], -1)
        return (x.gather(-1, target[:, None])[:, 0] - log_all, torch.logsumexp(rest, -1) - log_all,
                torch.log_softmax(rest, -1))

    (lq_y, lq_r, lq_hat), (lp_y, lp_r, lp_hat) = parts(s), parts(t)
    tckd = lp_y.exp() * (lp_y - lq_y) + lp_r.exp() * (lp_r - lq_r)
    return alpha * tckd + beta * (lp_hat.exp() * (lp_hat - lq_hat)).sum(-1)


def rows_reference(divergence, s, t, temperature, target=None, beta=0.3, skew=0.2, alpha=1.0):
    """Per-row loss of transformed logits s, t (float64), written from the definitions."""
    if divergence == "dkd":
        return dkd_rows(s / temperature, t / temperature, target, alpha, 8.0)
    lq, lp = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    q, p = lq.exp(), lp.exp()

    def kl(a, log_a, log_b):
        return (a * (log_a - log_b)).sum(-1)

    def log_mix(w, log_x, log_y):
        return torch.logaddexp(math.log(w) + log_x, math.log1p(-w) + log_y)

    if divergence == "forward_kl":
        return kl(p, lp, lq)
    if divergence == "reverse_kl":
        return kl(q, lq, lp)
    if divergence == "jsd":
        lm = log_mix(beta, lp, lq)
        return beta * kl(p, lp, lm) + (1 - beta) * kl(q, lq, lm)
    if divergence == "skew_forward_kl":
        return kl(p, lp, log_mix(skew, lp, lq))
    if divergence == "skew_reverse_kl":
        return kl(q, lq, log_mix(skew, lq, lp))
    return 0.5 * (p - q).abs().sum(-1)  # tvd


def run(divergence, student, teacher, labels, grad_output, **transforms):
    """fastkd's per-row losses and ∂(Σ grad_output·loss)/∂student on the native backend."""
    student = student.detach().requires_grad_(True)
    options = dict(beta=8.0, alpha=1.0) if divergence == "dkd" else dict(beta=0.3, skew=0.2)
    loss = fastkd.kd_loss(student, teacher, labels, divergence=divergence, temperature=2.0, reduction="none",
                          backend="native", **options, **transforms)
    (grad,) = torch.autograd.grad(loss, student, grad_output)
    return loss, grad


def reference(divergence, student, teacher, labels, grad_output, student_scale=1.0, student_cap=None,
              teacher_scale=1.0, teacher_cap=None, standardize=False):
    leaf = student.detach().double().requires_grad_(True)
    s = side(leaf.reshape(-1, leaf.shape[-1]), student_scale, student_cap, standardize)
    t = side(teacher.double().reshape(-1, teacher.shape[-1]), teacher_scale, teacher_cap, standardize)
    flat_labels = labels.reshape(-1)
    active = flat_labels != -100
    target = torch.where(active, flat_labels, 0)
    rows = torch.where(active, rows_reference(divergence, s, t, 2.0, target), 0.0)
    (grad,) = torch.autograd.grad(rows, leaf, grad_output.double().reshape(-1))
    return rows.reshape(labels.shape), grad


COMBINATIONS = {
    "scale": dict(student_logit_scale=0.7, teacher_logit_scale=1.3),
    "softcap": dict(student_softcap=30.0, teacher_softcap=20.0),
    "standardize": dict(standardize=True),
    "scale+softcap": dict(student_logit_scale=0.7, student_softcap=30.0, teacher_softcap=50.0),
    "all": dict(student_logit_scale=0.7, student_softcap=30.0, teacher_logit_scale=1.3, teacher_softcap=20.0,
                standardize=True),
}


def _reference_args(options):
    return dict(student_scale=options.get("student_logit_scale", 1.0), student_cap=options.get("student_softcap"),
                teacher_scale=options.get("teacher_logit_scale", 1.0), teacher_cap=options.get("teacher_softcap"),
                standardize=options.get("standardize", False))


def _problem(shape, dtype=torch.float32, scale=40.0, offset=0.0):
    student = (torch.randn(*shape, dtype=torch.float64) * scale + offset).to(dtype)
    teacher = (torch.randn(*shape, dtype=torch.float64) * scale + offset).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1])
    return student, teacher, labels


@pytest.mark.parametrize("combination", sorted(COMBINATIONS))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_divergence_and_combination_against_float64(divergence, combination):
    # Logits of ±100 (std 40) where a cap bounds them: the caps saturate, a missing or misplaced
    # cap would show. Uncapped, std 8: at std 40 the fp32 gradient of the mixture divergences
    # cancels down to ~10% error on the plain kernels too (peaked rows), whatever the transforms.
    options = COMBINATIONS[combination]
    capped = "student_softcap" in options
    student, teacher, labels = _problem((6, 1001), scale=40.0 if capped else 8.0)
    labels[2] = -100
    student[2], teacher[2] = 1e4, -1e4  # an ignored row of huge logits: finite zeros
    grad_output = torch.rand(6, dtype=torch.float64).float() + 0.5
    loss, grad = run(divergence, student, teacher, labels, grad_output, **options)
    ref_loss, ref_grad = reference(divergence, student, teacher, labels, grad_output, **_reference_args(options))
    assert torch.isfinite(grad).all() and (grad[2] == 0).all() and loss[2] == 0
    assert rel_err(loss, ref_loss) < 2e-5, rel_err(loss, ref_loss)
    assert rel_err(grad, ref_grad) < 2e-5, rel_err(grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "dkd"])
def test_low_precision_inputs(divergence, dtype):
    student, teacher, labels = _problem((5, 300), dtype=dtype, scale=20.0)
    grad_output = torch.ones(5)
    options = COMBINATIONS["all"]
    loss, grad = run(divergence, student, teacher, labels, grad_output, **options)
    ref_loss, ref_grad = reference(divergence, student, teacher, labels, grad_output, **_reference_args(options))
    assert grad.dtype == dtype
    assert rel_err(loss, ref_loss) < 1e-2 and rel_err(grad.double(), ref_grad) < 2e-2


@pytest.mark.parametrize("divergence", ["reverse_kl", "tvd", "dkd"])
def test_strided_3d_views_and_mixed_dtypes(divergence):
    # Every other row and column of a (2, 6, 2·333) batch: strided rows and columns.
    base_s, base_t, _ = _problem((2, 6, 666), scale=10.0)
    student, teacher = base_s[:, ::2, ::2], base_t[:, ::2, ::2].bfloat16()
    labels = torch.randint(0, 333, (2, 3))
    labels[1, 1] = -100
    grad_output = torch.rand(2, 3) + 0.5
    options = dict(student_softcap=15.0, teacher_logit_scale=0.5, standardize=True)
    loss, grad = run(divergence, student, teacher, labels, grad_output, **options)
    ref_loss, ref_grad = reference(divergence, student, teacher, labels, grad_output, **_reference_args(options))
    assert grad.shape == student.shape
    assert rel_err(loss, ref_loss) < 2e-5 and rel_err(grad, ref_grad) < 2e-5


@pytest.mark.parametrize("divergence", ["forward_kl", "skew_reverse_kl", "dkd"])
def test_standardize_rows_far_from_zero_and_constant_rows(divergence):
    # Rows around ±1e4 with a spread of 3: E[y²] − E[y]² would lose every digit of the variance.
    student, teacher, labels = _problem((4, 700), scale=3.0)
    student[0] += 1e4
    teacher[1] -= 1e4
    student[2] = 5.0  # constant rows: std 0, z = 0, a uniform softmax, the gradient (G − mean G)/eps
    teacher[3] = -2.0
    grad_output = torch.rand(4) + 0.5
    loss, grad = run(divergence, student, teacher, labels, grad_output, standardize=True)
    ref_loss, ref_grad = reference(divergence, student, teacher, labels, grad_output, standardize=True)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert rel_err(loss, ref_loss) < 2e-5
    for row in range(4):  # row by row: the constant row's gradient is ~1e7 times the others'
        assert rel_err(grad[row], ref_grad[row]) < 1e-4, (row, rel_err(grad[row], ref_grad[row]))


def test_masked_entries_stay_masked_under_the_softcap():
    student, teacher, labels = _problem((3, 129), scale=10.0)
    student[:, ::5] = -math.inf
    teacher[:, ::5] = -math.inf
    keep = torch.ones(129, dtype=torch.bool)
    keep[::5] = False
    grad_output = torch.ones(3)
    options = dict(student_softcap=5.0, teacher_softcap=5.0, student_logit_scale=2.0)
    for divergence in ("forward_kl", "jsd"):
        loss, grad = run(divergence, student, teacher, labels, grad_output, **options)
        ref_loss, ref_grad = reference(divergence, student[:, keep], teacher[:, keep], labels, grad_output,
                                       **_reference_args(options))
        assert (grad[:, ~keep] == 0).all() and torch.isfinite(grad).all()
        assert rel_err(loss, ref_loss) < 2e-5 and rel_err(grad[:, keep], ref_grad) < 2e-5


@pytest.mark.parametrize("divergence", ["jsd", "dkd"])
def test_results_do_not_depend_on_the_thread_count(divergence):
    student, teacher, labels = _problem((9, 1500), scale=5.0)
    grad_output = torch.rand(9) + 0.5
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(run(divergence, student, teacher, labels, grad_output, **COMBINATIONS["all"]))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def test_standardized_stats_hold_each_sides_mean_and_std():
    from fastkd.divergences import make_spec
    from fastkd.kernels.logits import contract, native

    student, teacher, _ = _problem((3, 257), scale=4.0)
    spec = make_spec("forward_kl", student_softcap=6.0, standardize=True)
    loss, stats = native.kd_rows_forward(student, teacher, None, spec, -100)
    assert stats.shape == (3, contract.N_STANDARDIZED_STATS)
    capped = 6.0 * torch.tanh(student.double() / 6.0)
    assert torch.allclose(stats[:, contract.MEAN_S].double(), capped.mean(-1), atol=1e-5)
    assert torch.allclose(stats[:, contract.STD_S].double(), capped.std(-1), rtol=1e-5)
    assert torch.allclose(stats[:, contract.MEAN_T].double(), teacher.double().mean(-1), atol=1e-5)
    assert torch.allclose(stats[:, contract.STD_T].double(), teacher.double().std(-1), rtol=1e-5)


def test_bad_transforms_are_refused_before_any_kernel_runs():
    from fastkd.kernels import native_ext

    ext = native_ext.extension()
    student = torch.randn(2, 8)
    view = native_ext.rows_view(student)
    divergence = ext.DivergenceParams(code=0, inv_temperature=1.0, param=0.0, log_param=0.0, log1m_param=0.0)
    loss, stats = torch.empty(2), torch.empty(2, 9)
    for bad, words in ((dict(student_scale=0.0), "logit_scale"), (dict(teacher_softcap=-1.0), "softcap"),
                       (dict(standardize=True, eps=0.0), "standardize_eps")):
        args = ext.KdRowsArgs(n_rows=2, n_cols=8, student=view, teacher=view, labels=0, ignore_index=-100,
                              divergence=divergence, transforms=ext.LogitTransforms(**bad))
        with pytest.raises(ValueError, match=words):
            ext.kd_rows_forward_cpu(args, loss=loss.data_ptr(), stats=stats.data_ptr())


@pytest.mark.parametrize("divergence", ["forward_kl", "tvd", "dkd"])
def test_custom_op_opcheck_with_transforms(divergence):
    # The fake declares (N, 9) statistics under standardize: the kernels must return exactly that.
    from fastkd.divergences import make_spec
    from fastkd.ops.schema import flatten
    from fastkd.options import KDOptions

    student = torch.randn(4, 37, requires_grad=True)
    teacher = torch.randn(4, 37)
    labels = torch.tensor([0, -100, 2, 3])
    for transforms in (dict(student_softcap=3.0, teacher_logit_scale=2.0), dict(standardize=True)):
        spec = make_spec(divergence, 2.0, **transforms)
        torch.library.opcheck(torch.ops.fastkd.kd_rows.default,
                              (student, teacher, labels, *flatten(KDOptions(spec, -100, "native"))))


def test_torch_compile_fullgraph_with_standardize():
    student = torch.randn(6, 50, requires_grad=True)
    teacher = torch.randn(6, 50)

    @torch.compile(fullgraph=True, backend="eager")
    def step(student, teacher):
        return fastkd.kd_loss(student, teacher, standardize=True, student_softcap=4.0, backend="native")

    loss = step(student, teacher)
    (grad,) = torch.autograd.grad(loss, student)
    ref = fastkd.kd_loss(student, teacher, standardize=True, student_softcap=4.0, backend="torch")
    (ref_grad,) = torch.autograd.grad(ref, student)
    assert rel_err(loss, ref) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("divergence", ["jsd", "dkd"])
def test_fused_linear_loss_with_standardize_and_softcap(divergence):
    # The fused loss runs the native kd_rows kernels on each block of logits: every block gets the
    # transforms, its (R, 9) statistics travel from the block's forward to its backward.
    hidden = torch.randn(9, 16, requires_grad=True)
    weight = (torch.randn(301, 16) * 3).requires_grad_(True)
    teacher_hidden, teacher_weight = torch.randn(9, 12), torch.randn(301, 12) * 3
    labels = torch.randint(0, 301, (9,))
    labels[4] = -100
    options = dict(beta=8.0) if divergence == "dkd" else dict(beta=0.3)
    loss = fastkd.fused_linear_kd_loss(hidden, weight, teacher_hidden, teacher_weight, labels, divergence=divergence,
                                       temperature=2.0, student_softcap=20.0, standardize=True, reduction="sum",
                                       backend="native", **options)
    grads = torch.autograd.grad(loss, (hidden, weight))
    leaves = [hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)]
    s = side(leaves[0] @ leaves[1].t(), 1.0, 20.0, True)
    t = side(teacher_hidden.double() @ teacher_weight.double().t(), 1.0, None, True)
    active = labels != -100
    rows = rows_reference(divergence, s, t, 2.0, torch.where(active, labels, 0), beta=0.3)
    ref = torch.where(active, rows, 0.0).sum()
    ref_grads = torch.autograd.grad(ref, leaves)
    assert rel_err(loss, ref) < 2e-5
    assert all(rel_err(g, r) < 2e-5 for g, r in zip(grads, ref_grads))
