"""The ``gemm`` backend of the sinkhorn families: Sinkhorn for one (n, m) cost shared by all B
problems, each half-iteration of the whole batch one matrix multiply on a shared kernel matrix K
(BLAS on a CPU, cuBLAS on a GPU) instead of n·m exponentials per problem.

Same iteration, stopping rule, outputs and internal potentials as sinkhorn/torch.py (read its
docstring first), rewritten around K. With row and column shifts that depend on C alone,
r_i = min_j C_ij and c_j = min_i (C_ij − r_i):

    C'_ij = C_ij − r_i − c_j ∈ [0, Δ] (a zero in every row and column),  K_ij = exp(−C'_ij/ε)
    column step  L_j = log (Ũ K)_j + α − c_j/ε,  Ũ_i = exp(u_i − r_i/ε − α),  α = max_i (u_i − r_i/ε)
    row step     R_i = log (Ṽ Kᵀ)_i + β − r_i/ε,  Ṽ_j = exp(v_j − c_j/ε − β),  β = max_j (v_j − c_j/ε)

(u = log a + f̃/ε, v = log b + g̃/ε as there): Ũ and Ṽ are the scalings of u = a / (K v),
v = b / (Kᵀ u), each problem's scaled to a largest entry of 1 by its own scalar α (β) carried in
log form. Between the GEMMs the vectors stay in log form: O(B·(n + m)) logarithms and exponentials
per half-iteration against the GEMM's B·n·m multiply-adds. A zero mass is an exact 0 of Ũ or Ṽ
(an absent row or column).

The exact domain. K is used lifted, k = K·exp(Δ/ε) with entries in [1, exp(Δ/ε)], and every
GEMM operand is scaled to a largest entry 1 with entries below e·tiny flushed to 0 (``tiny`` the
dtype's smallest normal number; see _exp): x86 CPUs take a slow path for every subnormal product
or exponential (measured here: a (32, 1000) × (1000, 1000) fp32 GEMM 35× slower, exp 30–100×;
PyTorch's set_flush_denormal reaches only the calling thread, not the BLAS workers), and now no
product is subnormal. Each sum is then ≥ 1 (the operand's 1 meets an entry ≥ 1) and loses less
than max(n, m)·e·tiny·exp(Δ/ε) to the flushes, below the dtype's rounding unit ``u`` while

    Δ/ε ≤ log(1/tiny) − 1 − log(1/u) − log max(n, m)        (``domain_limit``)

fp32: 69.7 − log max(n, m), 62.8 at n = m = 1000 (WKD's ε = 0.05 on a cost in [0, 2] needs ≤ 40);
float64: 670.7 − log max(n, m). Outside it a sum may lose its terms and the results are wrong:
the registry's ``condition`` keeps such calls on the log-domain kernels, and the forward itself
returns NaN (value, value_linear, f, g, err, plan) for a call outside the domain that reaches it
(backend="gemm" under torch.compile, where the condition cannot read the cost).

Gradients. Envelope: ∂/∂C = Σ_k w_k·P_k = K ∘ (Xᵀ Y) with P_k = diag(X_k/w_k) K diag(Y_k), one
GEMM over the batch. Unrolled: the reverse pass of sinkhorn/torch.py, whose row and column steps
have the kernels π_t = diag(Z) K diag(Y) and σ_t = diag(U) K diag(W); each step is two GEMMs of the
batch against K, and ∂/∂C = K ∘ Σ_t (…)ᵀ(…) is one GEMM over the stacked factors of all steps.

``gemm_precision`` (the GEMMs only; exponentials, logarithms and the vectors stay in the compute
dtype; float64 inputs always run in float64). Relative error of the WKD loss / of its gradient
(norm) against this backend on float64 inputs (itself equal to the torch backend in float64 to
2e-16), at B = 32, C = 1000, ε = 0.05, 10 iterations, the inputs of benchmarks/sinkhorn.py, for
the cost (1 − cos)/4 of the benchmark and for 1 − cos ∈ [0, 2] (CPU, 2026-12-06):

    "fp32" (default)  5e-8 / 3e-6     1e-8 / 5e-6     (the torch backend in fp32: 3e-8, 5e-8 on the loss)
    "tf32"            3e-8 / 6e-4     9e-6 / 9e-4     tensor-core TF32 on CUDA. A CPU has none and runs
                                                      fp32; these numbers round the GEMM operands to
                                                      TF32's 10-bit mantissa, as tensor cores do
                                                      (emulated: GPU measurement pending)
    "bf16"            6e-5 / 1.9e-2   1.6e-4 / 2.1e-2 bf16 operands, fp32 accumulation (the CPU's
                                                      bf16 GEMM)
"""

