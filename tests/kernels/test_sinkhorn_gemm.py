"""The gemm Sinkhorn backend (fastkd/kernels/sinkhorn/gemm.py), a conditional registry row: a shared
cost inside its exact domain. Against POT and the log-domain torch backend from ε = 1 down to the
domain's edge, past the edge through the registry, with zero masses and non-uniform marginals;
gradients against autograd through a float64 loop (envelope ones also against finite differences,
in test_sinkhorn.py); and the losses that take it through backend="auto"."""

import math

import pytest
import torch

import fastkd
from conftest import DEVICE, OT_LOSS_TOLERANCE, SINKHORN_TOLERANCE, each_backend
from fastkd.kernels import registry
from fastkd.kernels.sinkhorn import gemm
from fastkd.kernels.sinkhorn.contract import SinkhornCall
from ot_reference import sinkd_loss, sinkhorn_loop, wkd_loss
from reference import rel_err

pytestmark = pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
sinkhorn_op = torch.ops.fastkd.sinkhorn.default
# float64 runs the same algorithm with float64's exponent range; held to the torch backend's tolerance.
TOL = {torch.float64: SINKHORN_TOLERANCE["torch"], torch.float32: SINKHORN_TOLERANCE["gemm"]}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])


@pytest.fixture
def ot():
    try:
        import ot as pot
    except ImportError as exc:
        pytest.skip(f"POT is not installed ({exc})")
    return pot


def _masses(*shape, zeros=()):
    """Random non-uniform masses, exact zeros at ``zeros``."""
    x = torch.rand(*shape, dtype=torch.float64) + 1e-3
    for index in zeros:
        x[index] = 0
    return (x / x.sum(-1, keepdim=True)).to(DEVICE)


def _shared_problem(B, n, m, scale=2.0, a_zeros=(), b_zeros=()):
    cost = (scale * torch.rand(n, m, dtype=torch.float64)).to(DEVICE)
    return cost, _masses(B, n, zeros=a_zeros), _masses(B, m, zeros=b_zeros)


def _edge_eps(cost, dtype):
    """The smallest ε inside the gemm backend's domain for this cost in ``dtype``."""
    return gemm.cost_spread(cost) / gemm.domain_limit(dtype, *cost.shape)


def _pot_fixed(ot, cost, a, b, eps, n_iter):
    """POT's sinkhorn_log run for exactly n_iter iterations: (value_linear, f, g) in float64."""
    cost, a, b = (x.detach().double().cpu().numpy() for x in (cost, a, b))
    plan, log = ot.bregman.sinkhorn_log(a, b, cost, eps, numItermax=n_iter, stopThr=0.0, log=True)
    return float((plan * cost).sum()), eps * torch.from_numpy(log["log_u"]), eps * torch.from_numpy(log["log_v"])


def _call(cost, n_problems, eps, dtype=torch.float32):
    return SinkhornCall(cost, n_problems, eps, dtype)


# --- forward -----------------------------------------------------------------------------------

@each_backend("sinkhorn", conditional=True)
@DTYPES
@pytest.mark.parametrize("eps_at", ["1", "0.1", "twice-the-edge", "the-edge"])
def test_matches_pot_and_the_log_domain_solver_down_to_the_domain_edge(ot, backend, dtype, eps_at):
    B, n, m, n_iter, scale = 3, 9, 6, 25, 2.0
    cost, a, b = _shared_problem(B, n, m, scale, a_zeros=[(1, 4)], b_zeros=[(2, 0)])
    edge = _edge_eps(cost, dtype)
    eps = {"1": 1.0, "0.1": 0.1, "twice-the-edge": 2 * edge, "the-edge": edge * (1 + 1e-6)}[eps_at]
    args = [x.to(dtype) for x in (cost, a, b)]
    out = fastkd.sinkhorn(*args, eps=eps, max_iter=n_iter, tol=None, grad="none", return_plan=True, backend=backend)
    log_domain = fastkd.sinkhorn(*args, eps=eps, max_iter=n_iter, tol=None, grad="none", return_plan=True,
                                 backend="torch")
    tol = TOL[dtype]
    assert (out.n_iter == n_iter).all()
    for name in ("value", "value_linear", "plan"):
        assert rel_err(getattr(out, name), getattr(log_domain, name)) <= tol, name
    for name, mass in (("f", a), ("g", b)):
        got, ref = getattr(out, name), getattr(log_domain, name)
        assert (torch.isneginf(got) == (mass == 0)).all()
        assert rel_err(got[mass > 0], ref[mass > 0]) <= 10 * tol * scale / eps, name
    for k in range(B):
        rows, cols = a[k] > 0, b[k] > 0
        value_linear, f, g = _pot_fixed(ot, cost[rows][:, cols], a[k][rows], b[k][cols], eps, n_iter)
        assert abs(float(out.value_linear[k]) - value_linear) <= tol * scale
        assert rel_err(out.f[k][rows].double().cpu(), f) <= 10 * tol * scale / eps
        assert rel_err(out.g[k][cols].double().cpu(), g) <= 10 * tol * scale / eps
        assert (out.plan[k][~rows] == 0).all() and (out.plan[k][:, ~cols] == 0).all()


