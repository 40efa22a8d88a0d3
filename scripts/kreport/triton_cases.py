"""The calls the report makes of fastkd's Triton launchers: realistic sizes, every divergence and
option that selects a different kernel, on meta tensors (no memory, no GPU).

The launchers are found through the capability registry (the module of each family's Triton row),
so the report follows the code wherever a family's launchers live; their own config functions then
choose BLOCK sizes and warps, and Triton's own specialisation rules (alignment, divisibility by
16, integers equal to 1) apply to the recorded arguments (triton_build.py).
"""

from dataclasses import dataclass
from typing import Callable

import torch

from fastkd.divergences import DIVERGENCES, make_spec
from fastkd.kernels import registry
from fastkd.kernels.logits.contract import stats_width
from fastkd.kernels.sinkhorn.contract import allocate_outputs

# Logits: vocabularies of Llama-2 and Mistral (32000, a multiple of 16), Llama-3 (128256) and
# GPT-2 (50257, odd: rows start unaligned), at training batch sizes.
VOCABS = (32000, 128256, 50257)
LOGITS_DTYPES = (torch.float32, torch.bfloat16)
ROWS = 8192
BATCH, SEQUENCE = 2, 4096  # the shifted view logits[:, :-1] of (BATCH, SEQUENCE, V)
IGNORE_INDEX = -100

# Sparse (top-k) teacher: k = 64 stored ids per token, on Llama-2 and Llama-3 vocabularies. The op
# and the fused driver hand the kernels contiguous (rows, V) logits (2-D only).
SPARSE_VOCABS = (32000, 128256)
SPARSE_TOP_K = 64

# Sinkhorn: problems of n = m classes; B = 256 problems (a WKD batch).
SINKHORN_SIZES = (16, 64, 128, 1000)
SINKHORN_PROBLEMS = 256
SINKHORN_EPS, SINKHORN_MAX_ITER, SINKHORN_TOL = 0.05, 100, 1e-6


@dataclass(frozen=True)
class Case:
    family: str  # the registry family whose launcher is called
    direction: str  # "forward" or "backward"
    variant: str  # what selects the kernel: divergence, log_target, gradient mode, ...
    dtype: str
    size: str
    layout: str
    call: Callable[[], None]

    @property
    def label(self):
        return f"{self.family} {self.direction} {self.variant} {self.dtype} {self.size} {self.layout}"


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _logits_layouts(vocab, dtype):
    """(name, make_logits, labels) for the two row layouts the ops hand to the kernels: contiguous
    (N, V) rows without labels, and a shifted (B, T − 1, V) view with labels."""
    shifted_rows = BATCH * (SEQUENCE - 1)
    return (
        ("rows (N, V)", lambda: _meta(ROWS, vocab, dtype=dtype), None),
        ("shifted (B, T-1, V)", lambda: _meta(BATCH, SEQUENCE, vocab, dtype=dtype)[:, :-1],
         _meta(shifted_rows, dtype=torch.int64)),
    )


# The logit transforms and dkd are constexpr flags of the same kd_rows kernels: one specialisation per
# kernel with every flag on (the most registers), dkd plain, and a soft-cap alone (Gemma's setting).
# A logit scale alone folds into the temperature's multiplier: the plain kernels.
_TRANSFORMS = dict(student_softcap=30.0, teacher_softcap=30.0, student_logit_scale=0.5, standardize=True)
_KD_ROWS_VARIANTS = (
    *((divergence, {}) for divergence in DIVERGENCES),
    ("dkd", {}),
    ("forward_kl", dict(student_softcap=30.0, teacher_softcap=30.0)),
    ("forward_kl", _TRANSFORMS),
    ("jsd", _TRANSFORMS),
    ("dkd", _TRANSFORMS),
)


def _variant_name(divergence, transforms):
    flags = [name for name, on in (("softcap", "student_softcap" in transforms),
                                   ("standardize", transforms.get("standardize"))) if on]
    return "+".join([divergence, *flags])


def _kd_rows_cases(vocab, dtype):
    launchers = registry.implementation("kd_rows", "triton", "cuda")
    for layout, logits, labels in _logits_layouts(vocab, dtype):
        for divergence, transforms in _KD_ROWS_VARIANTS:
            if divergence == "dkd" and labels is None:
                continue  # dkd needs the labels: only the shifted layout has them
            spec = make_spec(divergence, temperature=2.0, beta=8.0 if divergence == "dkd" else 0.5, skew=0.1,
                             alpha=1.0 if divergence == "dkd" else None, **transforms)

            def forward(spec=spec, logits=logits, labels=labels):
                launchers.kd_rows_forward(logits(), logits(), labels, spec, IGNORE_INDEX)

            def backward(spec=spec, logits=logits, labels=labels):
                student = logits()
                n_rows = student.numel() // vocab
                launchers.kd_rows_backward(_meta(n_rows), student, logits(), labels,
                                           _meta(n_rows, stats_width(spec)), spec, IGNORE_INDEX)

            for direction, call in (("forward", forward), ("backward", backward)):
                yield Case("kd_rows", direction, _variant_name(divergence, transforms), _dtype_name(dtype),
                           f"V={vocab}", layout, call)