import contextlib
import math
import weakref
from typing import NamedTuple

import torch

from ..layout import compute_dtype
from ..registry import Verdict
from .contract import SinkhornOutputs, log_marginal, marginal_grad

PRECISIONS = ("fp32", "tf32", "bf16")
# backend="auto" takes this backend from B·n·m this large (CPU crossover, docs/perf-notes.md).
MIN_ELEMENTS = 1 << 15
# Rows × (n + m) of the stacked unrolled cost-gradient factors held before they are multiplied out.
FACTOR_ELEMENTS = 1 << 22


def domain_limit(dtype, n, m):
    """The largest Δ/ε at which this backend is exact in ``dtype`` (module docstring)."""
    info = torch.finfo(dtype)
    return -_log_floor(dtype) - math.log(2 / info.eps) - math.log(max(n, m))


def _log_floor(dtype):
    """log(e·tiny): exponentials below it are flushed to 0. exp(log tiny) itself rounds to a
    subnormal and takes exp's slow path (100× here); one e above it none does."""
    return math.log(torch.finfo(dtype).tiny) + 1.0


def _shifted(cost, dtype):
    """(r (n,), c (m,), C' (n, m), Δ 0-dim) of the cost in ``dtype`` (module docstring)."""
    cost = cost.to(dtype)
    r = cost.amin(1)
    shifted = cost - r[:, None]
    c = shifted.amin(0)
    shifted -= c
    return r, c, shifted, shifted.amax()


# id(cost) → (weak reference to it, its version, Δ): one host read per cost tensor and version.
_SPREADS = {}


def cost_spread(cost):
    """Δ of a shared cost as a Python float. Reading it synchronises with the device, so it is
    cached per tensor object and version (an in-place change of the cost reads it again)."""
    key = id(cost)
    cached = _SPREADS.get(key)
    if cached is not None and cached[0]() is cost and cached[1] == cost._version:
        return cached[2]
    with torch.no_grad():
        spread = float(_shifted(cost.detach(), compute_dtype(cost))[3])
    _SPREADS[key] = (weakref.ref(cost, lambda _, key=key: _SPREADS.pop(key, None)), cost._version, spread)
    return spread


def condition(call, auto):
    """The registry condition of this backend's rows: a Verdict for one SinkhornCall.

    Serves a shared (n, m) cost whose Δ/ε is within ``domain_limit``; ``auto`` takes it from
    B·n·m ≥ MIN_ELEMENTS. Δ is ``call.cost_spread`` when the caller knows a bound, else read from
    the cost (``cost_spread``: cached); for ``auto`` small calls are answered before any read.
    While torch.compile traces, the cost cannot be read: auto passes, an explicit request runs
    (NaN results if outside the domain).
    """
    cost = call.cost
    if cost.dim() != 2:
        return Verdict(False, False, "the cost is batched (B, n, m); the gemm backend needs one (n, m) cost shared "
                       "by every problem")
    n, m = cost.shape
    size = call.n_problems * n * m
    if auto and size < MIN_ELEMENTS:
        return Verdict(True, False, f"B·n·m = {size} < {MIN_ELEMENTS}: the log-domain kernels are faster")
    spread = call.cost_spread
    if spread is None:
        if torch.compiler.is_compiling():
            return Verdict(True, False, "the cost's spread cannot be read while torch.compile traces; results are "
                           "NaN if it is outside the exact domain")
        spread = cost_spread(cost)
    limit = domain_limit(call.dtype, n, m)
    if not spread / call.eps <= limit:
        return Verdict(False, False, f"the cost's spread over eps (Δ/ε = {spread / call.eps:.4g}, Δ the spread after "
                       f"row and column shifts) exceeds {limit:.4g}, the most {call.dtype} exponentials hold exactly "
                       f"at n={n}, m={m}; raise eps or use a log-domain backend")
    return Verdict(True, size >= MIN_ELEMENTS, "a shared cost inside the exact domain")


