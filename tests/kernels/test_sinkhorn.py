"""fastkd.sinkhorn against POT's log-domain solver, finite differences and autograd through a plain
loop, on every backend that runs here (the Triton kernels on the CPU interpreter without a GPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastkd
import fastkd.kernels.sinkhorn.triton as triton_sinkhorn
from fastkd.kernels.sinkhorn.triton_cost_grad import cost_grad_config, cost_grad_grid, cost_grad_work

from conftest import DEVICE, SINKHORN_TOLERANCE, TOLERANCE, backends_for, each_backend
from ot_reference import sinkhorn_loop
from reference import rel_err

BACKENDS = backends_for("sinkhorn")
sinkhorn_op = torch.ops.fastkd.sinkhorn.default

# Fixed-iteration comparisons stop POT before convergence on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")

TOL = SINKHORN_TOLERANCE


def _dtype(backend):
    return torch.float64 if backend == "torch" else torch.float32


def _masses(*shape, dtype=torch.float64, zeros=()):
    x = torch.rand(*shape, dtype=dtype) + 0.05
    for index in zeros:
        x[index] = 0
    return (x / x.sum(-1, keepdim=True)).to(DEVICE)


def _problem(B, n, m, shared, scale=1.0, dtype=torch.float64, a_zeros=(), b_zeros=()):
    cost = scale * torch.rand(*((n, m) if shared else (B, n, m)), dtype=dtype)
    return cost.to(DEVICE), _masses(B, n, dtype=dtype, zeros=a_zeros), _masses(B, m, dtype=dtype, zeros=b_zeros)


@pytest.fixture
def ot():
    """POT, a test-only dependency: the tests that compare with it skip where it is missing."""
    try:
        import ot as pot
    except ImportError as exc:  # absent, or broken (e.g. built against another numpy)
        pytest.skip(f"POT is not installed ({exc})")
    return pot


def _pot_fixed(ot, cost, a, b, eps, n_iter):
    """POT's sinkhorn_log for one problem run for exactly n_iter iterations: (value_linear, f, g)."""
    cost, a, b = (x.detach().double().cpu().numpy() for x in (cost, a, b))
    plan, log = ot.bregman.sinkhorn_log(a, b, cost, eps, numItermax=n_iter, stopThr=0.0, log=True)
    return float((plan * cost).sum()), eps * torch.from_numpy(log["log_u"]), eps * torch.from_numpy(log["log_v"])


@each_backend("sinkhorn")
@pytest.mark.parametrize("shared", [False, True], ids=["batched", "shared"])
@pytest.mark.parametrize("eps_scale", [1.0, 1e-1, 1e-2, 1e-3])
def test_matches_pot_iteration_by_iteration(ot, backend, shared, eps_scale):
    B, n, m, n_iter, scale = 3, 9, 6, 25, 2.0
    cost, a, b = _problem(B, n, m, shared, scale)
    eps = eps_scale * scale
    dtype = _dtype(backend)
    out = fastkd.sinkhorn(cost.to(dtype), a.to(dtype), b.to(dtype), eps=eps, max_iter=n_iter, tol=None,
                          grad="none", backend=backend)
    assert torch.isfinite(out.value).all() and torch.isfinite(out.f).all() and torch.isfinite(out.g).all()
    assert (out.n_iter == n_iter).all()
    for k in range(B):
        c_k = cost if shared else cost[k]
        value_linear, f, g = _pot_fixed(ot, c_k, a[k], b[k], eps, n_iter)
        value = float(ot.solve(c_k.cpu(), a[k].cpu(), b[k].cpu(), reg=eps, max_iter=n_iter, tol=0.0).value)
        assert abs(float(out.value_linear[k]) - value_linear) <= TOL[backend] * scale
        assert abs(float(out.value[k]) - value) <= TOL[backend] * scale
        # Potentials are defined up to f + c, g − c; POT's and ours take the same iteration, so no shift.
        assert rel_err(out.f[k], f) <= 10 * TOL[backend] / eps_scale
        assert rel_err(out.g[k], g) <= 10 * TOL[backend] / eps_scale


