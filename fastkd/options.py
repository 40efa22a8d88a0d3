"""The options of each op family, as one frozen dataclass that travels from the public function
through the custom op (flattened into its schema by fastkd/ops/schema.py) to the kernels.

Every leaf field is a str, float, int or bool: exactly what a torch.library schema carries; a
DivergenceSpec field is expanded in place. Backend fields hold a backend already chosen by the
registry (never "auto").
"""

from dataclasses import dataclass

from .divergences import DivergenceSpec


@dataclass(frozen=True)
class KDOptions:
    """kd_rows: a divergence of two temperature softmaxes per row."""

    spec: DivergenceSpec
    ignore_index: int
    backend: str


@dataclass(frozen=True)
class KLDivOptions:
    """kl_div: torch.nn.KLDivLoss's pointwise terms summed per row."""

    log_target: bool
    backend: str


@dataclass(frozen=True)
class SparseOptions:
    """sparse_kd: a divergence against a top-k teacher."""

    spec: DivergenceSpec
    missing_mass: str
    ignore_index: int
    backend: str


@dataclass(frozen=True)
class SampledOptions:
    """sampled_kd: cross-entropy against a teacher known through sampled ids and weights."""

    spec: DivergenceSpec
    sample_count: float  # ≤ 0: each row normalised by the sum of its weights
    ignore_index: int
    backend: str


@dataclass(frozen=True)
class FusedLinearOptions:
    """The fused linear losses: the soft term (a kd_rows divergence with a dense teacher, a sparse_kd
    one with a top-k teacher) and the optional hard cross-entropy term, each on its own backend."""

    spec: DivergenceSpec
    missing_mass: str  # used with a top-k teacher only
    ignore_index: int
    with_hard: bool  # also compute hard-label cross-entropy rows (needs labels)
    soft_backend: str
    ce_backend: str  # "" without the hard term
    fp32_logits: bool = False  # fp16/bf16 logit blocks kept in fp32 (kernels/fused_linear/block_logits.py)
    with_entropy: bool = False  # also the student's per-row entropy at temperature T
    # Vocab-parallel (kernels/fused_linear/vocab_parallel.py): the group's name ("" for none), the real
    # vocabulary size for padded weights (-1: no padding), whether grad_hidden is summed over the group,
    # and the whole vocabulary's size as every rank knows it (-1: unknown), which sizes the token blocks.
    group_name: str = ""
    vocab_limit: int = -1
    sum_grad_hidden: bool = True
    global_vocab: int = -1
    sampled: bool = False  # the sparse teacher is sampled ids and weights (the sampled_kd family)
    sample_count: float = 0.0  # sampled_kd's normalisation (SampledOptions)


@dataclass(frozen=True)
class SinkhornOptions:
    """sinkhorn and sinkhorn_backward."""

    eps: float
    max_iter: int
    tol: float  # < 0: exactly max_iter iterations
    grad: str  # "envelope", "unrolled" or "none"
    return_plan: bool
    backend: str
    gemm_precision: str  # "fp32", "tf32" or "bf16": the gemm backend's matrix multiplies


@dataclass(frozen=True)
class TopKOptions:
    """topk: a teacher's top-k log-probabilities from its hidden states and lm_head."""

    top_k: int
    temperature: float
    ignore_index: int
    backend: str