@contextlib.contextmanager
def _tf32(enabled):
    """fp32 GEMMs on CUDA tensor cores in TF32 for the block (CPUs have no TF32: no effect there)."""
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


class _Shared(NamedTuple):
    """The shared kernel of one call, lifted: k = K·exp(lift) has entries in [1, exp(lift)]."""

    r: torch.Tensor  # (n,) r_i/ε
    c: torch.Tensor  # (m,) c_j/ε
    k: torch.Tensor  # (n, m) K·exp(lift) in the GEMM dtype
    kc: torch.Tensor  # (n, m) k ∘ C in the GEMM dtype (for ⟨P, C⟩)
    lift: torch.Tensor  # 0-dim min(Δ/ε, domain_limit)
    unlift: torch.Tensor  # 0-dim exp(−lift)
    inside: torch.Tensor  # 0-dim bool: Δ/ε ≤ domain_limit


def _compute_shared(cost, eps, dtype, gemm_dtype):
    r, c, shifted, spread = _shifted(cost, dtype)
    limit = domain_limit(dtype, *cost.shape)
    lift = (spread / eps).clamp_max(limit)
    kernel = torch.add(lift, shifted, alpha=-1.0 / eps).exp_()
    kc = (kernel * cost.to(dtype)).to(gemm_dtype)
    return _Shared(r / eps, c / eps, kernel.to(gemm_dtype), kc, lift, torch.exp(-lift), spread / eps <= limit)


# On a CPU, the shared kernel of the last call, with a copy of its cost: reused while the next
# call's cost is equal value for value (one comparison pass instead of _compute_shared's six and
# its n·m exponentials, ~10% of a WKD step at C = 1000; WKD's class cost is the same every step).
# Compared, not trusted to a version counter, which in-place changes through ``.data`` do not
# bump. Costs above CACHE_ELEMENTS are not kept (the entry holds three n·m matrices). A GPU
# computes the kernel in microseconds and would synchronise to compare: nothing is kept there.
CACHE_ELEMENTS = 1 << 22
_LAST_SHARED = {}


def _shared(cost, eps, dtype, gemm_dtype):
    if cost.device.type != "cpu" or cost.numel() > CACHE_ELEMENTS:
        return _compute_shared(cost, eps, dtype, gemm_dtype)
    key = (float(eps), dtype, gemm_dtype, cost.dtype, tuple(cost.shape))
    last = _LAST_SHARED.get("cpu")
    if last is not None and last[0] == key and torch.equal(last[1], cost):
        return last[2]
    shared = _compute_shared(cost, eps, dtype, gemm_dtype)
    _LAST_SHARED["cpu"] = (key, cost.detach().clone(), shared)
    return shared


def _exp(x):
    """exp(x), flushed to 0 below e·tiny (never through exp's slow path or a subnormal)."""
    low = _log_floor(x.dtype)
    flushed = x < low
    return x.clamp_min(low).exp_().masked_fill_(flushed, 0.0)


def _mm(x, y):
    """x @ y with x cast to y's (GEMM) dtype, the result in x's."""
    return (x.to(y.dtype) @ y).to(x.dtype)


