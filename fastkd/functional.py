"""Public loss functions: argument checks, then one custom-op call each."""

import torch

from . import validation
from .divergences import make_spec
from .kernels import registry
from .kernels.layout import as_rows, compute_dtype
from .kernels.sparse.contract import MISSING_MASS, SPARSE_DIVERGENCES
from .ops import fused_linear_kd_rows, fused_linear_kd_weighted, kd_rows, sparse_kd_rows
from .options import FusedLinearOptions, KDOptions, SparseOptions
from .reduction import reduce_rows, row_weight


def kd_loss(
    student_logits,
    teacher_logits,
    *,
    divergence="forward_kl",
    temperature=1.0,
    beta=0.5,
    skew=0.1,
    temperature_squared=False,
    labels=None,
    ignore_index=-100,
    reduction="mean",
    normalizer=None,
    backend="auto",
):
    """Knowledge-distillation divergence between teacher and student temperature softmaxes.

    Args:
        student_logits: (…, V) fp32|fp16|bf16|fp64. Receives the gradient.
        teacher_logits: (…, V), same shape and device; any float dtype. A constant: no gradient.
        divergence: "forward_kl" KL(p‖q), "reverse_kl" KL(q‖p), "jsd" (with ``beta``),
            "skew_forward_kl" / "skew_reverse_kl" (with ``skew``) or "tvd"; p is the teacher's
            softmax(teacher / T), q the student's. See fastkd/divergences.py for the formulas.
        temperature: T > 0, applied to both logits.
        beta: JSD mixture weight in [0, 1] (TRL convention; 0 is forward KL, 1 reverse KL).
        skew: skew-KL mixture weight in (0, 1).
        temperature_squared: multiply the loss by T² (Hinton et al.).
        labels: (…) integer tensor; rows equal to ``ignore_index`` contribute nothing.
        reduction: "mean" over non-ignored rows, "sum", or "none" for per-row losses of shape (…).
        normalizer: divisor replacing the row count of "mean" (e.g. ``num_items_in_batch``);
            a number or a one-element tensor.
        backend: "auto", "torch", "triton" or "native"; see ``fastkd.available_backends()``.

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or shape (…) for "none".
    """
    validation.check_logits("student_logits", student_logits)
    validation.check_logits("teacher_logits", teacher_logits)
    validation.check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    device = student_logits.device
    leading_shape = student_logits.shape[:-1]
    validation.check_row_options(labels, leading_shape, device, ignore_index, reduction, normalizer,
                                 temperature_squared)
    spec = make_spec(divergence, temperature, beta, skew)
    backend = registry.select("kd_rows", backend, device, (student_logits.dtype, teacher_logits.dtype))
    options = KDOptions(spec.name, spec.temperature, spec.param, ignore_index, backend)

    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    row_loss = kd_rows(as_rows(student_logits), as_rows(teacher_logits), flat_labels, options)[0]
    if temperature_squared:
        row_loss = row_loss * (spec.temperature ** 2)
    return reduce_rows(row_loss, leading_shape, reduction, normalizer, flat_labels, ignore_index)


def fused_linear_kd_loss(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels=None,
    *,
    student_bias=None,
    teacher_bias=None,
    soft_weight=1.0,
    hard_weight=0.0,
    vocab_size=None,
    divergence="forward_kl",
    temperature=1.0,
    beta=0.5,
    skew=0.1,
    temperature_squared=False,
    ignore_index=-100,
    reduction="mean",
    normalizer=None,
    backend="auto",
):
    """Distillation loss from hidden states and lm_head weights, never forming the (N, V) logits.

    Per token: ``soft_weight · D(student, teacher) (· T² if temperature_squared) + hard_weight ·
    CE(student logits at T = 1, labels)`` with D any ``kd_loss`` divergence, then reduced as in
    :func:`kd_loss`. Logits are formed block by block inside the op.

    Args:
        student_hidden: (…, Hs) fp32|fp16|bf16|fp64; student_weight: (V, Hs); student_bias: (V,) or None.
            These receive gradients.
        teacher_hidden: (…, Ht) with the student's leading shape; teacher_weight: (V', Ht);
            teacher_bias: (V',) or None. Constants: no gradient.
        labels: (…) integer token ids, required when ``hard_weight`` is not 0; rows equal to
            ``ignore_index`` contribute nothing to either term.
        vocab_size: the real vocabulary size when the lm_head weights are padded: rows ≥ vocab_size
            are left out of both softmaxes (they get a zero gradient). Required when V ≠ V'.
        The other options are those of :func:`kd_loss`.

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or shape (…) for "none".
    """
    return _fused_linear(*_checked_dense_arguments(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
        soft_weight, hard_weight, vocab_size, divergence, temperature, beta, skew, temperature_squared,
        ignore_index, reduction, normalizer, backend))


