"""Optimal-transport functions: a batched log-domain Sinkhorn solver and the distillation losses
built on it (Wasserstein KD over classes, batch-wise Sinkhorn KD, Universal Logit Distillation).
Argument checks, then one custom-op call each (fastkd/ops/sinkhorn.py)."""

import math
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ot_validation as checks
from . import validation
from .kernels import registry
from .kernels.layout import compute_dtype
from .kernels.sinkhorn.contract import SinkhornCall
from .ops import sinkhorn as sinkhorn_op
from .options import SinkhornOptions
from .reduction import reduce_rows

# The entropic regularisation every OT function defaults to, in the cost's units (the distillation
# costs here lie in [0, 2]).
DEFAULT_EPS = 0.05


class SinkhornResult(NamedTuple):
    """What :func:`sinkhorn` returns (see its docstring)."""

    value: Tensor
    value_linear: Tensor
    f: Tensor
    g: Tensor
    n_iter: Tensor
    err: Tensor
    plan: Optional[Tensor]


def sinkhorn(cost: Tensor, a: Optional[Tensor] = None, b: Optional[Tensor] = None, *, eps: float = DEFAULT_EPS,
             max_iter: int = 100, tol: Optional[float] = 1e-6, grad: str = "envelope", return_plan: bool = False,
             validate: bool = False, backend: str = "auto", gemm_precision: str = "fp32") -> SinkhornResult:
    """Entropic optimal transport between ``a`` and ``b`` for many problems at once (log-domain
    Sinkhorn, POT's ``sinkhorn_log`` iteration).

    Iterations start from f = 0; each updates g (column marginals exact) then f (row marginals
    exact); the plan is ``P = exp((f_i + g_j − C_ij)/ε)`` with the marginals absorbed in f, g
    (POT's ``log_u = f/ε``, ``log_v = g/ε``). A problem stops once the L1 error of its column
    marginal, Σ_j |Σ_i P_ij − b_j|, is ≤ ``tol``; converged problems stop updating while the others
    go on (checked on the device, no host synchronisation).

    Args:
        cost: (n, m) shared by the batch (read once, never copied per problem) or (B, n, m);
            fp32|fp16|bf16, float64 on the torch backend. Finite and ≥ 0.
        a: row masses, (B, n) or (n,) (shared by the batch); uniform 1/n when None.
        b: column masses, (B, m) or (m,); uniform 1/m when None. Each problem needs
            Σa = Σb > 0. Zero-mass entries are absent rows/columns (they are left out of the first
            iteration too, so padding expresses ragged problems exactly): P is 0 there and
            f = −inf (g = −inf), as in POT.
        eps: ε > 0, the entropic regularisation, in the cost's units.
        max_iter: iterations at most (each = one g and one f update).
        tol: L1 marginal error at which a problem stops; None runs exactly ``max_iter``.
        grad: which gradient ``value`` and ``value_linear`` carry:
            "envelope" (default): gradients of ``value`` by the envelope theorem, exact at
                convergence: ∂value/∂C = P; ∂value/∂a = f − ε·log a and ∂value/∂b = g − ε·log b
                (the potentials in the ``P = a_i·b_j·exp(...)`` convention; at a zero-mass entry
                its c-transform, the one-sided derivative), each centred to mean 0 over its
                entries: the projection on the simplex's tangent space, the only part balanced OT
                defines. This matches finite differences of ``value`` and POT's autodiff (up to
                the constant); POT's own grad="envelope" returns f − mean(f), which lacks the
                −ε·log a term for non-uniform marginals. The plan is not stored. ``value_linear``
                carries no gradient in this mode (use "unrolled").
            "unrolled": exact gradients of ``value`` and ``value_linear`` through the
                iterations actually run (not centred). Stores f and g of every iteration:
                O(B·(n+m)) per iteration, never B·n·m. ∂/∂a is 0 at zero-mass entries.
            "none": no gradient.
        return_plan: also return P, (B, n, m) in float32 (float64).
        validate: also check the values of cost, a and b (finite, ≥ 0, positive and equal masses)
            and, with grad="envelope", warn when problems reach ``max_iter`` with an error above
            ``tol``. Reading tensor values synchronises with the device (and breaks a
            ``torch.compile`` graph): for debugging, off by default. Without it, bad values show
            as NaN or inf results and ``err`` says how far each problem is from its marginals.
        backend: "auto", "torch", "triton", "native" or "gemm" (see ``fastkd.available_backends()``;
            "native" compiles the forward only, in fp32, and shares the torch backend's backward).
            "gemm" (fastkd/kernels/sinkhorn/gemm.py) runs the same iteration as matrix
            multiplies on one shared kernel matrix: only for a shared (n, m) cost whose spread
            over ``eps`` fits the exponent range of the compute dtype (fp32: Δ/ε ≤
            69.7 − log max(n, m), Δ the cost's spread after row and column shifts; a call outside
            raises). "auto" takes it for such a cost from B·n·m ≥ 2^15 and otherwise runs the
            log-domain kernels. Deciding reads the cost's values once per tensor and version (a
            host synchronisation on a GPU, cached); under torch.compile the cost cannot be read,
            so "auto" keeps the log-domain kernels and backend="gemm" returns NaN for a cost
            outside the domain.
        gemm_precision: "fp32" (default), "tf32" or "bf16": the matrix multiplies of the gemm
            backend (tensor cores on a GPU; a CPU runs "tf32" as fp32). Measured errors against
            float64 are in gemm.py's docstring (WKD: bf16 ~1e-4 on the loss, ~2e-2 on its gradient).

    Returns:
        SinkhornResult(value, value_linear, f, g, n_iter, err, plan): ``value`` = ⟨P, C⟩ +
        ε·KL(P ‖ a⊗b) (POT's ``ot.solve(C, a, b, reg=ε).value``), ``value_linear`` = ⟨P, C⟩ (POT's
        ``ot.sinkhorn2``), potentials f (B, n) and g (B, m), ``n_iter`` (B,) int32 iterations run,
        ``err`` (B,) the final L1 error, ``plan`` or None. Float32 (float64 for float64 inputs);
        the leading B is absent when neither the cost nor a marginal is batched.
    """
    checks.check_eps(eps)
    checks.check_iterations("max_iter", max_iter)
    checks.check_tol(tol)
    checks.check_grad_mode(grad)
    checks.check_gemm_precision(gemm_precision)
    validation.check_flag("return_plan", return_plan)
    validation.check_flag("validate", validate)
    result = _solve(cost, a, b, eps=eps, max_iter=max_iter, tol=tol, grad=grad, return_plan=return_plan,
                    validate_cost=validate, validate_marginals=validate, backend=backend,
                    gemm_precision=gemm_precision)
    if validate and grad == "envelope" and tol is not None:
        _warn_unconverged(result, max_iter, tol)
    return result


