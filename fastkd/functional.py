"""Public loss functions from logits and from hidden states: argument checks, one backend choice
per op family (the registry), then one custom-op call each."""

import math
import sys
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import distributed, logit_transforms, sparse_inputs, validation
from .divergences import make_spec
from .kernels import registry
from .kernels.fused_linear import block_logits
from .kernels.layout import as_rows, compute_dtype
from .kernels.sparse.contract import DEFAULT_PAD_ID, MISSING_MASS, SPARSE_DIVERGENCES
from .ops import fused_linear_kd_rows, fused_linear_kd_weighted, kd_rows, sparse_kd_rows
from .options import FusedLinearOptions, KDOptions, SparseOptions
from .reduction import reduce_rows, row_weight

Normalizer = Optional[Union[int, float, Tensor]]


class FusedLoss(NamedTuple):
    """A fused loss with its parts (``return_components=True``): ``loss = soft_weight·soft +
    hard_weight·hard``. ``soft`` is the reduced divergence (× T² with ``temperature_squared``),
    ``hard`` the reduced hard-label cross-entropy, both detached, for logging; ``n_tokens`` the
    number of non-ignored tokens (int64, on the device: no host synchronisation). With
    reduction="none" ``soft`` and ``hard`` are per token.

    Per token, with the leading shape (…) of the hidden states, detached, 0 on ignored tokens:
    ``soft_per_token`` (× T² with ``temperature_squared``) and ``hard_per_token``, whatever the
    reduction; ``entropy``, the student's entropy at temperature T (after its logit scale and
    soft-cap), with ``return_entropy=True``, else None. All come from the fused pass itself."""

    loss: Tensor
    soft: Tensor
    hard: Tensor
    n_tokens: Tensor
    soft_per_token: Optional[Tensor] = None
    hard_per_token: Optional[Tensor] = None
    entropy: Optional[Tensor] = None


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: Optional[float] = None,
    skew: float = 0.1,
    alpha: Optional[float] = None,
    temperature_squared: bool = False,
    student_logit_scale: Optional[float] = None,
    student_softcap: Optional[float] = None,
    teacher_logit_scale: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    standardize: bool = False,
    standardize_eps: float = 1e-7,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Normalizer = None,
    backend: str = "auto",
    process_group=None,
) -> Tensor:
    """Knowledge-distillation divergence between teacher and student temperature softmaxes.

    Args:
        student_logits: (…, V) fp32|fp16|bf16|fp64. Receives the gradient.
        teacher_logits: (…, V), same shape and device; any float dtype. A constant: no gradient.
        labels: (…) integer tensor; rows equal to ``ignore_index`` contribute nothing. For "dkd"
            required: each row's target class (a label outside [0, V) that is not ignore_index
            makes the row NaN).
        divergence: "forward_kl" KL(p‖q), "reverse_kl" KL(q‖p), "jsd" (with ``beta``),
            "skew_forward_kl" / "skew_reverse_kl" (with ``skew``), "tvd", or "dkd" (decoupled KD:
            ``alpha``·TCKD + ``beta``·NCKD); p is the teacher's softmax(teacher / T), q the
            student's. See fastkd/divergences.py for the formulas.
        temperature: T > 0, applied to both logits.
        beta: JSD mixture weight in [0, 1] (TRL convention; 0 is exactly forward KL and 1 exactly
            reverse KL, computed by their single-pass kernels), default 0.5; for "dkd" the NCKD
            weight, default 8 (mdistiller's CIFAR-100 setting).
        skew: skew-KL mixture weight in (0, 1).
        alpha: dkd's TCKD weight, default 1; no other divergence takes it.
        temperature_squared: multiply the loss by T² (Hinton et al.; mdistiller's DKD and KD
            losses always do).
        student_logit_scale, teacher_logit_scale: multiply that side's logits first (Cohere- or
            Granite-style ``logit_scale``); None: 1.
        student_softcap, teacher_softcap: then cap them, c·tanh(x/c) (Gemma-2/3's
            ``final_logit_softcapping``); None: no cap. −inf entries stay −inf.
        standardize: then standardise each row of both sides, (z − mean) / (std + standardize_eps)
            with the sample std (logit standardisation, Sun et al. 2024, as its code computes
            it), before the temperature; the gradient flows through the mean and std.
        reduction: "mean" over non-ignored rows, "sum", or "none" for per-row losses of shape (…).
        normalizer: divisor replacing the row count of "mean" (e.g. ``num_items_in_batch``);
            a number or a one-element tensor.
        backend: "auto", "torch", "triton" or "native"; see ``fastkd.available_backends()``.
        process_group: a ``torch.distributed`` group over which the vocabulary is split: both
            logits are then this rank's contiguous slice of columns (ranks in order, any sizes),
            every rank passes the same rows and the same labels (global ids), and the ranks
            exchange per-row statistics only (see
            fastkd/distributed.py; backend "auto" or "torch"). The result is the loss over the
            whole vocabulary, equal on every rank; the gradient is this rank's slice. DTensor
            logits placed Shard(-1) need no group (their mesh gives it) and give a replicated
            DTensor loss.

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or shape (…) for "none".
    """
    student_logits, teacher_logits, labels, process_group, as_dtensor = distributed.unwrap_dtensors(
        student_logits, teacher_logits, labels, process_group)
    validation.check_logits("student_logits", student_logits)
    validation.check_logits("teacher_logits", teacher_logits)
    validation.check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    device = student_logits.device
    leading_shape = student_logits.shape[:-1]
    validation.check_row_options(labels, leading_shape, device, ignore_index, reduction, normalizer,
                                 temperature_squared)
    spec = make_spec(divergence, temperature, beta, skew, alpha=alpha, student_logit_scale=student_logit_scale,
                     student_softcap=student_softcap, teacher_logit_scale=teacher_logit_scale,
                     teacher_softcap=teacher_softcap, standardize=standardize, standardize_eps=standardize_eps)
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    if process_group is not None:
        # This rank sees a slice of the vocabulary: dkd's V ≥ 2 holds for the whole, not checked here.
        _check_labels_for(spec, labels, 2)
        distributed.check_process_group(process_group, device)
        registry.select("kd_rows_vocab_parallel", backend, device, (student_logits.dtype, teacher_logits.dtype),
                        spec.features)
        vocab = student_logits.shape[-1]
        row_loss = distributed.kd_rows_vocab_parallel(student_logits.reshape(-1, vocab),
                                                      teacher_logits.reshape(-1, vocab), flat_labels, spec,
                                                      ignore_index, process_group)
    else:
        _check_labels_for(spec, labels, student_logits.shape[-1])
        backend = registry.select("kd_rows", backend, device, (student_logits.dtype, teacher_logits.dtype),
                                  spec.features)
        options = KDOptions(spec, ignore_index, backend)
        row_loss = kd_rows(as_rows(student_logits), as_rows(teacher_logits), flat_labels, options)[0]
    if temperature_squared:
        row_loss = row_loss * (spec.temperature ** 2)
    loss = reduce_rows(row_loss, leading_shape, reduction, normalizer, flat_labels, ignore_index)
    return loss if as_dtensor is None else as_dtensor(loss)


