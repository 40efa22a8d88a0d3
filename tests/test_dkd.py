"""divergence="dkd" (decoupled KD, Zhao et al. 2022) against the paper's formula written in
float64 and against a transcription of the reference implementation (mdistiller), values and
gradients, on every backend that implements it."""

import math

import pytest
import torch

import fastkd
from conftest import DEVICE, TOLERANCE, each_backend
from fastkd.kernels import registry
from reference import rel_err

DKD_BACKENDS = registry.usable_backends("kd_rows", DEVICE.type, features=frozenset({"dkd"}))


def paper_dkd(student, teacher, target, alpha, beta, temperature):
    """Per-row alpha·TCKD + beta·NCKD from the definitions (float64, no T²)."""
    q = torch.softmax(student / temperature, -1)
    p = torch.softmax(teacher / temperature, -1)
    q_y, p_y = q.gather(-1, target[:, None])[:, 0], p.gather(-1, target[:, None])[:, 0]
    tckd = p_y * (p_y.log() - q_y.log()) + (1 - p_y) * ((1 - p_y).log() - (1 - q_y).log())
    # The non-target classes, as a (R, C − 1) tensor (no masked entries for autograd to trip on).
    others = torch.ones_like(q, dtype=torch.bool).scatter_(-1, target[:, None], False)
    q_hat = q[others].view(q.shape[0], -1) / (1 - q_y)[:, None]
    p_hat = p[others].view(p.shape[0], -1) / (1 - p_y)[:, None]
    nckd = (p_hat * (p_hat.log() - q_hat.log())).sum(-1)
    return alpha * tckd + beta * nckd


def log_space_dkd(student, teacher, target, alpha, beta, temperature):
    """The same definitions with every probability in log space (float64), for rows where the
    target takes all the mass (1 − p_y rounds to 0 even in float64)."""
    others = torch.ones_like(student, dtype=torch.bool).scatter_(-1, target[:, None], False)

    def parts(x):
        x = x / temperature
        log_all = torch.logsumexp(x, -1)
        rest = x[others].view(x.shape[0], -1)
        log_y = x.gather(-1, target[:, None])[:, 0] - log_all
        return log_y, torch.logsumexp(rest, -1) - log_all, torch.log_softmax(rest, -1)

    (lq_y, lq_rest, lq_hat), (lp_y, lp_rest, lp_hat) = parts(student), parts(teacher)
    tckd = lp_y.exp() * (lp_y - lq_y) + lp_rest.exp() * (lp_rest - lq_rest)
    nckd = (lp_hat.exp() * (lp_hat - lq_hat)).sum(-1)
    return alpha * tckd + beta * nckd