@DTYPES
def test_converged_solution_and_per_problem_stopping(ot, dtype):
    """Each problem stops on its own (frozen once converged, no host synchronisation needed), at
    the iteration the log-domain solver stops, and equals POT's converged solution."""
    B, n, m, eps = 4, 7, 8, 0.2
    cost, a, b = _shared_problem(B, n, m, a_zeros=[(0, 1)], b_zeros=[(3, 5)])
    a[1] = 1.0 / n  # uniform marginals: this problem needs fewer iterations than the others
    b[1] = 1.0 / m
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    args = [x.to(dtype) for x in (cost, a, b)]
    out = fastkd.sinkhorn(*args, eps=eps, max_iter=3000, tol=tol, backend="gemm")
    log_domain = fastkd.sinkhorn(*args, eps=eps, max_iter=3000, tol=tol, backend="torch")
    # fp32: BLAS sums in an order that depends on the batch size, so the iteration at which an
    # error crosses tol may move by one or two.
    slack = 0 if dtype == torch.float64 else 2
    assert (out.err <= tol).all() and out.n_iter.min() < out.n_iter.max()
    assert (out.n_iter - log_domain.n_iter).abs().max() <= slack
    for k in range(B):
        alone = fastkd.sinkhorn(args[0], args[1][k], args[2][k], eps=eps, max_iter=3000, tol=tol, backend="gemm")
        assert abs(int(alone.n_iter) - int(out.n_iter[k])) <= slack
        assert rel_err(out.value[k], alone.value) <= TOL[dtype]
        res = ot.solve(cost.cpu(), a[k].cpu(), b[k].cpu(), reg=eps, max_iter=10000, tol=1e-14)
        assert abs(float(out.value[k]) - float(res.value)) <= 100 * TOL[dtype]
        assert abs(float(out.value_linear[k]) - float(res.value_linear)) <= 100 * TOL[dtype]


def test_masses_across_thirty_orders_of_magnitude_at_the_edge():
    """Masses from 1e-30 to 1 at ε on the domain's edge, fp32, against the log-domain solver in
    float64: entries flushed below the smallest normal number change nothing measurable."""
    B, n, m, n_iter = 3, 40, 30, 30
    cost = (2 * torch.rand(n, m, dtype=torch.float64)).to(DEVICE)
    a, b = _masses(B, n), _masses(B, m)
    a = a * torch.logspace(-30, 0, n, dtype=torch.float64, device=DEVICE)[torch.randperm(n, device=DEVICE)]
    b = b * torch.logspace(-30, 0, m, dtype=torch.float64, device=DEVICE)[torch.randperm(m, device=DEVICE)]
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    eps = _edge_eps(cost.float(), torch.float32) * 1.01
    ref = fastkd.sinkhorn(cost, a, b, eps=eps, max_iter=n_iter, tol=None, grad="none", backend="torch")
    out = fastkd.sinkhorn(cost.float(), a.float(), b.float(), eps=eps, max_iter=n_iter, tol=None, grad="none",
                          backend="gemm")
    assert rel_err(out.value_linear, ref.value_linear) <= TOL[torch.float32]
    assert rel_err(out.value, ref.value) <= TOL[torch.float32]
    # f̃ is ε·log of the sums (not of the masses): its error is fp32 rounding of values ~Δ.
    assert rel_err(out.f - out.f.mean(1, keepdim=True), (ref.f - ref.f.mean(1, keepdim=True)).float()) <= 1e-4


