"""Public losses of random-sampling KD (Anshumann et al. 2025, "Sparse Logit Sampling:
Accelerating Knowledge Distillation in LLMs"): the teacher is known through token ids drawn from
it, stored with their counts or importance weights; the loss's gradient is an unbiased estimate of
the forward-KL gradient. Argument checks, one registry choice, one custom-op call."""

import dataclasses
import math
from typing import Optional, Union

from torch import Tensor

from . import functional, sparse_inputs, validation
from .divergences import make_spec
from .functional import FusedLoss, Normalizer
from .kernels import registry
from .kernels.sampled.contract import SELF_NORMALIZED
from .kernels.sparse.contract import DEFAULT_PAD_ID
from .ops import sampled_kd_rows
from .options import SampledOptions
from .reduction import reduce_rows


def sampled_kd_loss(
    student_logits: Tensor,
    sampled_ids: Tensor,
    sample_weights: Tensor,
    labels: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    num_samples: Optional[float] = None,
    teacher_mask: Optional[Tensor] = None,
    pad_id: Optional[int] = DEFAULT_PAD_ID,
    temperature_squared: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Normalizer = None,
    validate: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Random-sampling KD: the student's cross-entropy against a teacher known through samples.

    Per row, ids x_1..x_K drawn from the teacher (repeats allowed) with weights w_j ≥ 0, and
    q = softmax(student / T):

        loss = −Σ_j (w_j / W)·log q_{x_j},   W = Σ_j w_j  (or W = ``num_samples`` when given)
        ∂loss/∂(student/T) = (Σ_j w_j / W)·q − Σ_j (w_j / W)·e_{x_j}

    Draws from the teacher's distribution p at temperature T, each with weight 1 (or unique ids
    with their counts), make the gradient an unbiased estimate of the forward KL(p‖q) gradient
    q − p; the loss is, in expectation, KL(p‖q) + H(p) (the teacher's entropy: no gradient). Draws
    from a proposal r with importance weights w = p/r are unbiased with ``num_samples`` = the
    number of draws, and consistent (bias of order 1/K) self-normalised (the default).

    Args:
        student_logits: (…, V) fp32|fp16|bf16|fp64. Receives the gradient.
        sampled_ids: (…, K) int token ids, K ≥ 1 (K may exceed V). A row holding a present id
            outside [0, V) gets a NaN loss and gradient (checked on the device, no host sync).
        sample_weights: (…, K) counts (int) or weights (float ≥ 0); weight 0 marks an absent entry.
        labels: (…) int; rows equal to ``ignore_index`` contribute nothing.
        temperature: T > 0; divides the student logits (sample the teacher at the same T).
        num_samples: W above for every row (a number > 0), or None to normalise each row by its
            weights' sum.
        teacher_mask: (…, K) bool or None: True where an entry is present (ragged K).
        pad_id: entries whose id equals it are absent (default -1, as :func:`sparse_kd_loss`);
            None: no padding id. A row with no present entry (weights summing to 0) is an ignored
            row: loss 0, gradient 0, left out of the mean.
        validate: also reject negative or non-finite weights and present ids outside [0, V) with
            an error (reads the tensors on the host: for debugging data, off by default).
        backend: "auto", "torch", "triton" or "native" (``fastkd.available_backends()["sampled_kd"]``).
        The other options are those of :func:`fastkd.kd_loss`.
    """
    validation.check_logits("student_logits", student_logits)
    leading_shape = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    spec = make_spec("forward_kl", temperature)
    sample_count = _sample_count(num_samples)
    sample_weights = _sampled_teacher(sampled_ids, sample_weights, teacher_mask, pad_id, leading_shape, vocab,
                                      student_logits, validate)
    validation.check_row_options(labels, leading_shape, student_logits.device, ignore_index, reduction, normalizer,
                                 temperature_squared)
    backend = registry.select("sampled_kd", backend, student_logits.device,
                              (student_logits.dtype, sample_weights.dtype))
    options = SampledOptions(spec, sample_count, ignore_index, backend)

    n_samples = sampled_ids.shape[-1]
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    weights = sample_weights.reshape(-1, n_samples)
    row_loss = sampled_kd_rows(student_logits.reshape(-1, vocab), sampled_ids.reshape(-1, n_samples), weights,
                               flat_labels, options)
    if temperature_squared:
        row_loss = row_loss * (spec.temperature ** 2)
    counted = functional.rows_with_teacher(flat_labels, weights != 0, ignore_index)
    return reduce_rows(row_loss, leading_shape, reduction, normalizer, counted, ignore_index)


def fused_linear_sampled_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    sampled_ids: Tensor,
    sample_weights: Tensor,
    labels: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    vocab_size: Optional[int] = None,
    temperature: float = 1.0,
    num_samples: Optional[float] = None,
    teacher_mask: Optional[Tensor] = None,
    pad_id: Optional[int] = DEFAULT_PAD_ID,
    temperature_squared: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Normalizer = None,
    return_components: bool = False,
    return_entropy: bool = False,
    fp32_logits: Optional[bool] = None,
    validate: bool = False,
    backend: str = "auto",
) -> Union[Tensor, FusedLoss]:
    """:func:`sampled_kd_loss` from hidden states: student logits are formed block by block from
    ``student_hidden`` (…, Hs) and ``student_weight`` (V, Hs), never the whole (…, V);
    ``soft_weight``·sampled loss + ``hard_weight``·cross-entropy against ``labels``. The other
    options are those of :func:`sampled_kd_loss` and :func:`fastkd.fused_linear_sparse_kd_loss`."""
    validation.check_linear("student_hidden", student_hidden, "student_weight", student_weight,
                            "student_bias", student_bias)
    device = student_hidden.device
    leading_shape = student_hidden.shape[:-1]
    vocab = functional._check_vocab_size(vocab_size, student_weight.shape[0], student_weight.shape[0])
    spec = make_spec("forward_kl", temperature)
    sample_count = _sample_count(num_samples)
    sample_weights = _sampled_teacher(sampled_ids, sample_weights, teacher_mask, pad_id, leading_shape, vocab,
                                      student_hidden, validate)
    functional._check_fused_options(labels, leading_shape, device, ignore_index, reduction, normalizer,
                                    temperature_squared, soft_weight, hard_weight, return_components,
                                    return_entropy, fp32_logits)
    options = functional._fused_options(spec, "renormalize", ignore_index, hard_weight, "sampled_kd", backend,
                                        device, (student_hidden.dtype, sample_weights.dtype), fp32_logits,
                                        return_entropy)
    options = dataclasses.replace(options, sampled=True, sample_count=sample_count)

    student_weight, student_bias = functional._first_rows(student_weight, student_bias, vocab)
    n_samples = sampled_ids.shape[-1]
    teacher = (None, None, None, sampled_ids.reshape(-1, n_samples), sample_weights.reshape(-1, n_samples))
    if hard_weight == 0:  # rows without samples leave the mean (with a hard term their CE counts)
        labels = functional.rows_with_teacher(labels, sample_weights != 0, ignore_index)
    return functional._fused_linear(student_hidden, student_weight, student_bias, teacher, labels, options,
                                    soft_weight, hard_weight, temperature_squared, reduction, normalizer,
                                    return_components or return_entropy)


def _sample_count(num_samples):
    if num_samples is None:
        return SELF_NORMALIZED
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, float)):
        raise TypeError(f"num_samples must be a Python number or None; got {type(num_samples).__name__}")
    if not (math.isfinite(num_samples) and num_samples > 0):
        raise ValueError(f"num_samples must be a finite number > 0 (the number of draws per row), or None; "
                         f"got {num_samples}")
    return float(num_samples)


def _sampled_teacher(ids, weights, mask, pad_id, leading_shape, vocab, student, validate):
    """Checks a sampled teacher and returns its weights as the kernels read them: floats, 0 at
    absent entries."""
    validation.check_flag("validate", validate)
    validation.check_sparse_teacher(ids, weights, leading_shape, vocab, student.device, "sample_weights",
                                    "sampled_ids", sampled=True)
    sparse_inputs.check_mask(mask, ids)
    sparse_inputs.check_pad_id(pad_id)
    weights = sparse_inputs.weights_with_absent(ids, weights, mask, pad_id, student)
    if validate:
        validation.check_sampled_values(ids, weights, vocab)
    return weights