@each_backend("sinkhorn")
def test_zero_masses_are_absent_rows_and_columns(ot, backend):
    """Zero-mass entries give exactly the problem with those rows/columns removed (ragged batches)."""
    B, n, m, n_iter, eps = 2, 7, 8, 15, 0.1
    cost, a, b = _problem(B, n, m, False, a_zeros=[(0, 2), (1, 0), (1, 6)], b_zeros=[(0, 7), (1, 3)])
    dtype = _dtype(backend)
    out = fastkd.sinkhorn(cost.to(dtype), a.to(dtype), b.to(dtype), eps=eps, max_iter=n_iter, tol=None,
                          grad="none", return_plan=True, backend=backend)
    for k in range(B):
        rows, cols = a[k] > 0, b[k] > 0
        value_linear, f, g = _pot_fixed(ot, cost[k][rows][:, cols], a[k][rows], b[k][cols], eps, n_iter)
        assert abs(float(out.value_linear[k]) - value_linear) <= TOL[backend]
        assert rel_err(out.f[k][rows], f) <= 10 * TOL[backend]
        assert rel_err(out.g[k][cols], g) <= 10 * TOL[backend]
        assert torch.isneginf(out.f[k][~rows]).all() and torch.isneginf(out.g[k][~cols]).all()
        assert (out.plan[k][~rows] == 0).all() and (out.plan[k][:, ~cols] == 0).all()


@each_backend("sinkhorn")
def test_converged_solution_matches_pot_with_zero_masses(ot, backend):
    n, m, eps = 6, 5, 0.2
    cost, a, b = _problem(1, n, m, True, a_zeros=[(0, 1)], b_zeros=[(0, 4)])
    dtype = _dtype(backend)
    tol = 1e-12 if backend == "torch" else 1e-6
    out = fastkd.sinkhorn(cost.to(dtype), a[0].to(dtype), b[0].to(dtype), eps=eps, max_iter=2000, tol=tol,
                          backend=backend)
    res = ot.solve(cost.cpu(), a[0].cpu(), b[0].cpu(), reg=eps, max_iter=5000, tol=1e-14)
    assert out.value.shape == () and out.f.shape == (n,) and float(out.err) <= tol
    assert abs(float(out.value) - float(res.value)) <= 100 * TOL[backend]
    assert abs(float(out.value_linear) - float(res.value_linear)) <= 100 * TOL[backend]


@each_backend("sinkhorn")
def test_each_problem_stops_on_its_own(backend):
    """Problems converge after different iteration counts; a converged one is frozen, so its result
    equals solving it alone, whatever the others still do."""
    n, m = 6, 7
    dtype = _dtype(backend)
    cost = torch.rand(3, n, m, dtype=dtype, device=DEVICE)
    cost[0] *= 0.05  # nearly constant cost: converges in a few iterations
    a, b = _masses(3, n, dtype=dtype), _masses(3, m, dtype=dtype)
    tol = 1e-9 if backend == "torch" else 1e-5
    out = fastkd.sinkhorn(cost, a, b, eps=0.05, max_iter=500, tol=tol, backend=backend)
    assert (out.err <= tol).all()
    assert out.n_iter[0] < out.n_iter.max()
    for k in range(3):
        alone = fastkd.sinkhorn(cost[k], a[k], b[k], eps=0.05, max_iter=500, tol=tol, backend=backend)
        assert int(alone.n_iter) == int(out.n_iter[k])
        assert rel_err(out.value[k], alone.value) <= TOL[backend]


@each_backend("sinkhorn", "sinkhorn_backward")
@pytest.mark.parametrize("eps", [1e-3, 3e-3])
def test_small_eps_has_no_nan(backend, eps):
    dtype = _dtype(backend)
    cost, a, b = _problem(2, 12, 10, False, dtype=dtype, a_zeros=[(0, 3)])
    cost, a, b = (x.requires_grad_() for x in (cost, a, b))
    for grad in ("envelope", "unrolled"):
        out = fastkd.sinkhorn(cost, a, b, eps=eps, max_iter=60, tol=None, grad=grad, backend=backend)
        assert torch.isfinite(out.value).all() and torch.isfinite(out.value_linear).all()
        assert torch.isfinite(out.f[a > 0]).all() and torch.isfinite(out.g).all()
        grads = torch.autograd.grad(out.value.sum(), (cost, a, b))
        assert all(torch.isfinite(g_).all() for g_ in grads)