def sparse_kd_loss(
    student_logits: Tensor,
    teacher_indices: Tensor,
    teacher_logprobs: Tensor,
    labels: Optional[Tensor] = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: Optional[float] = None,
    student_logit_scale: Optional[float] = None,
    student_softcap: Optional[float] = None,
    teacher_temperature: float = 1.0,
    missing_mass: str = "renormalize",
    teacher_mask: Optional[Tensor] = None,
    pad_id: Optional[int] = DEFAULT_PAD_ID,
    temperature_squared: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Normalizer = None,
    validate: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Divergence between the student and a sparse (top-k, offline) teacher.

    Args:
        student_logits: (…, V) fp32|fp16|bf16|fp64. Receives the gradient.
        teacher_indices: (…, k) int, the teacher's top-k token ids per row (distinct, in [0, V)),
            e.g. (B, T, k) next to (B, T, V) logits. A row holding a present id outside [0, V) gets
            a NaN loss and NaN gradient (checked on the device, no host synchronisation).
        teacher_logprobs: (…, k) fp32|fp16|bf16|fp64, their log-probabilities under the teacher
            (as stored by offline runs or returned by inference servers). Math runs in fp32
            (fp64 if the student or the log-probs are fp64).
        labels: (…) int; rows equal to ``ignore_index`` contribute nothing.
        divergence: "forward_kl" KL(p‖q), "reverse_kl" KL(q‖p), "jsd" (with ``beta``, TRL's
            convention as in :func:`kd_loss`: β·KL(p‖M) + (1−β)·KL(q‖M), M = β·p + (1−β)·q) or
            "tvd" ½·Σ|p − q|, each over the buckets that ``missing_mass`` defines.
        beta: JSD mixture weight in [0, 1] (default 0.5; 0 is exactly forward KL, 1 reverse KL).
        missing_mass: "renormalize": both distributions restricted to the present top-k entries
            and renormalised there, p̃_i = p_i/Σ_S p, q̃_i = q_i/Σ_S q (no gradient outside S);
            "tail": k + 1 buckets, the teacher's leftover mass 1 − Σ_S p being one more bucket,
            compared with the student's mass Σ_{i∉S} q_i outside the support (temperature must
            equal teacher_temperature); when the support is the whole vocabulary there is no
            tail bucket, and with k = V every divergence equals :func:`kd_loss`'s. See
            fastkd/kernels/sparse/torch.py for the formulas and gradients.
        teacher_mask: (…, k) bool or None: True where an entry is present (ragged k per row).
        pad_id: entries whose id equals it are absent (default -1, the PAD_ID of fastkd's top-k
            cache and ignored rows of fused_linear_topk); None: no padding id. Entries with a
            log-prob of -inf are absent too. A row with no present entry is an ignored row
            (loss 0, gradient 0, left out of the mean as a row whose label is ignore_index is).
        temperature: the training temperature T: divides the student logits, and the teacher is
            taken at T too.
        teacher_temperature: the temperature T_g the log-probs were computed at (log softmax(z/T_g):
            a server's sampling temperature, or fused_linear_topk's / the cache's ``temperature``).
            The teacher at T is p_T ∝ p_g^(T_g/T). "renormalize": exact for any pair (over the
            support, softmax of (T_g/T)·log p_g is the support-restricted softmax(z/T)). "tail":
            exact only for T = T_g, when the stored log-probs already are the teacher at T; for
            T ≠ T_g the leftover mass at T depends on how the mass outside the top-k is spread,
            which the top-k does not say, so that pair raises instead of guessing.
        validate: also reject present ids outside [0, V), repeated present ids and positive or NaN
            log-probs with an error. This reads the tensors on the host (a synchronisation, and a
            graph break under torch.compile): for debugging data, off by default.
        backend: "auto", "torch", "triton" or "native" (see ``fastkd.available_backends()["sparse_kd"]``).
        student_logit_scale, student_softcap: the student's logits as its model outputs them
            (scale, then c·tanh(x/c)), before the temperature, as in :func:`kd_loss`; here applied
            by autograd before the op (one transformed copy of the logits, in their dtype). The
            teacher's side is its stored log-probs, already as its model computed them.
        The other options are those of :func:`kd_loss`.
    """
    validation.check_logits("student_logits", student_logits)
    leading_shape = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    spec = _sparse_spec(divergence, temperature, missing_mass, teacher_temperature, beta, student_logit_scale,
                        student_softcap)
    if spec.student_scale != 1.0 or spec.student_softcap > 0:
        student_logits = logit_transforms.scale_and_cap(student_logits, spec.student_scale, spec.student_softcap)
    teacher_logprobs = _sparse_teacher(teacher_indices, teacher_logprobs, teacher_mask, pad_id, leading_shape,
                                       vocab, student_logits, validate, teacher_temperature)
    validation.check_row_options(labels, leading_shape, student_logits.device, ignore_index, reduction, normalizer,
                                 temperature_squared)
    backend = registry.select("sparse_kd", backend, student_logits.device,
                              (student_logits.dtype, teacher_logprobs.dtype))
    options = SparseOptions(spec, missing_mass, ignore_index, backend)

    top_k = teacher_indices.shape[-1]
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    row_loss = sparse_kd_rows(student_logits.reshape(-1, vocab), teacher_indices.reshape(-1, top_k),
                              teacher_logprobs.reshape(-1, top_k), flat_labels, options)
    if temperature_squared:
        row_loss = row_loss * (spec.temperature ** 2)
    counted = rows_with_teacher(flat_labels, teacher_logprobs.reshape(-1, top_k) != -math.inf, ignore_index)
    return reduce_rows(row_loss, leading_shape, reduction, normalizer, counted, ignore_index)


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    vocab_size: Optional[int] = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: Optional[float] = None,
    skew: float = 0.1,
    alpha: Optional[float] = None,
    temperature_squared: bool = False,
    student_logit_scale: Optional[float] = None,
    student_softcap: Optional[float] = None,
    teacher_logit_scale: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    standardize: bool = False,
    standardize_eps: float = 1e-7,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Normalizer = None,
    return_components: bool = False,
    return_entropy: bool = False,
    fp32_logits: Optional[bool] = None,
    backend: str = "auto",
    process_group=None,
    grad_hidden_reduction: str = "sum",
) -> Union[Tensor, FusedLoss]:
    """Distillation loss from hidden states and lm_head weights, never forming the (N, V) logits.

    Per token: ``soft_weight · D(student, teacher) (· T² if temperature_squared) + hard_weight ·
    CE(student logits at T = 1, labels)`` with D any ``kd_loss`` divergence, then reduced as in
    :func:`kd_loss`. The cross-entropy sees the logits as the student model outputs them: after
    ``student_logit_scale`` and ``student_softcap``, without standardisation or temperature. Logits are formed block by block inside the op, by a matmul in the hidden
    states' dtype: a weight of another dtype (fp32 parameters next to bf16 activations under
    ``torch.autocast``) is cast for the matmul, and its gradient comes back in its own dtype.

    Args:
        student_hidden: (…, Hs) fp32|fp16|bf16|fp64; student_weight: (V, Hs); student_bias: (V,) or None.
            These receive gradients.
        teacher_hidden: (…, Ht) with the student's leading shape; teacher_weight: (V', Ht);
            teacher_bias: (V',) or None. Constants: no gradient.
        labels: (…) integer token ids, required when ``hard_weight`` is not 0; rows equal to
            ``ignore_index`` contribute nothing to either term.
        vocab_size: the real vocabulary size when the lm_head weights are padded: rows ≥ vocab_size
            are left out of both softmaxes (they get a zero gradient). Required when V ≠ V'.
        return_components: return a :class:`FusedLoss` (loss, soft, hard, n_tokens, and per token
            soft_per_token, hard_per_token) instead of the loss alone, so trainers can log both terms.
        return_entropy: also the student's per-token entropy at temperature T (``FusedLoss.entropy``,
            0 on ignored tokens), from each logit block while it is in memory; implies
            ``return_components``.
        fp32_logits: with fp16/bf16 inputs, keep each block's logits (student and teacher) in fp32
            from the GEMM's fp32 accumulation instead of rounding them to the inputs' dtype before
            the softmax (rounding a logit of 20 to bf16 moves its probability by up to 4%; the
            gradient error falls to about the bf16 rounding of the gradient itself). None (default):
            on for CUDA tensors (``torch.mm(..., out_dtype=torch.float32)``: the same GEMM; the
            logit blocks take twice the memory), off on the CPU, where PyTorch has no such GEMM and
            the weight is upcast chunk by chunk for every token block (several times slower:
            docs/perf-notes.md). No effect on fp32/fp64 inputs.
        process_group: a ``torch.distributed`` group over which the lm_head is split by vocabulary
            rows (column-parallel, as Megatron's vocab-parallel lm_head): student_weight (V_r, Hs),
            teacher_weight (V_r, Ht) and the biases (V_r,) are this rank's contiguous rows (ranks
            in order, any sizes, the student's and teacher's slices alike); the hidden states and
            labels (global token ids) are the same on every rank. Per token block the ranks
            all-reduce per-row statistics only (O(N) bytes per step, independent of V; see
            fastkd/kernels/fused_linear/vocab_parallel.py); the hard term's label logit comes from
            the rank that holds it. ``vocab_size`` is then the real size of the whole vocabulary:
            the padding rows past it sit at the end (the last rank). The loss is over the whole
            vocabulary, equal on every rank; grad_weight and grad_bias are this rank's rows.
            The ranks size their token blocks from what they all know alike (N, the group size,
            ``vocab_size`` or a DTensor head's global rows), so slices of any sizes run the same
            collectives; give ``vocab_size`` (even with no padding) to size the blocks for the
            memory budget, else a slice of 65,536 columns is assumed.
            Every rank calls with the same rows, options and ``requires_grad`` on the student's
            tensors (they decide which collectives run).
            ``standardize`` takes the row mean and std over the real vocabulary (padding left out);
            ``return_entropy`` gives the entropy over the whole vocabulary (one more per-row value
            all-reduced per block).
            DTensor weights placed Shard(0) need no group (their mesh gives it; hidden states and
            labels plain or replicated DTensors) and give a replicated DTensor loss.
        grad_hidden_reduction: with a process group, "sum" (default): student_hidden's gradient
            is Σ_r grad_logits_r @ W_r, all-reduced over the group, as the backward of a
            column-parallel linear with a replicated input gives it; "none": this rank's partial
            product only, for callers whose own layers reduce it (sequence parallelism, or an input
            that already passes through Megatron's copy-to-tensor-parallel region).
        The other options are those of :func:`kd_loss`.

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or shape (…) for "none"; or a
        FusedLoss with ``return_components``.
    """
    global_rows = distributed.global_rows(student_weight)
    sharded, replicated, process_group, as_dtensor = distributed.unwrap_sharded_weights(
        dict(student_weight=student_weight, student_bias=student_bias, teacher_weight=teacher_weight,
             teacher_bias=teacher_bias),
        dict(student_hidden=student_hidden, teacher_hidden=teacher_hidden, labels=labels), process_group)
    student_weight, student_bias, teacher_weight, teacher_bias = sharded.values()
    student_hidden, teacher_hidden, labels = replicated.values()
    validation.check_linear("student_hidden", student_hidden, "student_weight", student_weight,
                            "student_bias", student_bias)
    validation.check_linear("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight,
                            "teacher_bias", teacher_bias)
    device = student_hidden.device
    leading_shape = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != leading_shape:
        raise ValueError(f"teacher_hidden leading shape {tuple(teacher_hidden.shape[:-1])} does not match "
                         f"student_hidden leading shape {tuple(leading_shape)}")
    if teacher_hidden.device != device:
        raise ValueError(f"student_hidden is on {device} but teacher_hidden is on {teacher_hidden.device}")
    _check_fused_options(labels, leading_shape, device, ignore_index, reduction, normalizer, temperature_squared,
                         soft_weight, hard_weight, return_components, return_entropy, fp32_logits)
    spec = make_spec(divergence, temperature, beta, skew, alpha=alpha, student_logit_scale=student_logit_scale,
                     student_softcap=student_softcap, teacher_logit_scale=teacher_logit_scale,
                     teacher_softcap=teacher_softcap, standardize=standardize, standardize_eps=standardize_eps)
    dtypes = (student_hidden.dtype, teacher_hidden.dtype)
    if process_group is None:
        if grad_hidden_reduction != "sum":
            raise ValueError(f"grad_hidden_reduction={grad_hidden_reduction!r} needs a process_group (without one "
                             f"there is nothing to reduce over)")
        vocab = _check_vocab_size(vocab_size, student_weight.shape[0], teacher_weight.shape[0])
        _check_labels_for(spec, labels, vocab)
        options = _fused_options(spec, "renormalize", ignore_index, hard_weight, "kd_rows", backend, device, dtypes,
                                 fp32_logits, return_entropy)
        student_weight, student_bias = _first_rows(student_weight, student_bias, vocab)
        teacher_weight, teacher_bias = _first_rows(teacher_weight, teacher_bias, vocab)
    else:
        if student_weight.shape[0] != teacher_weight.shape[0]:
            raise ValueError(f"with process_group, student_weight and teacher_weight must hold the same vocabulary "
                             f"rows on each rank; got {student_weight.shape[0]} and {teacher_weight.shape[0]} rows "
                             f"here (pad both to one vocabulary and pass vocab_size=)")
        options = _vocab_parallel_options(process_group, vocab_size, grad_hidden_reduction, labels, spec,
                                          "renormalize", ignore_index, hard_weight, backend, device, dtypes,
                                          fp32_logits, return_entropy, global_rows)
    teacher = (teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight, teacher_bias, None, None)
    result = _fused_linear(student_hidden, student_weight, student_bias, teacher, labels, options, soft_weight,
                           hard_weight, temperature_squared, reduction, normalizer,
                           return_components or return_entropy)
    if as_dtensor is None:
        return result
    return as_dtensor(result) if isinstance(result, Tensor) else result._replace(loss=as_dtensor(result.loss))


def _vocab_parallel_options(group, vocab_size, grad_hidden_reduction, labels, spec, missing_mass, ignore_index,
                            hard_weight, backend, device, dtypes, fp32_logits, return_entropy, global_rows):
    """The FusedLinearOptions of a vocab-parallel call (process_group given), its arguments checked.
    global_rows: a DTensor head's global row count, or None."""
    if grad_hidden_reduction not in ("sum", "none"):
        raise ValueError(f"grad_hidden_reduction must be 'sum' or 'none'; got {grad_hidden_reduction!r}")
    distributed.check_process_group(group, device)
    _check_global_vocab_size(vocab_size)
    # What every rank knows alike of the whole vocabulary sizes the token blocks (vocab_parallel.py).
    global_vocab = global_rows or vocab_size or -1
    _check_labels_for(spec, labels, 2)  # this rank sees a slice: dkd's V ≥ 2 holds for the whole
    parallel = registry.select("fused_linear_vocab_parallel", backend, device, dtypes, spec.features)
    if fp32_logits is None:
        fp32_logits = block_logits.default_fp32(device)
    return FusedLinearOptions(spec, missing_mass, ignore_index, hard_weight != 0, parallel,
                              parallel if hard_weight != 0 else "", fp32_logits, return_entropy, group.group_name,
                              -1 if vocab_size is None else vocab_size, grad_hidden_reduction == "sum", global_vocab)


def fused_linear_sparse_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_indices: Tensor,
    teacher_logprobs: Tensor,
    labels: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    vocab_size: Optional[int] = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: Optional[float] = None,
    student_logit_scale: Optional[float] = None,
    student_softcap: Optional[float] = None,
    teacher_temperature: float = 1.0,
    missing_mass: str = "renormalize",
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
    process_group=None,
    grad_hidden_reduction: str = "sum",
) -> Union[Tensor, FusedLoss]:
    """:func:`fused_linear_kd_loss` with a sparse top-k teacher (see :func:`sparse_kd_loss`):
    student logits are formed block by block from ``student_hidden`` (…, Hs) and
    ``student_weight`` (V, Hs); ``vocab_size`` leaves padded weight rows out; ids must be below it.
    ``return_components``, ``return_entropy`` and ``fp32_logits`` (the student's logit blocks) are
    those of :func:`fused_linear_kd_loss`; ``beta``, ``teacher_temperature``, ``teacher_mask`` and
    ``pad_id`` are those of :func:`sparse_kd_loss`; ``student_logit_scale`` and ``student_softcap``
    apply to each logit block (and to the hard term, as in :func:`fused_linear_kd_loss`).
    ``backend`` picks the kernels of the top-k divergence and of the hard (cross-entropy) term.
    ``process_group`` and ``grad_hidden_reduction``: as for :func:`fused_linear_kd_loss` (this
    rank's rows of the student's lm_head; DTensor weights placed Shard(0)); the teacher's ids are
    global, and each rank gathers the student logits of the ids in its slice: one (k, N) all-reduce
    per step ("tail": + 4 values per token); forward and reverse KL only. ``validate`` then checks
    ids against ``vocab_size`` only when it is given (no rank knows the whole vocabulary on the host)."""
    global_rows = distributed.global_rows(student_weight)
    sharded, replicated, process_group, as_dtensor = distributed.unwrap_sharded_weights(
        dict(student_weight=student_weight, student_bias=student_bias),
        dict(student_hidden=student_hidden, teacher_indices=teacher_indices, teacher_logprobs=teacher_logprobs,
             teacher_mask=teacher_mask, labels=labels), process_group)
    student_weight, student_bias = sharded.values()
    student_hidden, teacher_indices, teacher_logprobs, teacher_mask, labels = replicated.values()
    validation.check_linear("student_hidden", student_hidden, "student_weight", student_weight,
                            "student_bias", student_bias)
    device = student_hidden.device
    leading_shape = student_hidden.shape[:-1]
    if process_group is None:
        if grad_hidden_reduction != "sum":
            raise ValueError(f"grad_hidden_reduction={grad_hidden_reduction!r} needs a process_group (without one "
                             f"there is nothing to reduce over)")
        vocab = _check_vocab_size(vocab_size, student_weight.shape[0], student_weight.shape[0])
    else:
        _check_global_vocab_size(vocab_size)
        vocab = vocab_size if vocab_size is not None else sys.maxsize
        if divergence not in ("forward_kl", "reverse_kl"):
            raise ValueError(f"divergence must be 'forward_kl' or 'reverse_kl' for a top-k teacher with a "
                             f"process_group; got {divergence!r}")
    spec = _sparse_spec(divergence, temperature, missing_mass, teacher_temperature, beta, student_logit_scale,
                        student_softcap)
    teacher_logprobs = _sparse_teacher(teacher_indices, teacher_logprobs, teacher_mask, pad_id, leading_shape,
                                       vocab, student_hidden, validate, teacher_temperature)
    _check_fused_options(labels, leading_shape, device, ignore_index, reduction, normalizer, temperature_squared,
                         soft_weight, hard_weight, return_components, return_entropy, fp32_logits)
    dtypes = (student_hidden.dtype, teacher_logprobs.dtype)
    if process_group is None:
        options = _fused_options(spec, missing_mass, ignore_index, hard_weight, "sparse_kd", backend, device, dtypes,
                                 fp32_logits, return_entropy)
        student_weight, student_bias = _first_rows(student_weight, student_bias, vocab)
    else:
        options = _vocab_parallel_options(process_group, vocab_size, grad_hidden_reduction, labels, spec,
                                          missing_mass, ignore_index, hard_weight, backend, device, dtypes,
                                          fp32_logits, return_entropy, global_rows)
    top_k = teacher_indices.shape[-1]
    teacher = (None, None, None, teacher_indices.reshape(-1, top_k), teacher_logprobs.reshape(-1, top_k))
    if hard_weight == 0:  # rows without teacher entries leave the mean (with a hard term their CE counts)
        labels = rows_with_teacher(labels, teacher_logprobs != -math.inf, ignore_index)
    result = _fused_linear(student_hidden, student_weight, student_bias, teacher, labels, options, soft_weight,
                           hard_weight, temperature_squared, reduction, normalizer,
                           return_components or return_entropy)
    if as_dtensor is None:
        return result
    return as_dtensor(result) if isinstance(result, Tensor) else result._replace(loss=as_dtensor(result.loss))


def _check_global_vocab_size(vocab_size):
    # With a process group the whole vocabulary's size is known on the device only (no host
    # synchronisation): a vocab_size at or above it masks nothing.
    if vocab_size is None:
        return
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int or None; got {type(vocab_size).__name__}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be at least 1; got {vocab_size}")


def _fused_options(spec, missing_mass, ignore_index, hard_weight, soft_family, backend, device, dtypes, fp32_logits,
                   with_entropy):
    """The FusedLinearOptions of a call: the soft family's backend, and the ce family's when there
    is a hard term, each chosen by the registry."""
    # A top-k teacher's kernels never see the student's scale and soft-cap: the driver applies them
    # to each logit block (kernels/fused_linear/driver.py: SparseTeacher).
    features = spec.features - {"logit_scale", "softcap"} if soft_family == "sparse_kd" else spec.features
    soft_backend = registry.select(soft_family, backend, device, dtypes, features)
    ce_backend = registry.select("ce", backend, device, dtypes[:1]) if hard_weight != 0 else ""
    if fp32_logits is None:
        fp32_logits = block_logits.default_fp32(device)
    return FusedLinearOptions(spec, missing_mass, ignore_index, hard_weight != 0, soft_backend, ce_backend,
                              fp32_logits, with_entropy)


def _fused_linear(student_hidden, student_weight, student_bias, teacher, labels, options, soft_weight, hard_weight,
                  temperature_squared, reduction, normalizer, return_components):
    """The op call shared by the dense and sparse fused losses, once the arguments are checked.
    teacher: (hidden, weight, bias, indices, logprobs) with the unused ones None."""
    device = student_hidden.device
    leading_shape = student_hidden.shape[:-1]
    student_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    n_rows = student_hidden.shape[0]
    t_squared = options.spec.temperature ** 2 if temperature_squared else 1.0
    inputs = (student_hidden, student_weight, student_bias, *teacher, flat_labels)

    if reduction == "none":
        soft, hard, entropy = fused_linear_kd_rows(inputs, options)
        soft = (soft * t_squared).reshape(leading_shape)
        hard = hard.reshape(leading_shape)
        loss = soft_weight * soft + hard_weight * hard
        if not return_components:
            return loss
        soft, hard = soft.detach(), hard.detach()
        return FusedLoss(loss, soft, hard, _n_tokens(n_rows, flat_labels, options, device), soft, hard,
                         _entropy(entropy, options, leading_shape))
    dtype = compute_dtype(student_hidden, teacher[0] if teacher[0] is not None else teacher[4])
    weight = row_weight(n_rows, reduction, normalizer, flat_labels, options.ignore_index,
                        torch.empty((), dtype=dtype, device=device))
    soft_scale = _broadcast_rows(weight * (soft_weight * t_squared), n_rows, dtype, device)
    hard_scale = _broadcast_rows(weight * hard_weight, n_rows, dtype, device)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and student_hidden.requires_grad, grad_on and student_weight.requires_grad,
             grad_on and student_bias is not None and student_bias.requires_grad)
    loss, soft, hard, entropy, *_ = fused_linear_kd_weighted(inputs, soft_scale, hard_scale, options, needs)
    if not return_components:
        return loss
    soft_per_token = (soft * t_squared).reshape(leading_shape).detach()
    return FusedLoss(loss, (soft.sum() * (weight * t_squared)).detach(), (hard.sum() * weight).detach(),
                     _n_tokens(n_rows, flat_labels, options, device), soft_per_token,
                     hard.reshape(leading_shape).detach(), _entropy(entropy, options, leading_shape))


