"""Public loss functions: argument checks, then one custom-op call each."""

import torch

from . import validation
from .backends import resolve_backend
from .divergences import make_spec
from .ops import fused_linear_kd_rows, fused_linear_kd_weighted, kd_rows
from .reduction import as_rows, reduce_rows, row_weight


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
        backend: "auto", "torch", "triton", "cpu" or "cuda"; see ``fastkd.available_backends()``.

    Returns:
        The loss in float32 (float64 for float64 inputs): a scalar, or shape (…) for "none".
    """
    validation.check_logits("student_logits", student_logits)
    validation.check_logits("teacher_logits", teacher_logits)
    validation.check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    device = student_logits.device
    leading_shape = student_logits.shape[:-1]
    validation.check_labels(labels, leading_shape, device)
    validation.check_ignore_index(ignore_index)
    validation.check_reduction(reduction, normalizer, device)
    validation.check_flag("temperature_squared", temperature_squared)
    spec = make_spec(divergence, temperature, beta, skew)
    backend = resolve_backend(backend, device, (student_logits.dtype, teacher_logits.dtype))

    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    row_loss = kd_rows(as_rows(student_logits), as_rows(teacher_logits), flat_labels, spec.name,
                       spec.temperature, spec.param, ignore_index, backend)[0]
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
        student_hidden: (…, Hs) fp32|fp16|bf16; student_weight: (V, Hs); student_bias: (V,) or None.
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
    validation.check_labels(labels, leading_shape, device)
    validation.check_ignore_index(ignore_index)
    validation.check_reduction(reduction, normalizer, device)
    validation.check_flag("temperature_squared", temperature_squared)
    validation.check_finite_number("soft_weight", soft_weight)
    validation.check_finite_number("hard_weight", hard_weight)
    if hard_weight != 0 and labels is None:
        raise ValueError("labels are required when hard_weight is not 0 (the hard term is cross-entropy "
                         "against them)")
    spec = make_spec(divergence, temperature, beta, skew)
    backend = resolve_backend(backend, device, (student_hidden.dtype, teacher_hidden.dtype))

    student_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    student_weight, student_bias = _first_rows(student_weight, student_bias, vocab)
    teacher_weight, teacher_bias = _first_rows(teacher_weight, teacher_bias, vocab)
    with_hard = hard_weight != 0
    soft_factor = soft_weight * (spec.temperature ** 2 if temperature_squared else 1.0)
    inputs = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
              flat_labels)
    options = (spec.name, spec.temperature, spec.param, ignore_index, with_hard, backend)

    if reduction == "none":
        soft, hard = fused_linear_kd_rows(*inputs, *options)
        return (soft_factor * soft + hard_weight * hard).reshape(leading_shape)
    n_rows = student_hidden.shape[0]
    dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    weight = row_weight(n_rows, reduction, normalizer, flat_labels, ignore_index,
                        torch.empty((), dtype=dtype, device=device))
    soft_scale = _broadcast_rows(weight * soft_factor, n_rows, dtype, device)
    hard_scale = _broadcast_rows(weight * hard_weight, n_rows, dtype, device)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and student_hidden.requires_grad, grad_on and student_weight.requires_grad,
             grad_on and student_bias is not None and student_bias.requires_grad)
    return fused_linear_kd_weighted(*inputs, soft_scale, hard_scale, *options, *needs)[0]


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