# --- the registry's condition ------------------------------------------------------------------

def test_auto_takes_gemm_only_for_a_large_shared_cost_inside_its_domain():
    cost = torch.rand(96, 96, device=DEVICE)
    big, small = 4, 1  # 4·96² ≥ 2^15 > 96²
    fp32 = (torch.float32,)

    def auto(call):
        return registry.select("sinkhorn", "auto", DEVICE, fp32, call=call)

    assert auto(_call(cost, big, 0.05)) == "gemm"
    assert auto(_call(cost, small, 0.05)) != "gemm"  # too small: the log-domain kernels are faster
    assert auto(_call(cost[None].expand(big, 96, 96), big, 0.05)) != "gemm"  # per-problem costs
    assert auto(_call(cost, big, 1e-3)) != "gemm"  # past the edge
    assert auto(None) != "gemm"
    assert registry.select("sinkhorn", "gemm", DEVICE, fp32, call=_call(cost, small, 0.05)) == "gemm"
    with pytest.raises(ValueError, match=r"backend='gemm' cannot run this sinkhorn call: the cost's spread over "
                                         r"eps .* exceeds .* Backends that run it: \[.*'torch'.*\]"):
        registry.select("sinkhorn", "gemm", DEVICE, fp32, call=_call(cost, big, 1e-3))
    with pytest.raises(ValueError, match="one \\(n, m\\) cost shared"):
        fastkd.sinkhorn(cost[None].expand(2, 96, 96), backend="gemm")


def test_the_cost_is_read_once_per_tensor_and_version(monkeypatch):
    reads = []
    shifted = gemm._shifted
    monkeypatch.setattr(gemm, "_shifted", lambda *args: reads.append(1) or shifted(*args))
    cost = torch.rand(50, 40, device=DEVICE)
    first = gemm.cost_spread(cost)
    assert gemm.cost_spread(cost) == first and len(reads) == 1
    cost.mul_(3.0)  # in place: a new version
    assert gemm.cost_spread(cost) == pytest.approx(3 * first, rel=1e-6) and len(reads) == 2
    gemm.cost_spread(cost.clone())  # another tensor
    assert len(reads) == 3
    # A known bound (SinkhornCall.cost_spread) reads nothing.
    assert gemm.condition(SinkhornCall(cost, 100, 0.05, torch.float32, 2.0), auto=True).auto
    assert len(reads) == 3


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the kernel is kept on a CPU only")
def test_the_kernel_is_reused_only_for_an_equal_cost(monkeypatch):
    computed = []
    compute = gemm._compute_shared
    monkeypatch.setattr(gemm, "_compute_shared", lambda *args: computed.append(1) or compute(*args))
    monkeypatch.setattr(gemm, "_LAST_SHARED", {})
    cost, a, b = _shared_problem(3, 6, 5)
    first = fastkd.sinkhorn(cost, a, b, eps=0.1, backend="gemm")
    again = fastkd.sinkhorn(cost, a, b, eps=0.1, backend="gemm")
    assert len(computed) == 1 and torch.equal(first.value, again.value)
    fastkd.sinkhorn(cost, a, b, eps=0.2, backend="gemm")
    assert len(computed) == 2
    cost.data.mul_(0.5)  # a change the version counter does not see
    changed = fastkd.sinkhorn(cost, a, b, eps=0.2, backend="gemm")
    assert len(computed) == 3
    assert rel_err(changed.value, fastkd.sinkhorn(cost, a, b, eps=0.2, backend="torch").value) <= TOL[torch.float64]


@pytest.mark.parametrize("n_problems", [1, 5])
def test_past_the_edge_the_log_domain_kernels_run_and_agree_with_pot(ot, n_problems):
    """ε = 1e-3 of the cost's scale: the registry hands auto's call to the log-domain kernels,
    visibly (select names them), and they agree with POT; backend="gemm" raises."""
    n, m, scale, n_iter = 96, 90, 2.0, 30
    cost, a, b = _shared_problem(n_problems, n, m, scale)
    eps = 1e-3 * scale
    if n_problems > 1:
        assert n_problems * n * m >= gemm.MIN_ELEMENTS  # large enough: only the domain turns gemm away
    chosen = registry.select("sinkhorn", "auto", DEVICE, (torch.float32,), call=_call(cost.float(), n_problems, eps))
    assert chosen in registry.usable_backends("sinkhorn", DEVICE.type, conditional=False)
    out = fastkd.sinkhorn(cost.float(), a.float(), b.float(), eps=eps, max_iter=n_iter, tol=None, grad="none")
    for k in range(n_problems):
        value_linear, _, _ = _pot_fixed(ot, cost, a[k], b[k], eps, n_iter)
        assert abs(float(out.value_linear[k]) - value_linear) <= TOL[torch.float32] * scale
    with pytest.raises(ValueError, match="spread over eps"):
        fastkd.sinkhorn(cost.float(), a.float(), b.float(), eps=eps, backend="gemm")