def _product(x, k):
    """x @ k for a signed operand x (B, ·): each problem's x scaled to a largest magnitude 1 and
    flushed below e·tiny for the GEMM, the scale folded back after it."""
    magnitude = x.abs()
    top = magnitude.amax(1, keepdim=True).clamp_min_(torch.finfo(x.dtype).tiny)
    scaled = (x / top).masked_fill_(magnitude < top * math.exp(_log_floor(x.dtype)), 0.0)
    return _mm(scaled, k).mul_(top)


def _outer(x, y, gemm_dtype):
    """xᵀ y over the batch: (k, n), (k, m) → (n, m). Each factor is scaled by its largest
    magnitude and entries below √(e·tiny) of it are flushed (no subnormal product; they would add
    less than e·tiny of the largest term)."""
    floor = math.exp(_log_floor(x.dtype) / 2)
    factors, scale = [], 1.0
    for z in (x, y):
        magnitude = z.abs()
        top = magnitude.amax().clamp_min_(torch.finfo(z.dtype).tiny)
        factors.append((z / top).masked_fill_(magnitude < top * floor, 0.0).to(gemm_dtype))
        scale = scale * top
    return (factors[0].T @ factors[1]).to(x.dtype).mul_(scale)


def _lse(x, k, shift, shared):
    """log Σ_i exp(x_i) K_ij − shift_j over the shared kernel, for x (B, ·) in log form (the
    operand exp(x − max x) ≤ 1, flushed below e·tiny)."""
    top = x.amax(1, keepdim=True)
    return _mm(_exp(x - top), k).mul_(shared.unlift).log_().add_(top).sub_(shift)


def _column_lse(x, shared):
    """L_j = lse_i(u_i − C_ij/ε) from x = u − r/ε: (B, n) → (B, m)."""
    return _lse(x, shared.k, shared.c, shared)


def _row_lse(y, shared):
    """R_i = lse_j(v_j − C_ij/ε) from y = v − c/ε: (B, m) → (B, n)."""
    return _lse(y, shared.k.T, shared.r, shared)


def _plan_factors(x, y, shared):
    """(p (B, n), s (B, m)) with P_ij = exp(u_i + v_j − C_ij/ε) = p_i k_ij s_j, from x = u − r/ε and
    y = v − c/ε; s ≤ 1, an operand."""
    top = y.amax(1, keepdim=True)
    return _exp(x + (top - shared.lift)), _exp(y - top)


def _inputs(cost, a, b):
    """(compute dtype, a, b in it), for a shared (n, m) cost only."""
    if cost.dim() != 2:
        raise ValueError(f"the gemm backend solves one (n, m) cost shared by every problem; got a cost of shape "
                         f"{tuple(cost.shape)} (per-problem costs run on the log-domain backends)")
    dtype = compute_dtype(cost, a, b)
    return dtype, a.to(dtype), b.to(dtype)


def _gemm_dtype(dtype, gemm_precision):
    if gemm_precision not in PRECISIONS:
        raise ValueError(f"gemm_precision must be one of {', '.join(map(repr, PRECISIONS))}; got {gemm_precision!r}")
    return torch.bfloat16 if gemm_precision == "bf16" and dtype == torch.float32 else dtype