def mdistiller_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    """The reference implementation's formula (mdistiller, distillers/DKD.py), transcribed: the
    target is masked with −1000 instead of −inf, T² applied, batch mean."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target[:, None], 1).bool()
    other_mask = ~gt_mask
    pred_student = torch.softmax(logits_student / temperature, dim=1)
    pred_teacher = torch.softmax(logits_teacher / temperature, dim=1)

    def cat_mask(t):
        return torch.cat([(t * gt_mask).sum(1, keepdims=True), (t * other_mask).sum(1, keepdims=True)], dim=1)

    pred_student, pred_teacher = cat_mask(pred_student), cat_mask(pred_teacher)
    tckd = torch.nn.functional.kl_div(torch.log(pred_student), pred_teacher, reduction="sum")
    tckd = tckd * temperature ** 2 / target.shape[0]
    teacher_part2 = torch.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_student_part2 = torch.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = torch.nn.functional.kl_div(log_student_part2, teacher_part2, reduction="sum")
    return alpha * tckd + beta * nckd * temperature ** 2 / target.shape[0]


def _problem(n_rows, n_classes, dtype=torch.float32, scale=3.0):
    student = (torch.randn(n_rows, n_classes, dtype=torch.float64) * scale).to(DEVICE, dtype)
    teacher = (torch.randn(n_rows, n_classes, dtype=torch.float64) * scale).to(DEVICE, dtype)
    target = torch.randint(0, n_classes, (n_rows,), device=DEVICE)
    return student, teacher, target


@pytest.mark.parametrize("backend", DKD_BACKENDS)
@pytest.mark.parametrize("n_classes", [10, 100, 1000, 21843])
def test_matches_the_paper_formula(backend, n_classes):
    student, teacher, target = _problem(6, n_classes)
    target[0] = student[0].argmax()  # the target at the row max
    target[1] = student[1].argmin()  # and at the row min
    student.requires_grad_(True)
    grad_output = torch.rand(6, device=DEVICE) + 0.5
    loss = fastkd.kd_loss(student, teacher, target, divergence="dkd", alpha=1.5, beta=6.0, temperature=3.0,
                          reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(loss, student, grad_output)
    leaf = student.detach().double().requires_grad_(True)
    ref = paper_dkd(leaf, teacher.double(), target, 1.5, 6.0, 3.0)
    (ref_grad,) = torch.autograd.grad(ref, leaf, grad_output.double())
    assert rel_err(loss, ref) < 2e-5 and rel_err(grad, ref_grad) < 2e-5


@pytest.mark.parametrize("backend", DKD_BACKENDS)
def test_matches_mdistiller_with_its_t_squared_and_batch_mean(backend):
    student, teacher, target = _problem(16, 100)
    student.requires_grad_(True)
    loss = fastkd.kd_loss(student, teacher, target, divergence="dkd", temperature=4.0, temperature_squared=True,
                          backend=backend)  # alpha 1, beta 8: mdistiller's CIFAR-100 defaults
    (grad,) = torch.autograd.grad(loss, student)
    leaf = student.detach().double().requires_grad_(True)
    ref = mdistiller_dkd(leaf, teacher.double(), target, 1.0, 8.0, 4.0)
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    assert rel_err(loss, ref) < 2e-5 and rel_err(grad, ref_grad) < 2e-5


@pytest.mark.parametrize("backend", DKD_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(backend, dtype):
    student, teacher, target = _problem(8, 1000, dtype)
    student.requires_grad_(True)
    loss = fastkd.kd_loss(student, teacher, target, divergence="dkd", temperature=2.0, reduction="sum",
                          backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    leaf = student.detach().double().requires_grad_(True)
    ref = paper_dkd(leaf, teacher.double(), target, 1.0, 8.0, 2.0).sum()
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    assert grad.dtype == dtype
    assert rel_err(loss, ref) < 2e-5 and rel_err(grad, ref_grad) < TOLERANCE[dtype]


@pytest.mark.parametrize("backend", DKD_BACKENDS)
def test_ignored_rows_and_bad_labels(backend):
    student, teacher, target = _problem(5, 50)
    student[0] *= 1e4  # an ignored row with extreme logits must stay out of the gradient
    target[0], target[3] = -100, 50  # 50 is not a class: that row is NaN, the others are not
    student.requires_grad_(True)
    loss = fastkd.kd_loss(student, teacher, target, divergence="dkd", reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(loss.nan_to_num().sum(), student)
    assert loss[0] == 0 and torch.equal(grad[0], torch.zeros_like(grad[0]))
    assert torch.isnan(loss[3]) and torch.isfinite(loss[[1, 2, 4]]).all()
    keep = torch.tensor([1, 2, 4], device=DEVICE)
    leaf = student.detach()[keep].double().requires_grad_(True)
    ref = paper_dkd(leaf, teacher[keep].double(), target[keep], 1.0, 8.0, 1.0)
    (ref_grad,) = torch.autograd.grad(ref.sum(), leaf)
    assert rel_err(loss[keep], ref) < 2e-5 and rel_err(grad[keep], ref_grad) < 2e-5


def test_gradcheck_float64():
    student, teacher, target = _problem(3, 7, torch.float64)
    target[1] = -100

    def loss(x):
        return fastkd.kd_loss(x, teacher, target, divergence="dkd", alpha=0.7, beta=2.0, temperature=1.3,
                              reduction="none", backend="torch")

    assert torch.autograd.gradcheck(loss, (student.requires_grad_(True),))


def test_module_and_fused_linear_forms():
    student, teacher, target = _problem(4, 30)
    module = fastkd.KDLoss("dkd", temperature=2.0, beta=4.0)
    assert torch.equal(module(student, teacher, target),
                       fastkd.kd_loss(student, teacher, target, divergence="dkd", temperature=2.0, beta=4.0))
    hidden, weight = torch.randn(4, 8, device=DEVICE), torch.randn(30, 8, device=DEVICE) * 0.3
    fused = fastkd.fused_linear_kd_loss(hidden, weight, hidden, weight * 1.5, target, divergence="dkd")
    ref = paper_dkd(hidden.double() @ weight.double().t(), hidden.double() @ (weight.double() * 1.5).t(), target,
                    1.0, 8.0, 1.0).mean()
    assert rel_err(fused, ref) < 2e-5


@pytest.mark.parametrize("call,error,words", [
    (lambda s, t, y: fastkd.kd_loss(s, t, divergence="dkd"), ValueError, "needs labels"),
    (lambda s, t, y: fastkd.kd_loss(s[:, :1], t[:, :1], y * 0, divergence="dkd"), ValueError, "two classes"),
    (lambda s, t, y: fastkd.kd_loss(s, t, y, divergence="dkd", alpha=-1.0), ValueError, "alpha"),
    (lambda s, t, y: fastkd.kd_loss(s, t, y, divergence="jsd", alpha=1.0), ValueError, "alpha is dkd"),
])
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error, match=words):
        call(*_problem(3, 9))


@each_backend("kd_rows")
def test_backends_without_dkd_say_so(backend):
    student, teacher, target = _problem(3, 9)
    if backend in DKD_BACKENDS:
        pytest.skip(f"{backend} implements dkd")
    with pytest.raises(ValueError, match="does not implement dkd"):
        fastkd.kd_loss(student, teacher, target, divergence="dkd", backend=backend)


@pytest.mark.parametrize("backend", DKD_BACKENDS)
def test_strided_rows_of_a_3d_batch_and_mixed_dtypes(backend):
    # (B, T, V) views: rows with a gap, every other column of a bf16 teacher; V spans column blocks
    wide = (torch.randn(2, 5, 1400, device=DEVICE) * 4).requires_grad_(True)
    student = wide[..., :1271]
    teacher = (torch.randn(2, 5, 2542, device=DEVICE) * 4).bfloat16()[..., ::2]
    assert not student.is_contiguous() and teacher.stride(-1) == 2
    target = torch.randint(0, 1271, (2, 5), device=DEVICE)
    target[0, 0], target[1, 4] = 0, 1270  # the first and the last column
    loss = fastkd.kd_loss(student, teacher, target, divergence="dkd", alpha=0.5, beta=2.0, temperature=1.7,
                          reduction="sum", backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    leaf = student.detach().double().reshape(10, -1).requires_grad_(True)
    ref = paper_dkd(leaf, teacher.double().reshape(10, -1), target.reshape(-1), 0.5, 2.0, 1.7).sum()
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    assert rel_err(loss, ref) < 2e-5 and rel_err(grad.reshape(10, -1), ref_grad) < 2e-5


@pytest.mark.parametrize("backend", DKD_BACKENDS)
def test_target_far_above_the_rest_and_masked_classes(backend):
    student, teacher, target = _problem(4, 300, scale=30.0)
    student[0] = -100.0
    student[0, target[0]] = 100.0  # the target takes all the float32 mass
    teacher[1, target[1]] = 150.0
    student[2, :7] = -math.inf  # masked classes on both sides
    teacher[2, :7] = -math.inf
    target[2] = 150
    student.requires_grad_(True)
    loss = fastkd.kd_loss(student, teacher, target, divergence="dkd", temperature=1.0, reduction="none",
                          backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    leaf = student.detach().double().requires_grad_(True)
    # Masked classes carry no probability on either side: row 2 is its unmasked columns.
    rows = [0, 1, 3]
    ref = torch.cat([log_space_dkd(leaf[rows], teacher[rows].double(), target[rows], 1.0, 8.0, 1.0),
                     log_space_dkd(leaf[2:3, 7:], teacher[2:3, 7:].double(), target[2:3] - 7, 1.0, 8.0, 1.0)])
    (ref_grad,) = torch.autograd.grad(ref.sum(), leaf)
    assert rel_err(loss[[0, 1, 3, 2]], ref) < 2e-5 and rel_err(grad, ref_grad) < 2e-5
    assert torch.equal(grad[2, :7], torch.zeros_like(grad[2, :7]))


@pytest.mark.skipif("native" not in DKD_BACKENDS, reason="the native dkd kernels are not built here")
def test_native_dkd_results_do_not_depend_on_the_thread_count():
    student, teacher, target = _problem(37, 1000)
    student.requires_grad_(True)
    results = []
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            loss = fastkd.kd_loss(student, teacher, target, divergence="dkd", reduction="none", backend="native")
            results.append((loss, *torch.autograd.grad(loss.sum(), student)))
        finally:
            torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.skipif("native" not in DKD_BACKENDS, reason="the native dkd kernels are not built here")
def test_native_dkd_entry_points_require_labels():
    from fastkd.divergences import make_spec
    from fastkd.kernels.logits import native

    student, teacher, _ = _problem(3, 9)
    spec = make_spec("dkd")
    with pytest.raises(ValueError, match="labels"):
        native.kd_rows_forward(student, teacher, None, spec, -100)


@pytest.mark.skipif("native" not in DKD_BACKENDS, reason="the native dkd kernels are not built here")
def test_an_extension_built_before_the_dkd_kernels_says_rebuild(monkeypatch):
    from fastkd.divergences import make_spec
    from fastkd.kernels import native_ext
    from fastkd.kernels.logits import native

    ext = native_ext.extension()

    class Stale:  # the real extension without the dkd entry points
        def __getattr__(self, name):
            if name.startswith("dkd_rows_"):
                raise AttributeError(name)
            return getattr(ext, name)

    student, teacher, target = _problem(3, 9)
    monkeypatch.setattr(native, "extension", Stale)
    with pytest.raises(RuntimeError, match="rebuild"):
        native.kd_rows_forward(student, teacher, target, make_spec("dkd"), -100)