def _solve(cost, a, b, *, eps, max_iter, tol, grad, return_plan, validate_cost, validate_marginals, backend,
           gemm_precision, cost_spread=None):
    """``cost_spread``: a bound on max(cost) − min(cost) the caller knows, or None (the gemm
    backend's condition then reads the cost)."""
    cost_batch = checks.check_cost(cost)
    n, m = cost.shape[-2:]
    device = cost.device
    a_batch = checks.check_marginal("a", a, n, "rows", device)
    b_batch = checks.check_marginal("b", b, m, "columns", device)
    batch = checks.batch_size(cost_batch, a_batch, b_batch)
    given = tuple(x for x in (cost, a, b) if x is not None)
    dtypes = tuple(x.dtype for x in given)
    dtype = compute_dtype(*given)
    n_problems = 1 if batch is None else batch
    # Validate before the gemm backend's condition reads the cost: bad values get their own error.
    if validate_cost:
        checks.check_cost_values(cost)
    call = SinkhornCall(cost, n_problems, float(eps), dtype, cost_spread)
    backend = registry.select("sinkhorn", backend, device, dtypes, call=call)
    a = _marginal(a, n, n_problems, dtype, device)
    b = _marginal(b, m, n_problems, dtype, device)
    if validate_marginals:
        checks.check_marginal_values("a", a)
        checks.check_marginal_values("b", b)
        checks.check_equal_mass(a, b)

    options = SinkhornOptions(float(eps), max_iter, -1.0 if tol is None else float(tol), grad, return_plan, backend,
                              gemm_precision)
    if grad == "none":
        with torch.no_grad():
            outputs = sinkhorn_op(cost, a, b, options)
    else:
        outputs = sinkhorn_op(cost, a, b, options)
    value, value_linear, f, g, n_iter, err, plan = outputs[:7]
    if grad == "envelope":
        value_linear = value_linear.detach()
    f, g = _pot_potential(f.detach(), a.detach(), eps), _pot_potential(g.detach(), b.detach(), eps)
    n_iter, err = n_iter.detach(), err.detach()
    plan = plan.detach() if return_plan else None
    if batch is None:
        value, value_linear, f, g, n_iter, err = (x[0] for x in (value, value_linear, f, g, n_iter, err))
        plan = None if plan is None else plan[0]
    return SinkhornResult(value, value_linear, f, g, n_iter, err, plan)


