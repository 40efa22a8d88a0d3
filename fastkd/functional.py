"""Public loss functions: argument checks, then one custom-op call each."""

from . import validation
from .backends import resolve_backend
from .divergences import make_spec
from .ops import kd_rows
from .reduction import as_rows, reduce_rows


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