def test_tol_none_runs_exactly_max_iter():
    cost, a, b = _problem(2, 5, 5, False)
    out = fastkd.sinkhorn(cost, a, b, eps=10.0, max_iter=17, tol=None, grad="none")
    assert out.n_iter.tolist() == [17, 17] and (out.err < 1e-12).all()


# --- gradients -------------------------------------------------------------------------------

def _solve_value(cost, a, b, eps, backend):
    return fastkd.sinkhorn(cost, a, b, eps=eps, max_iter=5000, tol=1e-13, grad="none", backend=backend).value


# The gemm backend (a shared cost only) in float64: its envelope ∂/∂C is one GEMM over the batch.
@pytest.mark.parametrize("shared, backend", [(False, "torch"), (True, "torch"), (True, "gemm")],
                         ids=["batched", "shared", "shared-gemm"])
def test_envelope_gradients_match_finite_differences(shared, backend):
    """∂value/∂C = P, and ∂value/∂a, ∂value/∂b along directions that keep Σa = Σb (the simplex's
    tangent space, the only directions balanced OT defines)."""
    B, n, m, eps, h = 2, 6, 5, 0.2, 1e-5
    cost, a, b = _problem(B, n, m, shared)
    leaves = [x.clone().requires_grad_() for x in (cost, a, b)]
    out = fastkd.sinkhorn(*leaves, eps=eps, max_iter=5000, tol=1e-13, backend=backend)
    weights = torch.randn(B, dtype=torch.float64, device=DEVICE)
    grads = torch.autograd.grad((out.value * weights).sum(), leaves)
    for which, grad in enumerate(grads):
        direction = torch.randn_like(grad)
        if which > 0:
            direction -= direction.mean(-1, keepdim=True)
            assert grad.sum(-1).abs().max() <= 1e-12  # centred
        inputs = [cost, a, b]
        plus, minus = list(inputs), list(inputs)
        plus[which] = inputs[which] + h * direction
        minus[which] = inputs[which] - h * direction
        fd = ((_solve_value(*plus, eps, backend) - _solve_value(*minus, eps, backend)) / (2 * h) * weights).sum()
        assert abs(float(fd) - float((grad * direction).sum())) <= 1e-7 * max(1.0, abs(float(fd)))


def test_envelope_marginal_gradient_equals_pot_autodiff_up_to_a_constant(ot):
    """POT's autodiff through a converged solve gives the same gradient in R^n up to a constant
    (the part balanced OT leaves undefined)."""
    n, m, eps = 6, 4, 0.3
    cost, a, b = _problem(1, n, m, True)
    ours_a = a[0].clone().requires_grad_()
    out = fastkd.sinkhorn(cost, ours_a, b[0], eps=eps, max_iter=5000, tol=1e-13, backend="torch")
    (ours,) = torch.autograd.grad(out.value, [ours_a])
    pot_a = a[0].cpu().clone().requires_grad_()
    res = ot.solve(cost.cpu(), pot_a, b[0].cpu(), reg=eps, max_iter=5000, tol=1e-13, grad="autodiff")
    (theirs,) = torch.autograd.grad(res.value, [pot_a])
    assert rel_err(ours.cpu(), theirs - theirs.mean()) <= 1e-8