def sinkhorn_forward(cost, a, b, eps, max_iter, tol, save_history, return_plan, *, gemm_precision="fp32"):
    """cost: (n, m) shared, fp32|fp16|bf16|fp64; a: (B, n), b: (B, m) (stride-0 views allowed).
    tol < 0 runs exactly max_iter iterations. Returns SinkhornOutputs (contract.py) in the
    compute dtype, as sinkhorn/torch.py (NaN outside the exact domain)."""
    dtype, a, b = _inputs(cost, a, b)
    device = cost.device
    n_problems, n = a.shape
    m = b.shape[1]
    f_hist = torch.zeros((n_problems, max_iter, n) if save_history else (0,), dtype=dtype, device=device)
    g_hist = torch.zeros((n_problems, max_iter, m) if save_history else (0,), dtype=dtype, device=device)
    shared = _shared(cost, eps, dtype, _gemm_dtype(dtype, gemm_precision))
    la, lb = log_marginal(a), log_marginal(b)
    # The log scalings shifted by the cost's: x = u − r/ε, y = v − c/ε; −inf at zero masses (la,
    # lb are −inf there and R, L finite inside the domain).
    la_r, lb_c = la - shared.r, lb - shared.c
    # tol < 0: every problem runs exactly max_iter iterations; no masks, one error at the end.
    fixed = tol < 0
    with _tf32(gemm_precision == "tf32" and device.type == "cuda"):
        L = _column_lse(torch.where(a > 0, 0.0, float("-inf")).to(dtype) - shared.r, shared)
        y = lb_c - L
        R = torch.zeros(n_problems, n, dtype=dtype, device=device)
        running = torch.ones(n_problems, dtype=torch.bool, device=device)
        iters = torch.full((n_problems,), max_iter if fixed else 0, dtype=torch.int32, device=device)
        err = torch.full((n_problems,), float("inf"), dtype=dtype, device=device)
        if save_history:
            g_hist[:, 0] = -eps * L
        for t in range(max_iter):
            last = t + 1 == max_iter
            R = _row_lse(y, shared) if fixed else torch.where(running[:, None], _row_lse(y, shared), R)
            x = la_r - R
            if not fixed:
                iters += running.to(torch.int32)
            if save_history:
                f_hist[:, t] = -eps * R
            L_new = _column_lse(x, shared)
            if fixed and not last:
                L = L_new
            else:
                col_sums = _exp(lb + L_new - L)  # 0 where b = 0
                err = torch.where(running, (col_sums - b).abs().sum(1), err)
                # NaN errors keep running (the comparison is false), like POT.
                running = running & ~(err <= tol) & (not last)
                L = torch.where(running[:, None], L_new, L)
            y = lb_c - L
            if save_history and not last:
                g_hist[:, t + 1] = -eps * L
            # Free on the CPU; a host synchronisation on a GPU, where converged problems stay frozen.
            if not fixed and device.type == "cpu" and not bool(running.any()):
                break
        f, g = -eps * R, -eps * L
        p, s = _plan_factors(x, y, shared)
        value_linear = (p * _mm(s, shared.kc.T)).sum(1)
    # Σ P (f̃ + g̃) = Σ_i a_i f̃_i + Σ_j colsum_j g̃_j: the row step makes the row sums a.
    value = (a * f).sum(1) + (col_sums * g).sum(1)
    plan = torch.empty(0, dtype=dtype, device=device)
    if return_plan:
        plan = p[:, :, None] * shared.k.to(dtype) * s[:, None, :]
    nan = torch.tensor(float("nan"), dtype=dtype, device=device)
    value, value_linear, f, g, err, plan = (torch.where(shared.inside, out, nan)
                                            for out in (value, value_linear, f, g, err, plan))
    return SinkhornOutputs(value, value_linear, f, g, iters, err, plan, f_hist, g_hist)


