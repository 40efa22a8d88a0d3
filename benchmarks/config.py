"""What is measured: cases (one divergence at one shape and dtype), suites of cases with their
repeat counts, and the divergence parameters every provider uses."""

from dataclasses import dataclass, replace

import torch

from fastkd import DIVERGENCES

OP = "kd_loss"
MODES = ("fwd", "fwd+bwd")

# Parameters shared by every provider; the fastkd defaults, so a user's plain call is measured.
TEMPERATURE = 1.0
BETA = 0.5
SKEW = 0.1

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    """One divergence on (N, V) logits of one dtype (student and teacher alike)."""

    divergence: str
    dtype: str  # a key of DTYPES
    N: int
    V: int

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class Suite:
    """A set of cases with the timing effort for each measurement.

    On a CPU: the median of ``cpu_repeats`` runs after ``cpu_warmup`` runs. On a GPU
    ``triton.testing.do_bench`` chooses the repeat count that fills ``gpu_rep_ms``.
    """

    name: str
    cases: tuple
    cpu_warmup: int
    cpu_repeats: int
    gpu_rep_ms: int


def _cases(divergences, dtype, N, V):
    return tuple(Case(d, dtype, N, V) for d in divergences)


SUITES = {
    # Llama-3 vocabulary, 8k tokens in bf16: the size the Triton kernels are designed for.
    "gpu": Suite("gpu", _cases(DIVERGENCES, "bf16", 8192, 128256), cpu_warmup=1, cpu_repeats=3, gpu_rep_ms=500),
    # A few minutes on a 2-core CPU: one KL and one mixture divergence (they differ in passes).
    "cpu": Suite("cpu", _cases(("forward_kl", "jsd"), "fp32", 2048, 32000), cpu_warmup=2, cpu_repeats=7,
                 gpu_rep_ms=200),
    # Every divergence at a tiny size: an end-to-end check of the machinery, not a measurement.
    "smoke": Suite("smoke", _cases(DIVERGENCES, "fp32", 64, 1000), cpu_warmup=3, cpu_repeats=15, gpu_rep_ms=50),
    # The gpu suite's target size for one KL and one mixture divergence: a GPU session short on time.
    "quick": Suite("quick", _cases(("forward_kl", "jsd"), "bf16", 8192, 128256), cpu_warmup=1, cpu_repeats=3,
                   gpu_rep_ms=300),
}


def default_suite_name(device, smoke=False, quick=False):
    if smoke:
        return "smoke"
    if quick:
        return "quick"
    return "gpu" if device.type == "cuda" else "cpu"


def override(suite, divergences=None, shape=None, dtype=None):
    """The suite with its cases restricted to ``divergences`` and/or moved to another shape or
    dtype (command-line options)."""
    cases = suite.cases
    if divergences:
        unknown = sorted(set(divergences) - set(DIVERGENCES))
        if unknown:
            raise SystemExit(f"unknown divergence(s) {unknown}; choose from {list(DIVERGENCES)}")
        base = cases[0]
        cases = tuple(Case(d, base.dtype, base.N, base.V) for d in divergences)
    if shape:
        cases = tuple(replace(c, N=shape[0], V=shape[1]) for c in cases)
    if dtype:
        cases = tuple(replace(c, dtype=dtype) for c in cases)
    return replace(suite, cases=cases)