@each_backend("sinkhorn", "sinkhorn_backward")
@pytest.mark.parametrize("shared", [False, True], ids=["batched", "shared"])
def test_unrolled_gradients_match_autograd_through_the_loop(backend, shared):
    B, n, m, n_iter, eps = 3, 7, 5, 9, 0.1
    cost, a, b = _problem(B, n, m, shared, a_zeros=[(0, 3)], b_zeros=[(2, 1)])
    w_value = torch.randn(B, dtype=torch.float64, device=DEVICE)
    w_linear = torch.randn(B, dtype=torch.float64, device=DEVICE)
    ref_leaves = [x.clone().requires_grad_() for x in (cost, a, b)]
    ref_value, ref_linear, _, _, _ = sinkhorn_loop(*ref_leaves, eps, n_iter)
    ref_grads = torch.autograd.grad((ref_value * w_value + ref_linear * w_linear).sum(), ref_leaves)
    dtype = _dtype(backend)
    leaves = [x.clone().to(dtype).requires_grad_() for x in (cost, a, b)]
    out = fastkd.sinkhorn(*leaves, eps=eps, max_iter=n_iter, tol=None, grad="unrolled", backend=backend)
    assert rel_err(out.value, ref_value) <= TOL[backend] and rel_err(out.value_linear, ref_linear) <= TOL[backend]
    grads = torch.autograd.grad((out.value * w_value.to(dtype) + out.value_linear * w_linear.to(dtype)).sum(),
                                leaves)
    support = [torch.ones_like(cost, dtype=torch.bool), a > 0, b > 0]
    for grad, ref, keep in zip(grads, ref_grads, support):
        assert grad.shape == ref.shape
        assert rel_err(grad[keep], ref[keep]) <= 10 * TOL[backend]
    assert (grads[1][a == 0] == 0).all() and (grads[2][b == 0] == 0).all()


def test_unrolled_saves_potentials_not_plans():
    B, n, m, n_iter = 4, 6, 5, 7
    cost, a, b = _problem(B, n, m, True)
    outputs = sinkhorn_op(cost, a, b, 0.1, n_iter, -1.0, "unrolled", False, "torch", "fp32")
    f_hist, g_hist = outputs[7], outputs[8]
    assert f_hist.shape == (B, n_iter, n) and g_hist.shape == (B, n_iter, m)
    assert outputs[6].numel() == 0  # no plan unless asked
    envelope = sinkhorn_op(cost, a, b, 0.1, n_iter, -1.0, "envelope", False, "torch", "fp32")
    assert envelope[7].numel() == 0 and envelope[8].numel() == 0


def test_grad_modes_decide_what_carries_a_gradient():
    cost, a, b = _problem(2, 4, 3, False)
    cost.requires_grad_()
    assert fastkd.sinkhorn(cost, a, b, grad="none").value.grad_fn is None
    envelope = fastkd.sinkhorn(cost, a, b, max_iter=500, grad="envelope")
    assert envelope.value.grad_fn is not None and envelope.value_linear.grad_fn is None
    unrolled = fastkd.sinkhorn(cost, a, b, grad="unrolled")
    assert unrolled.value_linear.grad_fn is not None
    assert unrolled.f.grad_fn is None and unrolled.plan is None