def sinkhorn_backward(grad_value, grad_value_linear, cost, a, b, f, g, n_iter, f_hist, g_hist, eps, mode,
                      needs_cost, needs_a, needs_b, *, gemm_precision="fp32"):
    """Gradients of Σ grad_value·value + grad_value_linear·value_linear, as sinkhorn/torch.py's
    sinkhorn_backward (same modes and results), for a shared (n, m) cost; GEMMs where that one
    forms (B, n, m) tensors."""
    dtype, a, b = _inputs(cost, a, b)
    device = cost.device
    n_problems = a.shape[0]
    empty = torch.empty(0, dtype=dtype, device=device)
    w_v, w_l = grad_value.to(dtype)[:, None], grad_value_linear.to(dtype)[:, None]
    gemm_dtype = _gemm_dtype(dtype, gemm_precision)
    if mode == "envelope":
        grad_a = w_v * (f - f.mean(1, keepdim=True)) if needs_a else empty
        grad_b = w_v * (g - g.mean(1, keepdim=True)) if needs_b else empty
        if not needs_cost:
            return empty, grad_a, grad_b
    shared = _shared(cost, eps, dtype, gemm_dtype)
    # As in the forward: log scalings shifted by the cost's, −inf at zero masses.
    la_r, lb_c = log_marginal(a) - shared.r, log_marginal(b) - shared.c
    with _tf32(gemm_precision == "tf32" and device.type == "cuda"):
        p, s = _plan_factors(la_r + f / eps, lb_c + g / eps, shared)
        if mode == "envelope":
            return shared.k.to(dtype) * _outer(w_v * p, s, gemm_dtype), grad_a, grad_b
        if n_problems == 0:
            return (torch.zeros(cost.shape, dtype=dtype, device=device) if needs_cost else empty,
                    torch.zeros_like(a) if needs_a else empty, torch.zeros_like(b) if needs_b else empty)
        grad_cost, la_bar, lb_bar = _unrolled(w_v, w_l, cost.to(dtype), shared, eps, a, la_r, lb_c, f, g, p, s,
                                              n_iter, f_hist, g_hist, needs_cost, needs_b, gemm_dtype)
    return (grad_cost if needs_cost else empty, marginal_grad(la_bar, a) if needs_a else empty,
            marginal_grad(lb_bar, b) if needs_b else empty)


class _OuterSum:
    """Σ xᵀ y over pairs (x (k, n), y (k, m)), stacked and multiplied out in one GEMM per
    FACTOR_ELEMENTS of factors."""

    def __init__(self, n, m, dtype, device, gemm_dtype):
        self.total = torch.zeros(n, m, dtype=dtype, device=device)
        self.gemm_dtype = gemm_dtype
        self.xs, self.ys, self.held = [], [], 0

    def add(self, x, y):
        self.xs.append(x)
        self.ys.append(y)
        self.held += x.numel() + y.numel()
        if self.held >= FACTOR_ELEMENTS:
            self.flush()

    def flush(self):
        if self.xs:
            self.total += _outer(torch.cat(self.xs), torch.cat(self.ys), self.gemm_dtype)
            self.xs, self.ys, self.held = [], [], 0
        return self.total


def _masked(mask, x):
    """x where ``mask`` (None: everywhere), else 0."""
    return x if mask is None else torch.where(mask, x, 0.0)