def test_outside_the_domain_the_kernel_itself_returns_nan():
    """What backend="gemm" gives where the condition could not read the cost (torch.compile)."""
    cost, a, b = _shared_problem(2, 6, 5)
    outputs = sinkhorn_op(cost.float(), a.float(), b.float(), 1e-3, 5, -1.0, "none", True, "gemm", "fp32")
    for index in (0, 1, 2, 3, 5, 6):  # value, value_linear, f, g, err, plan
        assert torch.isnan(outputs[index]).all()
    assert (outputs[4] == 5).all()


def test_compiled_with_an_explicit_gemm_backend():
    cost, a, b = _shared_problem(3, 6, 5)
    cost, a, b = cost.float().requires_grad_(), a.float(), b.float()

    def loss(cost, a, b):
        out = fastkd.sinkhorn(cost, a, b, eps=0.1, max_iter=15, tol=None, grad="unrolled", backend="gemm")
        return out.value.sum() + out.value_linear.sum()

    (compiled_grad,) = torch.autograd.grad(torch.compile(loss, fullgraph=True)(cost, a, b), cost)
    (eager_grad,) = torch.autograd.grad(loss(cost, a, b), cost)
    assert rel_err(compiled_grad, eager_grad) <= 1e-6


def test_compiled_auto_keeps_the_log_domain_kernels_without_reading_the_cost(monkeypatch):
    """While torch.compile traces, the condition cannot read the cost: auto passes gemm over,
    with no graph break, however large the call."""
    monkeypatch.setattr(gemm, "cost_spread", lambda cost: pytest.fail("read while tracing"))
    cost, a, b = (x.float() for x in _shared_problem(4, 96, 96, scale=1.0))
    assert 4 * 96 * 96 >= gemm.MIN_ELEMENTS

    def value(cost, a, b):
        return fastkd.sinkhorn(cost, a, b, eps=0.1, max_iter=10, tol=None, grad="none").value

    compiled = torch.compile(value, fullgraph=True)(cost, a, b)
    log_domain = fastkd.sinkhorn(cost, a, b, eps=0.1, max_iter=10, tol=None, grad="none", backend="torch").value
    assert rel_err(compiled, log_domain) <= 1e-6