def _checked_dense_arguments(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
                             teacher_bias, soft_weight, hard_weight, vocab_size, divergence, temperature, beta, skew,
                             temperature_squared, ignore_index, reduction, normalizer, backend):
    """Checks fused_linear_kd_loss's arguments; returns _fused_linear's positional arguments."""
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
    vocab = _check_vocab_size(vocab_size, student_weight.shape[0], teacher_weight.shape[0])
    _check_fused_options(labels, leading_shape, device, ignore_index, reduction, normalizer, temperature_squared,
                         soft_weight, hard_weight)
    spec = make_spec(divergence, temperature, beta, skew)
    dtypes = (student_hidden.dtype, teacher_hidden.dtype)
    options = _fused_options(spec, "renormalize", ignore_index, hard_weight, "kd_rows", backend, device, dtypes)

    student_weight, student_bias = _first_rows(student_weight, student_bias, vocab)
    teacher_weight, teacher_bias = _first_rows(teacher_weight, teacher_bias, vocab)
    teacher = (teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight, teacher_bias, None, None)
    return (student_hidden, student_weight, student_bias, teacher, labels, options, soft_weight, hard_weight,
            temperature_squared, reduction, normalizer)


def _fused_options(spec, missing_mass, ignore_index, hard_weight, soft_family, backend, device, dtypes):
    """The FusedLinearOptions of a call: the soft family's backend, and the ce family's when there
    is a hard term, each chosen by the registry."""
    soft_backend = registry.select(soft_family, backend, device, dtypes)
    ce_backend = registry.select("ce", backend, device, dtypes[:1]) if hard_weight != 0 else ""
    return FusedLinearOptions(spec.name, spec.temperature, spec.param, missing_mass, ignore_index, hard_weight != 0,
                              soft_backend, ce_backend)


def _fused_linear(student_hidden, student_weight, student_bias, teacher, labels, options, soft_weight, hard_weight,
                  temperature_squared, reduction, normalizer, with_components=False):
    """The op call shared by the dense and sparse fused losses, once the arguments are checked.
    teacher: (hidden, weight, bias, indices, logprobs) with the unused ones None. With
    ``with_components`` (scalar reductions) also returns the reduced soft and hard terms, detached."""
    device = student_hidden.device
    leading_shape = student_hidden.shape[:-1]
    student_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    soft_factor = soft_weight * (options.temperature ** 2 if temperature_squared else 1.0)
    inputs = (student_hidden, student_weight, student_bias, *teacher, flat_labels)

    if reduction == "none":
        soft, hard = fused_linear_kd_rows(inputs, options)
        return (soft_factor * soft + hard_weight * hard).reshape(leading_shape)
    n_rows = student_hidden.shape[0]
    dtype = compute_dtype(student_hidden, teacher[0] if teacher[0] is not None else teacher[4])
    weight = row_weight(n_rows, reduction, normalizer, flat_labels, options.ignore_index,
                        torch.empty((), dtype=dtype, device=device))
    soft_scale = _broadcast_rows(weight * soft_factor, n_rows, dtype, device)
    hard_scale = _broadcast_rows(weight * hard_weight, n_rows, dtype, device)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and student_hidden.requires_grad, grad_on and student_weight.requires_grad,
             grad_on and student_bias is not None and student_bias.requires_grad)
    loss, soft, hard, *_ = fused_linear_kd_weighted(inputs, soft_scale, hard_scale, options, needs)
    if not with_components:
        return loss
    return loss, (soft.sum() * weight).detach(), (hard.sum() * weight).detach()


def _check_fused_options(labels, leading_shape, device, ignore_index, reduction, normalizer, temperature_squared,
                         soft_weight, hard_weight):
    """The checks the dense and sparse fused losses share."""
    validation.check_row_options(labels, leading_shape, device, ignore_index, reduction, normalizer,
                                 temperature_squared)
    validation.check_finite_number("soft_weight", soft_weight)
    validation.check_finite_number("hard_weight", hard_weight)
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