def _unrolled(w_v, w_l, cost, shared, eps, a, la_r, lb_c, f, g, p, s, n_iter, f_hist, g_hist, needs_cost, needs_b,
              gemm_dtype):
    """The reverse pass of sinkhorn/torch.py's _unrolled_chunk for all problems at once, with
    P = diag(p) k diag(s). Returns (∂/∂C (n, m) or None, ∂/∂log a, ∂/∂log b)."""
    k, kc = shared.k, shared.kc
    on_cpu = cost.device.type == "cpu"
    # On the CPU reading is free: a weight that is 0 for every problem (value_linear alone, as in
    # WKD) skips its terms, four of the six GEMM-equivalents below for w_v.
    with_value, with_linear = not on_cpu or bool(w_v.any()), not on_cpu or bool(w_l.any())
    # Row and column sums of P∘C (w_l), of P and P∘(f̃ + g̃) (w_v).
    q_rows, q_cols = torch.zeros_like(p), torch.zeros_like(s)
    if with_linear:
        q_rows = q_rows + w_l * p * _product(s, kc.T)
        q_cols = q_cols + w_l * s * _product(p, kc)
    if with_value:
        k_s, k_sg = _product(torch.cat([s, s * g]), k.T).chunk(2)
        k_p, k_pf = _product(torch.cat([p, p * f]), k).chunk(2)
        row_p, col_p = p * k_s, s * k_p
        q_rows = q_rows + w_v * (f * row_p + p * k_sg)
        q_cols = q_cols + w_v * (g * col_p + s * k_pf)
    q_rows, q_cols = q_rows / eps, q_cols / eps
    f_bar_out = q_rows + w_v * row_p if with_value else q_rows
    g_bar_out = q_cols + w_v * col_p if with_value else q_cols
    la_bar, lb_bar = eps * q_rows, eps * q_cols
    # ∂/∂C = K ∘ [(1 − C/ε) ∘ Σ_k w_l p ⊗ s − Σ_k w_v (p f̃ ⊗ s + p ⊗ s g̃)/ε + Σ_t (X_t + Y_t)].
    outer = _OuterSum(*cost.shape, cost.dtype, cost.device, gemm_dtype) if needs_cost else None
    if needs_cost and with_value:
        outer.add(torch.cat([-w_v * p * f / eps, -w_v * p / eps]), torch.cat([s, s * g]))
    x0 = torch.where(a > 0, 0.0, float("-inf")).to(f.dtype) - shared.r  # the fixed start u = 0, shifted
    # On the CPU the iteration counts are free to read too: past the largest nothing is left to undo,
    # and where every problem ran as many (tol=None) no step needs a mask.
    last_step = int(n_iter.max()) if on_cpu else f_hist.shape[1]
    uniform = on_cpu and int(n_iter.min()) == last_step
    # The saved potentials over ε, shifted by the cost's: f̃_t/ε − r/ε and g̃_t/ε − c/ε.
    f_hist = f_hist[:, :last_step] / eps - shared.r
    g_hist = g_hist[:, :last_step] / eps - shared.c
    la, lb = la_r + shared.r, lb_c + shared.c
    f_bar = torch.zeros_like(f)
    for t in reversed(range(last_step)):
        if uniform:
            active, final = None, t == last_step - 1
            f_bar = f_bar_out if final else f_bar
            g_bar = g_bar_out if final else 0.0
        else:
            active, final = (t < n_iter)[:, None], (n_iter - 1 == t)[:, None]
            f_bar = torch.where(final, f_bar_out, f_bar)
            g_bar = torch.where(final, g_bar_out, 0.0)
        # Row step t: π = diag(z) K diag(y) = diag(z·exp(−lift)) k diag(y), rows summing to 1
        # (z = 1/(K y) from the saved f̃_t).
        y_t = lb + g_hist[:, t]
        top = y_t.amax(1, keepdim=True)
        y = _exp(y_t - top)
        f_bar_z = f_bar * torch.exp(f_hist[:, t] + (top - shared.lift))
        x_cols = y * _product(f_bar_z, k)
        g_bar = g_bar - x_cols
        if needs_b:
            lb_bar = lb_bar - _masked(active, eps * x_cols)
        # Column step t: σ = diag(x) K diag(w), columns summing to 1; at t = 0 u is the fixed start.
        x_t = x0 if t == 0 else la + f_hist[:, t - 1]
        top = x_t.amax(1, keepdim=True)
        x = _exp(x_t - top)
        g_bar_w = g_bar * torch.exp(g_hist[:, t] + (top - shared.lift))
        y_rows = x * _product(g_bar_w, k.T)
        if t > 0:
            la_bar = la_bar - _masked(active, eps * y_rows)
        f_bar = -y_rows if active is None else torch.where(active, -y_rows, f_bar)
        if needs_cost:
            outer.add(torch.cat([_masked(active, f_bar_z), _masked(active, x)]), torch.cat([y, g_bar_w]))
    if not needs_cost:
        return None, la_bar, lb_bar
    total = outer.flush()
    if with_linear:
        total = total + (1 - cost / eps) * _outer(w_l * p, s, gemm_dtype)
    return k.to(cost.dtype) * total, la_bar, lb_bar