def _entropy(entropy, options, leading_shape):
    return entropy.reshape(leading_shape).detach() if options.with_entropy else None


def _n_tokens(n_rows, labels, options, device):
    if labels is None:
        return torch.tensor(n_rows, dtype=torch.int64, device=device)
    return (labels != options.ignore_index).sum()


def _check_labels_for(spec, labels, vocab):
    if spec.name != "dkd":
        return
    if labels is None:
        raise ValueError("divergence='dkd' needs labels: each row's target class splits its distribution")
    if vocab < 2:
        raise ValueError(f"divergence='dkd' needs at least two classes; got V={vocab}")


def _check_fused_options(labels, leading_shape, device, ignore_index, reduction, normalizer, temperature_squared,
                         soft_weight, hard_weight, return_components, return_entropy, fp32_logits):
    """The checks the dense and sparse fused losses share."""
    validation.check_row_options(labels, leading_shape, device, ignore_index, reduction, normalizer,
                                 temperature_squared)
    validation.check_finite_number("soft_weight", soft_weight)
    validation.check_finite_number("hard_weight", hard_weight)
    validation.check_flag("return_components", return_components)
    validation.check_flag("return_entropy", return_entropy)
    if fp32_logits is not None:
        validation.check_flag("fp32_logits", fp32_logits)
    if hard_weight != 0 and labels is None:
        raise ValueError("labels are required when hard_weight is not 0 (the hard term is cross-entropy "
                         "against them)")