def sparse_kd_loss(
    student_logits,
    teacher_indices,
    teacher_logprobs,
    *,
    divergence="forward_kl",
    temperature=1.0,
    missing_mass="renormalize",
    temperature_squared=False,
    labels=None,
    ignore_index=-100,
    reduction="mean",
    normalizer=None,
    validate=True,
    backend="auto",
):
    """Divergence between the student and a sparse (top-k, offline) teacher.

    Args:
        student_logits: (…, V) fp32|fp16|bf16|fp64. Receives the gradient.
        teacher_indices: (…, k) int, the teacher's top-k token ids per row (distinct, in [0, V)).
        teacher_logprobs: (…, k) float, their log-probabilities under the teacher (as stored by
            offline runs or returned by inference servers).
        divergence: "forward_kl" KL(p‖q) or "reverse_kl" KL(q‖p).
        missing_mass: "renormalize": both distributions restricted to the top-k support and
            renormalised there; "tail": the teacher's leftover mass 1 − Σp is one more bucket,
            compared with the student's mass outside the support (temperature must be 1).
            See fastkd/kernels/sparse/torch.py.
        temperature: divides the student logits and the teacher log-probs.
        validate: check the ids and log-probs' values (out of range, repeated ids, positive
            log-probs). This reads them on the host (a few synchronisations); pass False in hot
            loops once the data is trusted.
        backend: "auto", "torch", "triton" or "native" (see ``fastkd.available_backends()["sparse_kd"]``).
        The other options are those of :func:`kd_loss`.
    """
    validation.check_logits("student_logits", student_logits)
    leading_shape = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    spec = _sparse_spec(divergence, temperature, missing_mass)
    validation.check_sparse_teacher(teacher_indices, teacher_logprobs, leading_shape, vocab, student_logits.device,
                                    validate)
    validation.check_row_options(labels, leading_shape, student_logits.device, ignore_index, reduction, normalizer,
                                 temperature_squared)
    backend = registry.select("sparse_kd", backend, student_logits.device,
                              (student_logits.dtype, teacher_logprobs.dtype))
    options = SparseOptions(spec.name, spec.temperature, missing_mass, ignore_index, backend)

    top_k = teacher_indices.shape[-1]
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    row_loss = sparse_kd_rows(student_logits.reshape(-1, vocab), teacher_indices.reshape(-1, top_k),
                              teacher_logprobs.reshape(-1, top_k), flat_labels, options)
    if temperature_squared:
        row_loss = row_loss * (spec.temperature ** 2)
    return reduce_rows(row_loss, leading_shape, reduction, normalizer, flat_labels, ignore_index)


def fused_linear_sparse_kd_loss(
    student_hidden,
    student_weight,
    teacher_indices,
    teacher_logprobs,
    labels=None,
    *,
    student_bias=None,
    soft_weight=1.0,
    hard_weight=0.0,
    vocab_size=None,
    divergence="forward_kl",
    temperature=1.0,
    missing_mass="renormalize",
    temperature_squared=False,
    ignore_index=-100,
    reduction="mean",
    normalizer=None,
    validate=True,
    backend="auto",
):
    """:func:`fused_linear_kd_loss` with a sparse top-k teacher (see :func:`sparse_kd_loss`):
    student logits are formed block by block from ``student_hidden`` (…, Hs) and
    ``student_weight`` (V, Hs); ``vocab_size`` leaves padded weight rows out; ids must be below it.
    ``backend`` picks the kernels of the top-k divergence and of the hard (cross-entropy) term."""
    validation.check_linear("student_hidden", student_hidden, "student_weight", student_weight,
                            "student_bias", student_bias)
    device = student_hidden.device
    leading_shape = student_hidden.shape[:-1]
    vocab = _check_vocab_size(vocab_size, student_weight.shape[0], student_weight.shape[0])
    spec = _sparse_spec(divergence, temperature, missing_mass)
    validation.check_sparse_teacher(teacher_indices, teacher_logprobs, leading_shape, vocab, device, validate)
    _check_fused_options(labels, leading_shape, device, ignore_index, reduction, normalizer, temperature_squared,
                         soft_weight, hard_weight)
    options = _fused_options(spec, missing_mass, ignore_index, hard_weight, "sparse_kd", backend, device,
                             (student_hidden.dtype, teacher_logprobs.dtype))

    student_weight, student_bias = _first_rows(student_weight, student_bias, vocab)
    top_k = teacher_indices.shape[-1]
    teacher = (None, None, None, teacher_indices.reshape(-1, top_k), teacher_logprobs.reshape(-1, top_k))
    return _fused_linear(student_hidden, student_weight, student_bias, teacher, labels, options, soft_weight,
                         hard_weight, temperature_squared, reduction, normalizer)


def _sparse_spec(divergence, temperature, missing_mass):
    if divergence not in SPARSE_DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(SPARSE_DIVERGENCES)} with a sparse teacher; "
                         f"got {divergence!r}")
    if missing_mass not in MISSING_MASS:
        raise ValueError(f"missing_mass must be one of {', '.join(map(repr, MISSING_MASS))}; got {missing_mass!r}")
    spec = make_spec(divergence, temperature)
    if missing_mass == "tail" and spec.temperature != 1.0:
        raise ValueError(f"missing_mass='tail' needs temperature=1 (the teacher's leftover mass at another "
                         f"temperature is unknown from its top-k); got temperature={temperature}")
    return spec