def _marginal(x, size, n_problems, dtype, device):
    if x is None:
        return torch.full((n_problems, size), 1.0 / size, dtype=dtype, device=device)
    x = x.to(dtype)
    return x.expand(n_problems, size) if x.dim() == 1 else x


def _pot_potential(internal, mass, eps):
    """The internal finite potential f̃ → POT's f = f̃ + ε·log a (−inf where a = 0)."""
    return torch.where(mass > 0, internal + eps * torch.where(mass > 0, mass, 1.0).log().to(internal.dtype),
                       float("-inf"))


def _warn_unconverged(result, max_iter, tol):
    # Documented host synchronisation (validate=True).
    stuck = (result.n_iter >= max_iter) & (result.err > tol)
    count = int(stuck.sum())
    if count:
        worst = float(result.err.max())
        warnings.warn(f"sinkhorn: {count} problem(s) reached max_iter={max_iter} with a marginal error above "
                      f"tol={tol} (largest {worst:.3g}); the envelope gradient assumes convergence. Raise "
                      "max_iter or eps, or use grad='unrolled'.", RuntimeWarning, stacklevel=3)


def _rows(name, x):
    validation.check_logits(name, x)
    return x.reshape(-1, x.shape[-1])


def wasserstein_kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
                        cost: Tensor, temperature: float = 1.0, eps: float = DEFAULT_EPS, max_iter: int = 10,
                        exclude_target: bool = True, grad: str = "unrolled", validate: bool = False,
                        backend: str = "auto", gemm_precision: str = "fp32") -> Tensor:
    """Wasserstein distance between the student's and teacher's class distributions under a
    class-to-class cost (WKD-L, Lv et al., NeurIPS 2024, "Wasserstein Distance Rivals
    Kullback-Leibler Divergence for Knowledge Distillation").

    Per sample, q = softmax(student / T) is the row marginal and p = softmax(teacher / T) the
    column marginal of ``max_iter`` log-domain Sinkhorn iterations (tol=None) on the shared
    ``cost``; the loss is the batch mean of ⟨P, C⟩ (``value_linear``). With ``labels`` and
    ``exclude_target`` the target class gets zero mass in both, and the other classes are
    renormalised (softmax over the non-target logits): the paper's code does the same by copying
    a (V−1)×(V−1) cost per sample; here the one cost is shared. The paper adds a target-class term
    (and its code uses cost = relu(cost) + 1e-8 and kernel-domain iterations with +1e-8 guards);
    those are left to the caller.

    Args:
        student_logits: (…, V) fp32|fp16|bf16|fp64. Receives the gradient.
        teacher_logits: (…, V), same shape. A constant: no gradient.
        labels: (…) int class indices in [0, V); used only to exclude the target class. A row whose
            label lies outside [0, V) gets a NaN loss (checked on the device, no synchronisation).
        cost: (V, V) float, finite, ≥ 0, e.g. 1 − cosine similarity of the teacher's classifier
            rows; cost[i, j] moves student class i to teacher class j. Receives a gradient if
            it requires one. Keyword-only (``labels`` is third in every fastkd loss).
        temperature: T > 0 of both softmaxes.
        eps, max_iter: Sinkhorn regularisation (cost units) and iteration count.
        grad: "unrolled" (back-propagate through the iterations, as the paper) or "none" (no
            gradient at all: evaluation only).
        validate: also check the cost's values (finite, ≥ 0) and the labels' range with errors (a
            host synchronisation): for debugging, off by default.
        backend: "auto", "torch", "triton", "native" or "gemm" (see :func:`sinkhorn`). The class
            cost is shared by the batch, so "auto" runs the gemm backend (one matrix multiply per
            half-iteration for all samples) when the cost's spread over ``eps`` is inside its
            exact domain (ε = 0.05 on a cost in [0, 2] is) and B·V² ≥ 2^15; finding the spread
            reads the cost once per tensor and version (on a GPU, one host synchronisation the
            first time: pass the same cost tensor each step).
        gemm_precision: "fp32", "tf32" or "bf16", the gemm backend's matrix multiplies
            (see :func:`sinkhorn`).

    Returns:
        Scalar loss, float32 (float64 for float64 inputs).
    """
    student, teacher = _rows("student_logits", student_logits), _rows("teacher_logits", teacher_logits)
    validation.check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    n_classes = student.shape[-1]
    if not isinstance(cost, torch.Tensor) or cost.dim() != 2 or tuple(cost.shape) != (n_classes, n_classes):
        shape = tuple(cost.shape) if isinstance(cost, torch.Tensor) else type(cost).__name__
        raise ValueError(f"cost must be a ({n_classes}, {n_classes}) tensor (classes × classes); got {shape}")
    validation.check_labels(labels, student_logits.shape[:-1], student.device)
    checks.check_temperature(temperature)
    checks.check_eps(eps)
    checks.check_iterations("max_iter", max_iter)
    validation.check_flag("exclude_target", exclude_target)
    validation.check_flag("validate", validate)
    checks.check_loss_grad(grad)
    checks.check_gemm_precision(gemm_precision)
    if validate and labels is not None and labels.numel() and exclude_target and (
            bool(labels.min() < 0) or bool(labels.max() >= n_classes)):
        raise ValueError(f"labels must be class indices in [0, {n_classes}) to exclude the target class "
                         f"(no ignore_index here); got values in [{int(labels.min())}, {int(labels.max())}]")

    dtype = compute_dtype(student, teacher, cost)
    s = student.to(dtype) / temperature
    t = teacher.detach().to(dtype) / temperature
    bad_label = None
    if labels is not None and exclude_target:
        labels = labels.reshape(-1, 1).long()
        bad_label = ((labels < 0) | (labels >= n_classes))[:, 0]
        target = labels.clamp(0, n_classes - 1)  # in bounds; the row turns NaN below
        s = s.scatter(1, target, float("-inf"))
        t = t.scatter(1, target, float("-inf"))
    result = _solve(cost, torch.softmax(s, -1), torch.softmax(t, -1), eps=eps, max_iter=max_iter, tol=None,
                    grad=grad, return_plan=False, validate_cost=validate, validate_marginals=False,
                    backend=backend, gemm_precision=gemm_precision)
    per_sample = result.value_linear
    if bad_label is not None:
        per_sample = torch.where(bad_label, math.nan, per_sample)
    return per_sample.mean()