def _check_vocab_size(vocab_size, student_vocab, teacher_vocab):
    if vocab_size is None:
        if student_vocab != teacher_vocab:
            raise ValueError(f"student_weight has V={student_vocab} rows but teacher_weight has V={teacher_vocab}; "
                             "pass vocab_size= (the real vocabulary) to compare the first vocab_size rows")
        return student_vocab
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int or None; got {type(vocab_size).__name__}")
    if not 1 <= vocab_size <= min(student_vocab, teacher_vocab):
        raise ValueError(f"vocab_size must lie in [1, {min(student_vocab, teacher_vocab)}] (the smaller of the "
                         f"student's V={student_vocab} and the teacher's V={teacher_vocab}); got {vocab_size}")
    return vocab_size


def _first_rows(weight, bias, vocab):
    # Padded lm_head rows are left out by slicing (a view), never by zero logits.
    if weight.shape[0] == vocab:
        return weight, bias
    return weight[:vocab], None if bias is None else bias[:vocab]


def _broadcast_rows(value, n_rows, dtype, device):
    if isinstance(value, torch.Tensor):
        return value.reshape(1).expand(n_rows)
    return torch.full((n_rows,), value, dtype=dtype, device=device)


def _teacher_at_generation(logprobs, teacher_temperature, like):
    # The kernels read the teacher as log-probs at T = 1 (divided by T inside). T_g·log p_g is the
    # teacher's logits up to a per-row constant, so that is what they get; in the compute dtype,
    # as a bf16 product would round. T_g = 1 (the default) costs nothing.
    if teacher_temperature == 1.0:
        return logprobs
    return logprobs.to(compute_dtype(like, logprobs)) * float(teacher_temperature)