def test_custom_op_registration():
    cost, a, b = _shared_problem(2, 4, 3)
    cost.requires_grad_()
    torch.library.opcheck(sinkhorn_op, (cost, a, b, 0.1, 5, -1.0, "unrolled", True, "gemm", "fp32"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# --- gradients ---------------------------------------------------------------------------------

@each_backend("sinkhorn", "sinkhorn_backward", conditional=True)
@DTYPES
@pytest.mark.parametrize("grad", ["envelope", "unrolled"])
def test_gradients_match_autograd_through_a_float64_loop(backend, dtype, grad):
    """Unrolled: exact gradients of value and value_linear through the iterations run; envelope:
    ∂value/∂C = P of the final iterate (the loop's plan). Zero masses on both sides."""
    B, n, m, n_iter, eps = 4, 7, 5, 9, 0.1
    cost, a, b = _shared_problem(B, n, m, scale=1.0, a_zeros=[(0, 3)], b_zeros=[(2, 1)])
    w_value = torch.randn(B, dtype=torch.float64, device=DEVICE)
    w_linear = torch.randn(B, dtype=torch.float64, device=DEVICE) if grad == "unrolled" else torch.zeros_like(w_value)
    ref_leaves = [x.clone().requires_grad_() for x in (cost, a, b)]
    ref_value, ref_linear, _, _, ref_plan = sinkhorn_loop(*ref_leaves, eps, n_iter)
    ref_grads = torch.autograd.grad((ref_value * w_value + ref_linear * w_linear).sum(), ref_leaves)
    leaves = [x.clone().to(dtype).requires_grad_() for x in (cost, a, b)]
    out = fastkd.sinkhorn(*leaves, eps=eps, max_iter=n_iter, tol=None, grad=grad, backend=backend)
    tol = TOL[dtype]
    assert rel_err(out.value, ref_value) <= tol and rel_err(out.value_linear, ref_linear) <= tol
    loss = (out.value * w_value.to(dtype)).sum()
    if grad == "unrolled":
        loss = loss + (out.value_linear * w_linear.to(dtype)).sum()
    grads = torch.autograd.grad(loss, leaves)
    if grad == "envelope":  # the envelope's ∂/∂C is Σ w·P; its ∂/∂a, ∂/∂b are checked by finite differences
        expected = (w_value[:, None, None] * ref_plan.detach()).sum(0)
        assert rel_err(grads[0], expected) <= 10 * tol
        return
    for grad_got, grad_ref, keep in zip(grads, ref_grads, [torch.ones_like(cost, dtype=torch.bool), a > 0, b > 0]):
        assert grad_got.shape == grad_ref.shape
        assert rel_err(grad_got[keep], grad_ref[keep]) <= 10 * tol
    assert (grads[1][a == 0] == 0).all() and (grads[2][b == 0] == 0).all()


def test_unrolled_gradients_with_problems_stopping_early_match_the_torch_backend(monkeypatch):
    """tol set: problems stop at different iterations; and the cost-gradient factors multiplied
    out in several flushes (FACTOR_ELEMENTS shrunk)."""
    monkeypatch.setattr(gemm, "FACTOR_ELEMENTS", 64)
    B, n, m = 4, 7, 6
    cost, a, b = _shared_problem(B, n, m, scale=1.0, b_zeros=[(1, 2)])
    a[2] = 1.0 / n
    b[2] = 1.0 / m
    weights = torch.randn(2, B, dtype=torch.float64, device=DEVICE)
    results = {}
    for backend in ("torch", "gemm"):
        leaves = [x.clone().requires_grad_() for x in (cost, a, b)]
        out = fastkd.sinkhorn(*leaves, eps=0.2, max_iter=40, tol=1e-6, grad="unrolled", backend=backend)
        loss = (out.value * weights[0] + out.value_linear * weights[1]).sum()
        results[backend] = (out.n_iter, torch.autograd.grad(loss, leaves))
    assert (results["gemm"][0] == results["torch"][0]).all() and results["gemm"][0].unique().numel() > 1
    for got, ref in zip(results["gemm"][1], results["torch"][1]):
        assert rel_err(got, ref) <= 1e-10


# --- precision ---------------------------------------------------------------------------------

@pytest.mark.parametrize("precision, loss_tol, grad_tol", [("fp32", 2e-6, 2e-5), ("tf32", 2e-6, 2e-5),
                                                           ("bf16", 5e-3, 5e-2)])
def test_gemm_precision(precision, loss_tol, grad_tol):
    """tf32 runs as fp32 on a CPU; bf16 stays within its documented error (gemm.py)."""
    student, teacher = torch.randn(8, 64, device=DEVICE) * 2, torch.randn(8, 64, device=DEVICE) * 2
    labels = torch.randint(0, 64, (8,), device=DEVICE)
    cost = _shared_problem(1, 64, 64, scale=1.0)[0]
    ref_leaf = student.double().requires_grad_()
    ref = fastkd.wasserstein_kd_loss(ref_leaf, teacher.double(), labels, cost=cost, backend="gemm")
    leaf = student.clone().requires_grad_()
    loss = fastkd.wasserstein_kd_loss(leaf, teacher, labels, cost=cost.float(), backend="gemm",
                                      gemm_precision=precision)
    if precision == "tf32" and DEVICE.type == "cuda":
        loss_tol, grad_tol = 1e-3, 1e-2
    assert rel_err(loss, ref) <= loss_tol
    assert rel_err(torch.autograd.grad(loss, leaf)[0], torch.autograd.grad(ref, ref_leaf)[0]) <= grad_tol
    with pytest.raises(ValueError, match="gemm_precision must be one of"):
        fastkd.sinkhorn(cost, gemm_precision="fp16")


# --- the losses --------------------------------------------------------------------------------

def _count_gemm_calls(monkeypatch):
    calls = []
    forward = gemm.sinkhorn_forward
    monkeypatch.setattr(gemm, "sinkhorn_forward", lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs))
    return calls


@each_backend("sinkhorn", "sinkhorn_backward", conditional=True)
def test_wasserstein_kd_matches_per_sample_copy_reference(backend):
    n_rows, n_classes, temperature, eps, n_iters = 5, 11, 2.0, 0.05, 10
    student, teacher = torch.randn(n_rows, n_classes, dtype=torch.float64) * 2, torch.randn(n_rows, n_classes) * 2
    weights = torch.nn.functional.normalize(torch.randn(n_classes, 8, dtype=torch.float64), dim=-1)
    cost = (1 - weights @ weights.T).clamp_min(0)
    labels = torch.randint(0, n_classes, (n_rows,))
    student, teacher, cost, labels = (x.to(DEVICE) for x in (student, teacher.double(), cost, labels))
    ref_leaf = student.clone().requires_grad_()
    ref = wkd_loss(ref_leaf, teacher, cost, temperature, eps, n_iters, labels)
    leaf = student.float().requires_grad_()
    loss = fastkd.wasserstein_kd_loss(leaf, teacher.float(), labels, cost=cost.float(), temperature=temperature,
                                      eps=eps, max_iter=n_iters, backend=backend)
    assert rel_err(loss, ref) <= OT_LOSS_TOLERANCE[backend]
    grad, ref_grad = torch.autograd.grad(loss, leaf)[0], torch.autograd.grad(ref, ref_leaf)[0]
    assert rel_err(grad, ref_grad) <= 10 * OT_LOSS_TOLERANCE[backend]


def test_wasserstein_kd_takes_gemm_through_auto(monkeypatch):
    calls = _count_gemm_calls(monkeypatch)
    n_rows, n_classes = 8, 64  # 8·64² = 2^15
    student = torch.randn(n_rows, n_classes, dtype=torch.float64, device=DEVICE) * 2
    teacher = torch.randn(n_rows, n_classes, dtype=torch.float64, device=DEVICE) * 2
    cost = _shared_problem(1, n_classes, n_classes, scale=1.0)[0]
    labels = torch.randint(0, n_classes, (n_rows,), device=DEVICE)
    ref_leaf, leaf = student.clone().requires_grad_(), student.float().requires_grad_()
    ref = wkd_loss(ref_leaf, teacher, cost, 1.0, 0.05, 10, labels)
    loss = fastkd.wasserstein_kd_loss(leaf, teacher.float(), labels, cost=cost.float())
    assert len(calls) == 1
    assert rel_err(loss, ref) <= OT_LOSS_TOLERANCE["gemm"]
    assert rel_err(torch.autograd.grad(loss, leaf)[0], torch.autograd.grad(ref, ref_leaf)[0]) <= 10 * 3e-5
    fastkd.wasserstein_kd_loss(student[:4], teacher[:4], labels[:4], cost=cost)  # 4·64² < 2^15: log-domain
    assert len(calls) == 1


def test_sinkhorn_kd_takes_gemm_through_auto_without_reading_the_cost(monkeypatch):
    calls = _count_gemm_calls(monkeypatch)
    monkeypatch.setattr(gemm, "cost_spread", lambda cost: pytest.fail("SinKD's cost spread is known: no read"))
    n_rows = math.isqrt(gemm.MIN_ELEMENTS) + 1
    student = torch.randn(n_rows, 10, dtype=torch.float64, device=DEVICE) * 2
    teacher = torch.randn(n_rows, 10, dtype=torch.float64, device=DEVICE) * 2
    ref_leaf, leaf = student.clone().requires_grad_(), student.float().requires_grad_()
    ref = sinkd_loss(ref_leaf, teacher, 2.0, 0.1, 20)
    loss = fastkd.sinkhorn_kd_loss(leaf, teacher.float(), temperature=2.0, eps=0.1, max_iter=20)
    assert len(calls) == 1
    assert rel_err(loss, ref) <= OT_LOSS_TOLERANCE["gemm"]
    assert rel_err(torch.autograd.grad(loss, leaf)[0], torch.autograd.grad(ref, ref_leaf)[0]) <= 10 * 3e-5