def sinkhorn_kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
                     temperature: float = 1.0, eps: float = DEFAULT_EPS, max_iter: int = 20, ignore_index: int = -100,
                     grad: str = "unrolled", backend: str = "auto", gemm_precision: str = "fp32") -> Tensor:
    """Batch-wise Sinkhorn distance between student and teacher distributions (SinKD, Cui et al.,
    LREC-COLING 2024, "Sinkhorn Distance Minimization for Knowledge Distillation").

    The samples of the batch are the support points: with q_i = softmax(student_i / T) and
    p_j = softmax(teacher_j / T), the cost between student sample i and teacher sample j is the
    L1 distance C_ij = Σ_v |q_i,v − p_j,v| (the paper's code uses ``torch.cdist(p=1)``), both
    sides carry uniform mass over the non-ignored rows, and the loss is ⟨P, C⟩ after ``max_iter``
    log-domain Sinkhorn iterations (POT's order: column then row update). The gradient flows
    through the cost into the student and, with grad="unrolled", through the iterations.
    Difference from the paper's code: its plan is doubly stochastic (total mass N, not 1) and it
    normalises rows before columns in the kernel domain, so at convergence its value is N × this
    one (its extra 0.001 factor and loss weight are left to the caller).

    Args:
        student_logits: (…, V); receives the gradient. teacher_logits: (…, V), a constant.
        temperature: T > 0 of both softmaxes.
        eps, max_iter: Sinkhorn regularisation (the cost is in [0, 2]) and iteration count.
        labels: (…) int; rows equal to ``ignore_index`` get zero mass. No rows left: loss 0.
        grad: "unrolled" or "none" (no gradient at all: evaluation only).
        backend: "auto", "torch", "triton", "native" or "gemm" (see :func:`sinkhorn`). The L1 cost
            lies in [0, 2] by construction, so the gemm backend's domain is decided without
            reading it (no host synchronisation): "auto" runs it when 2/ε is inside the domain
            and N² ≥ 2^15 (N ≥ 182 rows).
        gemm_precision: "fp32", "tf32" or "bf16" (see :func:`sinkhorn`).

    Returns:
        Scalar loss, float32 (float64 for float64 inputs). Memory: the (N, N) cost and plan.
    """
    student, teacher = _rows("student_logits", student_logits), _rows("teacher_logits", teacher_logits)
    validation.check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    validation.check_labels(labels, student_logits.shape[:-1], student.device)
    validation.check_ignore_index(ignore_index)
    checks.check_temperature(temperature)
    checks.check_eps(eps)
    checks.check_iterations("max_iter", max_iter)
    checks.check_loss_grad(grad)
    checks.check_gemm_precision(gemm_precision)
    if student.shape[0] == 0:
        return student.sum() * 0.0

    dtype = compute_dtype(student, teacher)
    q = torch.softmax(student.to(dtype) / temperature, -1)
    p = torch.softmax(teacher.detach().to(dtype) / temperature, -1)
    cost = torch.cdist(q[None], p[None], p=1)[0]
    if labels is None:
        mass = torch.full((student.shape[0],), 1.0 / student.shape[0], dtype=dtype, device=student.device)
        any_row = None
    else:
        keep = (labels.reshape(-1) != ignore_index).to(dtype)
        any_row = keep.sum() > 0
        # With no row left, solve a uniform dummy problem and multiply by 0: finite gradients.
        keep = torch.where(any_row, keep, 1.0)
        mass = keep / keep.sum()
    # L1 distances between probability vectors lie in [0, 2].
    result = _solve(cost, mass, mass, eps=eps, max_iter=max_iter, tol=None, grad=grad, return_plan=False,
                    validate_cost=False, validate_marginals=False, backend=backend, gemm_precision=gemm_precision,
                    cost_spread=2.0)
    loss = result.value_linear
    return loss if any_row is None else loss * any_row.to(loss.dtype)