def rows_with_teacher(labels, present, ignore_index):
    """The labels a reduction counts rows with: ``labels`` (or all rows counted, for None) with
    ``ignore_index`` where a row has no present teacher entry (present: (…, k) bool), so such a
    row leaves the mean like an ignored one. No host synchronisation."""
    has_teacher = present.any(-1)
    if labels is None:
        return torch.where(has_teacher, 0, ignore_index)
    return labels.masked_fill(~has_teacher.reshape(labels.shape), ignore_index)


def _sparse_teacher(indices, logprobs, mask, pad_id, leading_shape, vocab, student, validate, teacher_temperature):
    """Checks a top-k teacher and returns its log-probs as the kernels read them: -inf at absent
    entries, at the generation temperature (see _teacher_at_generation)."""
    validation.check_flag("validate", validate)
    validation.check_sparse_teacher(indices, logprobs, leading_shape, vocab, student.device)
    sparse_inputs.check_mask(mask, indices)
    sparse_inputs.check_pad_id(pad_id)
    logprobs = sparse_inputs.logprobs_with_absent(indices, logprobs, mask, pad_id)
    if validate:
        validation.check_sparse_values(indices, logprobs, vocab)
    return _teacher_at_generation(logprobs, teacher_temperature, student)


def _sparse_spec(divergence, temperature, missing_mass, teacher_temperature=1.0, beta=None, student_logit_scale=None,
                 student_softcap=None):
    if divergence not in SPARSE_DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(SPARSE_DIVERGENCES)} with a sparse teacher; "
                         f"got {divergence!r}")
    if missing_mass not in MISSING_MASS:
        raise ValueError(f"missing_mass must be one of {', '.join(map(repr, MISSING_MASS))}; got {missing_mass!r}")
    spec = make_spec(divergence, temperature, beta, student_logit_scale=student_logit_scale,
                     student_softcap=student_softcap)
    if isinstance(teacher_temperature, bool) or not isinstance(teacher_temperature, (int, float)):
        raise TypeError(f"teacher_temperature must be a Python number; got {type(teacher_temperature).__name__}")
    if not (math.isfinite(teacher_temperature) and teacher_temperature > 0):
        raise ValueError(f"teacher_temperature must be a finite number > 0 (the temperature the log-probs were "
                         f"computed at); got {teacher_temperature}")
    if missing_mass == "tail" and spec.temperature != teacher_temperature:
        raise ValueError(f"missing_mass='tail' needs temperature == teacher_temperature (the teacher's leftover "
                         f"mass at another temperature than the one its log-probs were computed at is unknown from "
                         f"its top-k); got temperature={temperature}, teacher_temperature={teacher_temperature}")
    return spec