def test_custom_op_registration():
    cost, a, b = _problem(2, 4, 3, True)
    cost.requires_grad_()
    torch.library.opcheck(sinkhorn_op, (cost, a, b, 0.1, 5, -1.0, "unrolled", True, "torch", "fp32"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_fullgraph():
    cost, a, b = _problem(3, 6, 5, True, dtype=torch.float32)
    cost.requires_grad_()

    def loss(cost, a, b):
        out = fastkd.sinkhorn(cost, a, b, eps=0.1, max_iter=15, tol=None, grad="unrolled", validate=False)
        return out.value.sum() + out.value_linear.sum()

    (compiled_grad,) = torch.autograd.grad(torch.compile(loss, fullgraph=True)(cost, a, b), cost)
    (eager_grad,) = torch.autograd.grad(loss(cost, a, b), cost)
    assert rel_err(compiled_grad, eager_grad) <= 1e-6


# --- kernels ---------------------------------------------------------------------------------

@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend does not run here")
@pytest.mark.parametrize("shared", [False, True], ids=["batched", "shared"])
@pytest.mark.parametrize("grad", ["envelope", "unrolled"])
def test_triton_streamed_kernels(monkeypatch, shared, grad):
    """The kernels for problems larger than one on-chip tile, forced onto small shapes with 4×4 tiles."""
    monkeypatch.setattr(triton_sinkhorn, "MAX_TILE", 0)
    monkeypatch.setattr(triton_sinkhorn, "STREAM_BLOCK", 4)
    B, n, m = 2, 9, 6
    cost, a, b = _problem(B, n, m, shared, dtype=torch.float32, a_zeros=[(1, 8)], b_zeros=[(0, 0)])
    weights = torch.randn(2, B, device=DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        leaves = [x.clone().requires_grad_() for x in (cost, a, b)]
        out = fastkd.sinkhorn(*leaves, eps=0.1, max_iter=300 if grad == "envelope" else 8, tol=1e-5,
                              grad=grad, return_plan=True, backend=backend)
        loss = (out.value * weights[0]).sum()
        if grad == "unrolled":
            loss = loss + (out.value_linear * weights[1]).sum()
        results[backend] = (out, torch.autograd.grad(loss, leaves))
    (ref, ref_grads), (got, grads) = results["torch"], results["triton"]
    assert (got.n_iter == ref.n_iter).all()
    for name in ("value", "value_linear", "plan"):
        assert rel_err(getattr(got, name), getattr(ref, name)) <= 1e-5
    for grad_got, grad_ref in zip(grads, ref_grads):
        assert rel_err(grad_got, grad_ref) <= 1e-5


@pytest.mark.skipif("native" not in BACKENDS, reason="the native backend does not run here")
@pytest.mark.parametrize("shared", [False, True], ids=["batched", "shared"])
@pytest.mark.parametrize("grad", ["envelope", "unrolled"])
def test_compiled_forward_matches_torch_backend_in_fp32(shared, grad):
    """The C++ forward (csrc/sinkhorn/cpu.cpp, cuda.cu) against the torch backend on the same fp32 inputs, with
    a strided (transposed) cost, zero masses, the plan and, for "unrolled", the saved histories
    that the torch backward (shared by both) reads."""
    backend = "native"
    B, n, m = 3, 11, 7
    cost = torch.rand(*((m, n) if shared else (B, m, n)), device=DEVICE).transpose(-1, -2)
    a, b = _masses(B, n, dtype=torch.float32, zeros=[(1, 4)]), _masses(B, m, dtype=torch.float32, zeros=[(2, 0)])
    weights = torch.randn(2, B, device=DEVICE)
    results = {}
    for name in ("torch", backend):
        leaves = [x.clone().requires_grad_() for x in (cost, a, b)]
        out = fastkd.sinkhorn(*leaves, eps=0.1, max_iter=300 if grad == "envelope" else 8, tol=1e-5, grad=grad,
                              return_plan=True, backend=name)
        loss = (out.value * weights[0]).sum()
        if grad == "unrolled":
            loss = loss + (out.value_linear * weights[1]).sum()
        results[name] = (out, torch.autograd.grad(loss, leaves))
    (ref, ref_grads), (got, grads) = results["torch"], results[backend]
    assert (got.n_iter == ref.n_iter).all()
    assert ((got.err <= 1e-5) == (ref.err <= 1e-5)).all()  # the error itself is fp32 rounding noise near tol
    for name in ("value", "value_linear", "plan"):
        assert rel_err(getattr(got, name), getattr(ref, name)) <= 1e-5
    for name in ("f", "g"):
        finite = torch.isfinite(getattr(ref, name))
        assert (torch.isfinite(getattr(got, name)) == finite).all()
        assert rel_err(getattr(got, name)[finite], getattr(ref, name)[finite]) <= 1e-5
    for grad_got, grad_ref in zip(grads, ref_grads):
        assert rel_err(grad_got, grad_ref) <= 1e-5
    if grad == "unrolled":
        ops = [sinkhorn_op(cost, a, b, 0.1, 8, -1.0, "unrolled", False, name, "fp32") for name in ("torch", backend)]
        for index in (7, 8):  # f̃ and g̃ histories
            assert rel_err(ops[1][index], ops[0][index]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cost(dtype):
    cost, a, b = _problem(2, 6, 5, False, dtype=torch.float32)
    cost = cost.to(dtype)
    ref = fastkd.sinkhorn(cost.double(), a.double(), b.double(), eps=0.1, max_iter=30, tol=None, grad="none")
    for backend in BACKENDS:
        out = fastkd.sinkhorn(cost, a, b, eps=0.1, max_iter=30, tol=None, grad="none", backend=backend)
        assert out.value.dtype == torch.float32
        assert rel_err(out.value, ref.value) <= 1e-5


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's CUDA compiler is shipped for Linux")
def test_triton_kernels_compile_without_spills_for_sm90_and_sm80():
    """Compiles every kernel variant the launchers can choose to a cubin for sm_90 and sm_80 (Triton's
    own ptxas; no GPU needed) and fails on a spill or a 32-bit integer multiply (triton_aot.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_aot.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=1500,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_launch_variants_cover_every_shape():
    """triton_aot.py compiles ``launch_variants()``, which walks shapes up to twice the largest cap:
    larger problems must not reach a configuration beyond it."""
    variants = {(kernel.__name__, constexprs["BLOCK_N"], num_warps)
                for kernel, constexprs, num_warps in triton_sinkhorn.launch_variants()}
    for n, m in [(1, 1), (64, 64), (65, 3), (3, 300), (1000, 999), (4096, 50000)]:
        if n <= triton_sinkhorn.MAX_TILE and m <= triton_sinkhorn.MAX_TILE:
            block, num_warps = triton_sinkhorn.tile_config(n, m)
            names = ("sinkhorn_tile_forward_kernel", "sinkhorn_tile_unrolled_backward_kernel")
        else:
            block = triton_sinkhorn.STREAM_BLOCK
            num_warps = triton_sinkhorn.stream_config(block)
            names = ("sinkhorn_streamed_forward_kernel", "sinkhorn_streamed_unrolled_backward_kernel")
        assert {(name, block, num_warps) for name in names} <= variants
        assert ("sinkhorn_cost_grad_kernel", *cost_grad_config(n, m, triton_sinkhorn.STREAM_BLOCK)) in variants


# --- hazards of the Triton launches ------------------------------------------------------------

_CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)


@pytest.mark.parametrize("n_problems", [65535, 65536, 70000, 3_000_000])
@pytest.mark.parametrize("n", [10, 100, 3000])
@pytest.mark.parametrize("shared", [False, True], ids=["batched", "shared"])
def test_cost_grad_grid_fits_cuda_limits(n_problems, n, shared):
    """A grid of (tiles, problems) fails to launch past 65535 problems on CUDA (the interpreter has
    no such limit): the cost gradient's grid stays within every dimension's limit, and its programs
    together visit every (chunk, tile) item, with chunks that cover the batch exactly."""
    block, _ = cost_grad_config(n, n, triton_sinkhorn.STREAM_BLOCK)
    n_tiles = ((n + block - 1) // block) ** 2
    per_chunk, chunks = cost_grad_work(n_problems, n_tiles, shared, triton_sinkhorn.COST_GRAD_PARALLEL_PROGRAMS)
    assert (chunks - 1) * per_chunk < n_problems <= chunks * per_chunk
    if not shared:
        assert per_chunk == 1
    n_work = chunks * n_tiles
    grid = cost_grad_grid(n_work, triton_sinkhorn.COST_GRAD_MAX_PROGRAMS)
    assert all(1 <= size <= limit for size, limit in zip(grid, _CUDA_GRID_LIMITS)) and len(grid) <= 3
    programs = 1
    for size in grid:
        programs *= size
    assert programs == min(n_work, 2**31 - 1)  # each loops over the items a grid apart: all are visited


@pytest.mark.parametrize("n_problems, n_tiles", [(4096, 1), (10, 1), (100_000, 4), (7, 5000)])
def test_shared_cost_gradient_spreads_problems_over_programs(n_problems, n_tiles):
    """A shared cost's gradient sums every problem: it must not fall to one program per tile (a serial
    loop over the batch), yet keep its partial sums within COST_GRAD_PARALLEL_PROGRAMS tiles."""
    target = triton_sinkhorn.COST_GRAD_PARALLEL_PROGRAMS
    per_chunk, chunks = cost_grad_work(n_problems, n_tiles, True, target)
    assert chunks * n_tiles >= min(n_problems * n_tiles, target)
    assert chunks == 1 or chunks * n_tiles <= target


def _envelope_cost_grad(cost, a, b, eps, n_iter, weights):
    """∂(Σ w·value)/∂cost of the envelope mode, Σ_k w_k·P_k, from the float64 loop of ot_reference."""
    plan = sinkhorn_loop(cost, a, b, eps, n_iter)[4]
    grad = weights[:, None, None] * plan
    return grad.sum(0) if cost.dim() == 2 else grad


def _reference_grads(cost, a, b, eps, n_iter, weights, grad):
    """(value, ∂/∂cost) in float64: envelope from the final plan, unrolled by autograd through the loop."""
    cost, a, b = (x.detach().double() for x in (cost, a, b))
    if grad == "envelope":
        value = sinkhorn_loop(cost, a, b, eps, n_iter)[0]
        return value, _envelope_cost_grad(cost, a, b, eps, n_iter, weights)
    leaf = cost.clone().requires_grad_()
    value = sinkhorn_loop(leaf, a, b, eps, n_iter)[0]
    (grad_cost,) = torch.autograd.grad((value * weights).sum(), leaf)
    return value.detach(), grad_cost


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend does not run here")
@pytest.mark.parametrize("shared", [False, True], ids=["batched", "shared"])
@pytest.mark.parametrize("grad", ["envelope", "unrolled"])
def test_triton_cost_grad_folds_problems_and_loops_over_its_grid(monkeypatch, shared, grad):
    """The cost gradient with 3 programs for all its (chunk, tile) items, chunks of 2 problems (the
    last one short) for a shared cost and 4×4 tiles (6 per problem), against float64 references."""
    monkeypatch.setattr(triton_sinkhorn, "MAX_TILE", 0)  # unrolled: streamed backward + cost gradient
    monkeypatch.setattr(triton_sinkhorn, "STREAM_BLOCK", 4)
    monkeypatch.setattr(triton_sinkhorn, "COST_GRAD_MAX_PROGRAMS", 3)
    monkeypatch.setattr(triton_sinkhorn, "COST_GRAD_PARALLEL_PROGRAMS", 18)
    B, n, m, n_iter, eps = 5, 9, 6, 8, 0.1
    per_chunk, chunks = cost_grad_work(B, 6, shared, 18)
    assert (per_chunk, chunks) == ((2, 3) if shared else (1, 5))
    assert cost_grad_grid(chunks * 6, 3) == (3,)
    cost, a, b = _problem(B, n, m, shared, dtype=torch.float32, a_zeros=[(1, 8)], b_zeros=[(0, 0)])
    weights = torch.randn(B, dtype=torch.float64, device=DEVICE)
    leaf = cost.clone().requires_grad_()
    out = fastkd.sinkhorn(leaf, a, b, eps=eps, max_iter=n_iter, tol=None, grad=grad, backend="triton")
    (grad_cost,) = torch.autograd.grad((out.value * weights.float()).sum(), leaf)
    ref_value, ref_grad = _reference_grads(cost, a, b, eps, n_iter, weights, grad)
    assert rel_err(out.value, ref_value) <= 1e-5
    assert rel_err(grad_cost, ref_grad) <= 1e-5


# A cost view whose row (or column) k starts at element k·2³⁰ of a 4 GiB bf16 buffer: index·stride
# passes 2³¹ from k = 2 on. torch.empty reserves the buffer; only the few elements used are touched.
_PITCH = 2**30


@pytest.fixture(scope="module")
def huge_bf16_buffer():
    return torch.empty(2 * _PITCH + 64, dtype=torch.bfloat16, device=DEVICE)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend does not run here")
@pytest.mark.parametrize("strided", ["rows", "columns"])
@pytest.mark.parametrize("kernels", ["tile", "streamed"])
def test_triton_cost_strides_past_2_pow_31(monkeypatch, huge_bf16_buffer, strided, kernels):
    """Forward, envelope and unrolled gradients through every kernel that reads the cost, with a
    shared 3 × 3 cost whose offsets need 64 bits, against float64 references on the same values."""
    if kernels == "streamed":
        monkeypatch.setattr(triton_sinkhorn, "MAX_TILE", 0)
        monkeypatch.setattr(triton_sinkhorn, "STREAM_BLOCK", 4)
    B, n, n_iter, eps = 2, 3, 6, 0.2
    strides = (_PITCH, 1) if strided == "rows" else (1, _PITCH)
    cost = huge_bf16_buffer.as_strided((n, n), strides)
    values = torch.rand(n, n, device=DEVICE)
    cost.copy_(values)
    assert cost.storage_offset() + max(strides) * (n - 1) >= 2**31
    a, b = _masses(B, n, dtype=torch.float32), _masses(B, n, dtype=torch.float32)
    weights = torch.randn(B, dtype=torch.float64, device=DEVICE)
    for grad in ("envelope", "unrolled"):
        leaf = cost.detach().requires_grad_()
        out = fastkd.sinkhorn(leaf, a, b, eps=eps, max_iter=n_iter, tol=None, grad=grad, backend="triton")
        (grad_cost,) = torch.autograd.grad((out.value * weights.float()).sum(), leaf)
        ref_value, ref_grad = _reference_grads(cost, a, b, eps, n_iter, weights, grad)
        assert rel_err(out.value, ref_value) <= 1e-5, grad
        assert rel_err(grad_cost, ref_grad) <= TOLERANCE[torch.bfloat16], grad  # returned in the cost's bf16


# --- shapes and errors -------------------------------------------------------------------------

def test_shapes_of_shared_batched_and_single_problems():
    cost = torch.rand(5, 4, dtype=torch.float64)
    single = fastkd.sinkhorn(cost)
    assert single.value.shape == () and single.f.shape == (5,) and single.g.shape == (4,)
    batch_b = _masses(3, 4)
    shared = fastkd.sinkhorn(cost, None, batch_b, return_plan=True, max_iter=300)
    assert shared.value.shape == (3,) and shared.f.shape == (3, 5) and shared.plan.shape == (3, 5, 4)
    assert torch.allclose(shared.plan.sum(-1), torch.full((3, 5), 0.2, dtype=torch.float64))
    batched = fastkd.sinkhorn(torch.rand(3, 5, 4, dtype=torch.float64), max_iter=300)
    assert batched.n_iter.dtype == torch.int32 and batched.value.shape == (3,)


@pytest.mark.parametrize("call, match", [
    (lambda c, a, b: fastkd.sinkhorn(c.neg(), a, b, validate=True), "cost has negative"),
    (lambda c, a, b: fastkd.sinkhorn(c.clone().fill_(float("inf")), a, b, validate=True), "cost has non-finite"),
    (lambda c, a, b: fastkd.sinkhorn(c, a[:, :3], b), r"a must have shape \(4,\)"),
    (lambda c, a, b: fastkd.sinkhorn(c, a, b[:1]), "batch sizes differ"),
    (lambda c, a, b: fastkd.sinkhorn(c, -a, b, validate=True), "a has negative"),
    (lambda c, a, b: fastkd.sinkhorn(c, a, b * float("nan"), validate=True), "b has non-finite"),
    (lambda c, a, b: fastkd.sinkhorn(c, a * 0, b, validate=True), "a sums to 0"),
    (lambda c, a, b: fastkd.sinkhorn(c, a, 2 * b, validate=True), "same total mass"),
    (lambda c, a, b: fastkd.sinkhorn(c, a, b, eps=0.0), "eps must be"),
    (lambda c, a, b: fastkd.sinkhorn(c, a, b, eps=-1), "eps must be"),
    (lambda c, a, b: fastkd.sinkhorn(c, a, b, grad="implicit"), "grad must be one of"),
    (lambda c, a, b: fastkd.sinkhorn(c, a, b, max_iter=0), "max_iter must be at least 1"),
    (lambda c, a, b: fastkd.sinkhorn(c, a, b, tol=-1.0), "tol must be"),
    (lambda c, a, b: fastkd.sinkhorn(c[0, 0], a, b), r"cost must be \(n, m\)"),
])
def test_errors_name_the_argument(call, match):
    cost, a, b = _problem(2, 4, 3, False)
    with pytest.raises((ValueError, TypeError), match=match):
        call(cost, a, b)


def test_unconverged_envelope_warns_only_when_validating():
    cost, a, b = _problem(2, 6, 6, False)
    with pytest.warns(RuntimeWarning, match="reached max_iter=3"):
        fastkd.sinkhorn(cost, a, b, eps=0.01, max_iter=3, tol=1e-9, validate=True)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fastkd.sinkhorn(cost, a, b, eps=0.01, max_iter=3, tol=1e-9)  # the default reads nothing back
        assert (out.err > 1e-9).all()  # the error is there for whoever wants to look
        fastkd.sinkhorn(cost, a, b, eps=0.01, max_iter=3, tol=1e-9, grad="unrolled", validate=True)
        fastkd.sinkhorn(cost, a, b, eps=0.01, max_iter=3, tol=None, validate=True)