def _kl_div_cases(vocab, dtype):
    launchers = registry.implementation("kl_div", "triton", "cuda")
    for layout, logits, _ in _logits_layouts(vocab, dtype):
        for log_target in (False, True):
            def forward(logits=logits, log_target=log_target):
                launchers.kl_div_rows_forward(logits(), logits(), log_target)

            def backward(logits=logits, log_target=log_target):
                x = logits()
                launchers.kl_div_rows_backward(_meta(x.numel() // vocab), x, logits(), log_target)

            variant = f"log_target={log_target}"
            for direction, call in (("forward", forward), ("backward", backward)):
                yield Case("kl_div", direction, variant, _dtype_name(dtype), f"V={vocab}", "rows (N, V)"
                           if layout.startswith("rows") else layout, call)


def _ce_cases(vocab, dtype):
    # Cross-entropy rows come from the fused linear driver's (rows, V) logit blocks only.
    launchers = registry.implementation("ce", "triton", "cuda")
    labels = _meta(ROWS, dtype=torch.int64)

    def forward():
        launchers.ce_rows_forward(_meta(ROWS, vocab, dtype=dtype), labels, IGNORE_INDEX)

    def backward():
        launchers.ce_rows_backward(_meta(ROWS), _meta(ROWS, vocab, dtype=dtype), labels, _meta(ROWS, 2), IGNORE_INDEX,
                                   _meta(ROWS, vocab, dtype=dtype))

    for direction, call in (("forward", forward), ("backward", backward)):
        yield Case("ce", direction, "hard labels", _dtype_name(dtype), f"V={vocab}", "rows (N, V)", call)


def logits_cases():
    for vocab in VOCABS:
        for dtype in LOGITS_DTYPES:
            yield from _kd_rows_cases(vocab, dtype)
            yield from _kl_div_cases(vocab, dtype)
            yield from _ce_cases(vocab, dtype)


def sparse_cases():
    # The tail mode's two V passes; the bucket math around them is torch ops on (rows, k).
    launchers = registry.implementation("sparse_kd", "triton", "cuda")
    ids = _meta(ROWS, SPARSE_TOP_K, dtype=torch.int32)
    for vocab in SPARSE_VOCABS:
        for dtype in LOGITS_DTYPES:
            def forward(vocab=vocab, dtype=dtype):
                launchers.tail_stats(_meta(ROWS, vocab, dtype=dtype), ids, _meta(ROWS, dtype=torch.bool), 0.5)

            def backward(vocab=vocab, dtype=dtype):
                launchers.tail_grad(_meta(ROWS, vocab, dtype=dtype), ids, _meta(ROWS, SPARSE_TOP_K), _meta(ROWS, 4),
                                    _meta(ROWS, 3), _meta(ROWS, dtype=torch.int8), 0.5)

            for direction, call in (("forward", forward), ("backward", backward)):
                yield Case("sparse_kd", direction, f"tail, k={SPARSE_TOP_K}", _dtype_name(dtype), f"V={vocab}",
                           "rows (N, V)", call)


def sinkhorn_cases():
    forward_launchers = registry.implementation("sinkhorn", "triton", "cuda")
    backward_launchers = registry.implementation("sinkhorn_backward", "triton", "cuda")
    problems = SINKHORN_PROBLEMS
    for n in SINKHORN_SIZES:
        for layout, cost_shape in (("shared cost", (n, n)), ("batched cost", (problems, n, n))):
            def solve(save_history, return_plan, cost_shape=cost_shape, n=n):
                return forward_launchers.sinkhorn_forward(
                    _meta(*cost_shape), _meta(problems, n), _meta(problems, n), SINKHORN_EPS, SINKHORN_MAX_ITER,
                    SINKHORN_TOL, save_history, return_plan)

            def gradients(mode, needs_cost, cost_shape=cost_shape, n=n):
                # The forward's outputs, as its contract allocates them (no forward launch here).
                out = allocate_outputs(problems, n, n, SINKHORN_MAX_ITER, mode == "unrolled", False, "meta", False)
                backward_launchers.sinkhorn_backward(
                    _meta(problems), _meta(problems), _meta(*cost_shape), _meta(problems, n), _meta(problems, n),
                    out.f, out.g, out.n_iter, out.f_hist, out.g_hist, SINKHORN_EPS, mode, needs_cost, True, True)

            calls = (
                ("forward", "grad none/envelope", lambda solve=solve: solve(False, False)),
                ("forward", "grad none, return_plan", lambda solve=solve: solve(False, True)),
                ("forward", "grad unrolled (history)", lambda solve=solve: solve(True, False)),
                ("backward", "envelope", lambda gradients=gradients: gradients("envelope", True)),
                ("backward", "unrolled", lambda gradients=gradients: gradients("unrolled", True)),
                ("backward", "unrolled, no cost grad", lambda gradients=gradients: gradients("unrolled", False)),
            )
            for direction, variant, call in calls:
                yield Case("sinkhorn", direction, variant, "float32", f"n=m={n}", layout, call)


def all_cases():
    return list(logits_cases()) + list(sparse_cases()) + list(sinkhorn_cases())