def uld_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
             temperature: float = 1.0, top_k: Optional[int] = None, ignore_index: int = -100,
             reduction: str = "mean") -> Tensor:
    """Universal Logit Distillation (Boizard et al., 2024, "Towards Cross-Tokenizer Distillation:
    the Universal Logit Distillation Loss for LLMs"): per token, the L1 distance between the
    student's and teacher's probability vectors sorted in descending order, the shorter one
    zero-padded to the longer vocabulary. This is the closed-form Wasserstein-1 distance when
    every pair of tokens is at the same distance, so the vocabularies need not match.

    Args:
        student_logits: (…, Vs); receives the gradient. teacher_logits: (…, Vt), the same leading
            shape, any vocabulary size; a constant.
        temperature: T > 0 of both softmaxes.
        top_k: sort only the k largest probabilities of each side (the rest count as 0).
        labels, ignore_index: rows whose label equals ``ignore_index`` contribute nothing.
        reduction: "mean" over non-ignored rows (none left: 0), "sum" or "none" (shape (…)).

    Plain PyTorch (softmax, sort/top-k, L1): autograd differentiates it; the sorted copies of
    both distributions are materialised.
    """
    validation.check_logits("student_logits", student_logits)
    validation.check_logits("teacher_logits", teacher_logits)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"teacher_logits leading shape {tuple(teacher_logits.shape[:-1])} does not match "
                         f"student_logits leading shape {tuple(student_logits.shape[:-1])}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student_logits is on {student_logits.device} but teacher_logits is on "
                         f"{teacher_logits.device}")
    leading = student_logits.shape[:-1]
    validation.check_labels(labels, leading, student_logits.device)
    validation.check_ignore_index(ignore_index)
    validation.check_reduction(reduction, None, student_logits.device)
    checks.check_temperature(temperature)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int ≥ 1; got {top_k!r}")

    dtype = compute_dtype(student_logits, teacher_logits)
    q = torch.softmax(student_logits.reshape(-1, student_logits.shape[-1]).to(dtype) / temperature, -1)
    p = torch.softmax(teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]).to(dtype) / temperature, -1)
    q_sorted, p_sorted = _sorted_top(q, top_k), _sorted_top(p, top_k)
    width = max(q_sorted.shape[-1], p_sorted.shape[-1])
    q_sorted = F.pad(q_sorted, (0, width - q_sorted.shape[-1]))
    p_sorted = F.pad(p_sorted, (0, width - p_sorted.shape[-1]))
    row_loss = (q_sorted - p_sorted).abs().sum(-1)
    flat_labels = None
    if labels is not None:
        flat_labels = labels.reshape(-1)
        row_loss = torch.where(flat_labels != ignore_index, row_loss, 0.0)
    return reduce_rows(row_loss, leading, reduction, None, flat_labels, ignore_index)


def _sorted_top(probs, top_k):
    if top_k is None or top_k >= probs.shape[-1]:
        return torch.sort(probs, dim=-1, descending=True).values
    return torch.topk(probs, top_k, dim=-1, sorted=True).values
