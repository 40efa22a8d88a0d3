"""Custom ops of the fused linear losses (dense or top-k teacher): schemas, fakes, autograd.

Two forms share the block driver (kernels/fused_linear/driver.py):
  * ``fused_linear_kd_weighted``: for scalar reductions. The forward already knows each row's
    weight in the final loss, so it computes the gradients while the logit blocks are at hand
    (four GEMMs in all with a dense teacher) and the backward only scales them.
  * ``fused_linear_kd_rows``: per-row losses (reduction="none"). An arbitrary grad_output is only
    known in the backward, which recomputes the logit blocks (two more GEMMs).
The teacher is dense (teacher_hidden, teacher_weight, teacher_bias) or sparse (teacher_indices,
teacher_logprobs; or, with options.sampled, sampled ids and their weights in those two slots); the other
teacher tensors are None. Both also return the student's entropy per
row when options.with_entropy (else an empty tensor): a logged value, without a gradient.
"""

import dataclasses

from ..kernels.fused_linear import driver
from ..kernels.layout import compute_dtype
from ..options import FusedLinearOptions
from .schema import define, flatten, unflatten

_TENSORS = ("Tensor student_hidden, Tensor student_weight, Tensor? student_bias, Tensor? teacher_hidden, "
            "Tensor? teacher_weight, Tensor? teacher_bias, Tensor? teacher_indices, Tensor? teacher_logprobs, "
            "Tensor? labels")
_N_TENSORS = _TENSORS.count("Tensor")
_NEEDS = "bool need_hidden, bool need_weight, bool need_bias"


def _run(tensors, options, soft_scale=None, hard_scale=None, need=(False, False, False)):
    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
     teacher_indices, teacher_logprobs, labels) = tensors
    if teacher_indices is None:
        teacher = driver.DenseTeacher(teacher_hidden, teacher_weight, teacher_bias)
    elif options.sampled:  # teacher_logprobs holds the sampled ids' weights
        teacher = driver.SampledTeacher(teacher_indices, teacher_logprobs)
    else:
        teacher = driver.SparseTeacher(teacher_indices, teacher_logprobs)
    return driver.run(student_hidden, student_weight, student_bias, teacher, labels, options, soft_scale,
                      hard_scale, need)


def _row_dtype(tensors):
    student_hidden, teacher_hidden, teacher_logprobs = tensors[0], tensors[3], tensors[7]
    return compute_dtype(student_hidden, teacher_hidden if teacher_hidden is not None else teacher_logprobs)


def _or_empty(grads, like):
    # Custom ops return tensors, never None; gradients not asked for travel as distinct empties.
    return tuple(like.new_empty(0) if grad is None else grad for grad in grads)


def _fake_grads(tensors, needs, like):
    student_hidden, student_weight, student_bias = tensors[:3]
    return _or_empty(tuple(tensor.new_empty(tensor.shape) if need else None
                           for tensor, need in zip((student_hidden, student_weight, student_bias), needs)), like)


@define("fused_linear_kd_weighted", f"{_TENSORS}, Tensor soft_scale, Tensor hard_scale", FusedLinearOptions,
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)", extra=_NEEDS)
def _weighted(*args):
    """Returns (loss = Σ soft_scale·soft + hard_scale·hard, soft (N,), hard (N,), entropy (N,) or
    empty, grad_hidden, grad_weight, grad_bias); a gradient not asked for is an empty tensor."""
    tensors, (soft_scale, hard_scale), rest = args[:_N_TENSORS], args[_N_TENSORS:_N_TENSORS + 2], args[_N_TENSORS + 2:]
    options, needs = unflatten(FusedLinearOptions, rest)
    soft, hard, entropy, *grads = _run(tensors, options, soft_scale, hard_scale, needs)
    loss = (soft * soft_scale.to(soft.dtype)).sum() + (hard * hard_scale.to(hard.dtype)).sum()
    return (loss, soft, hard, *_or_empty((entropy, *grads), soft))


def _fake_rows(tensors, options):
    """Fakes of the per-row outputs (soft, hard, entropy)."""
    dtype = _row_dtype(tensors)
    n_rows = tensors[0].shape[0]
    return tuple(tensors[0].new_empty(n_rows if wanted else 0, dtype=dtype)
                 for wanted in (True, True, options.with_entropy))


@_weighted.register_fake
def _weighted_fake(*args):
    tensors, needs = args[:_N_TENSORS], args[-3:]
    options, _ = unflatten(FusedLinearOptions, args[_N_TENSORS + 2:])
    dtype = _row_dtype(tensors)
    student_hidden = tensors[0]
    grads = _fake_grads(tensors, needs, student_hidden.new_empty(0, dtype=dtype))
    return (student_hidden.new_empty((), dtype=dtype), *_fake_rows(tensors, options), *grads)


def _weighted_setup(ctx, inputs, output):
    ctx.needs = inputs[-3:]
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(output[3])
    ctx.save_for_backward(*output[4:])


def _weighted_backward(ctx, grad_loss, *unused):
    scaled = tuple(grad_loss * grad if need else None for grad, need in zip(ctx.saved_tensors, ctx.needs))
    return scaled + (None,) * (ctx.n_inputs - len(scaled))


_weighted.register_autograd(_weighted_backward, setup_context=_weighted_setup)


@define("fused_linear_kd_rows", _TENSORS, FusedLinearOptions, "(Tensor, Tensor, Tensor)")
def _rows(*args):
    """Returns per-row (soft, hard) losses, (N,) each, and the entropy (N,) or an empty tensor."""
    options, _ = unflatten(FusedLinearOptions, args[_N_TENSORS:])
    soft, hard, entropy, *_ = _run(args[:_N_TENSORS], options)
    return soft, hard, soft.new_empty(0) if entropy is None else entropy


@_rows.register_fake
def _rows_fake(*args):
    options, _ = unflatten(FusedLinearOptions, args[_N_TENSORS:])
    return _fake_rows(args[:_N_TENSORS], options)


@define("fused_linear_kd_rows_backward", f"Tensor grad_soft, Tensor grad_hard, {_TENSORS}", FusedLinearOptions,
        "(Tensor, Tensor, Tensor)", extra=_NEEDS)
def _rows_backward(grad_soft, grad_hard, *args):
    """Recomputes the logit blocks; returns (grad_hidden, grad_weight, grad_bias), empty where not asked."""
    tensors = args[:_N_TENSORS]
    options, needs = unflatten(FusedLinearOptions, args[_N_TENSORS:])
    options = dataclasses.replace(options, with_entropy=False)  # logged in the forward only
    _, _, _, *grads = _run(tensors, options, grad_soft, grad_hard, needs)
    return _or_empty(grads, tensors[0])


@_rows_backward.register_fake
def _rows_backward_fake(grad_soft, grad_hard, *args):
    return _fake_grads(args[:_N_TENSORS], args[-3:], args[0])


def _rows_setup(ctx, inputs, output):
    tensors = inputs[:_N_TENSORS]
    ctx.save_for_backward(*tensors)
    ctx.options = tuple(inputs[_N_TENSORS:])
    ctx.n_inputs = len(inputs)
    ctx.needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                 tensors[2] is not None and ctx.needs_input_grad[2])
    ctx.mark_non_differentiable(output[2])


def _rows_autograd_backward(ctx, grad_soft, grad_hard, grad_entropy):
    grads = _rows_backward(grad_soft.contiguous(), grad_hard.contiguous(), *ctx.saved_tensors, *ctx.options,
                           *ctx.needs)
    grads = tuple(grad if need else None for grad, need in zip(grads, ctx.needs))
    return grads + (None,) * (ctx.n_inputs - len(grads))


_rows.register_autograd(_rows_autograd_backward, setup_context=_rows_setup)


def fused_linear_kd_weighted(tensors, soft_scale, hard_scale, options, needs):
    """tensors: the nine tensors of the schema (None where absent); soft_scale, hard_scale: (N,).
    Returns (loss, soft (N,), hard (N,), entropy (N,) or empty, grad_hidden, grad_weight, grad_bias)."""
    return _weighted(*tensors, soft_scale, hard_scale, *flatten(options), *needs)


def fused_linear_kd_rows(tensors, options):
    """Per-row (soft, hard) losses, (N,) each, differentiable through a recomputing backward, and
    the entropy (N,) (empty without options.with_entropy), not differentiable."""
    return _rows(*tensors, *flatten(options))
