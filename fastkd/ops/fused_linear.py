"""Custom ops for the fused linear KD losses (dense or top-k teacher): schemas, fakes, autograd.

Two forms share backends/fused_linear.py:
  * ``fused_linear_kd_weighted``: for scalar reductions. The forward already knows each row's
    weight in the final loss, so it computes the gradients while the logit blocks are at hand
    (four GEMMs in all with a dense teacher) and the backward only scales them.
  * ``fused_linear_kd_rows``: per-row losses (reduction="none"). An arbitrary grad_output is only
    known in the backward, which recomputes the logit blocks (two more GEMMs).
The teacher is dense (teacher_hidden, teacher_weight, teacher_bias) or sparse (teacher_indices,
teacher_logprobs, with ``missing_mass``); the other teacher tensors are None.
"""

from typing import Optional

import torch

from ..backends import fused_linear, torch_ref
from ..divergences import DivergenceSpec

Tensor = torch.Tensor
N_TENSORS = 9  # student hidden/weight/bias, teacher hidden/weight/bias/indices/logprobs, labels


def _run(tensors, options, soft_scale=None, hard_scale=None, need=(False, False, False)):
    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
     teacher_indices, teacher_logprobs, labels) = tensors
    divergence, temperature, param, missing_mass, ignore_index, with_hard, backend = options
    spec = DivergenceSpec(divergence, temperature, param)
    run_options = fused_linear.FusedLinearOptions(ignore_index, with_hard, backend)
    if teacher_indices is None:
        teacher = fused_linear.DenseTeacher(teacher_hidden, teacher_weight, teacher_bias, spec, run_options)
    else:
        teacher = fused_linear.SparseTeacher(teacher_indices, teacher_logprobs, spec, missing_mass, run_options)
    return fused_linear.run(student_hidden, student_weight, student_bias, teacher, labels, run_options,
                            soft_scale, hard_scale, need)


def _row_dtype(student_hidden, teacher_hidden, teacher_logprobs):
    teacher = teacher_hidden if teacher_hidden is not None else teacher_logprobs
    return torch_ref.compute_dtype(student_hidden, teacher)


def _or_empty(grads, like):
    # Custom ops return tensors, never None; gradients not asked for travel as distinct empties.
    return tuple(like.new_empty(0) if grad is None else grad for grad in grads)


def _fake_grads(student_hidden, student_weight, student_bias, need_hidden, need_weight, need_bias, like):
    return _or_empty((student_hidden.new_empty(student_hidden.shape) if need_hidden else None,
                      student_weight.new_empty(student_weight.shape) if need_weight else None,
                      student_bias.new_empty(student_bias.shape) if need_bias else None), like)


@torch.library.custom_op("fastkd::fused_linear_kd_weighted", mutates_args=())
def fused_linear_kd_weighted(
    student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
    teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
    teacher_indices: Optional[Tensor], teacher_logprobs: Optional[Tensor], labels: Optional[Tensor],
    soft_scale: Tensor, hard_scale: Tensor,
    divergence: str, temperature: float, param: float, missing_mass: str, ignore_index: int, with_hard: bool,
    backend: str, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss = Σ soft_scale·soft + hard_scale·hard, soft (N,), hard (N,), grad_hidden,
    grad_weight, grad_bias); a gradient not asked for is an empty tensor."""
    tensors = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
               teacher_indices, teacher_logprobs, labels)
    options = (divergence, temperature, param, missing_mass, ignore_index, with_hard, backend)
    soft, hard, *grads = _run(tensors, options, soft_scale, hard_scale, (need_hidden, need_weight, need_bias))
    loss = (soft * soft_scale.to(soft.dtype)).sum() + (hard * hard_scale.to(hard.dtype)).sum()
    return (loss, soft, hard, *_or_empty(grads, soft))


@fused_linear_kd_weighted.register_fake
def _weighted_fake(student_hidden, student_weight, student_bias, teacher_hidden, *args):
    need_hidden, need_weight, need_bias = args[-3:]
    dtype = _row_dtype(student_hidden, teacher_hidden, args[3])
    n_rows = student_hidden.shape[0]
    grads = _fake_grads(student_hidden, student_weight, student_bias, need_hidden, need_weight, need_bias,
                        student_hidden.new_empty(0, dtype=dtype))
    return (student_hidden.new_empty((), dtype=dtype), student_hidden.new_empty(n_rows, dtype=dtype),
            student_hidden.new_empty(n_rows, dtype=dtype), *grads)


def _weighted_setup(ctx, inputs, output):
    ctx.needs = inputs[-3:]
    ctx.save_for_backward(*output[3:])


def _weighted_backward(ctx, grad_loss, *unused):
    grads = ctx.saved_tensors
    scaled = tuple(grad_loss * grad if need else None for grad, need in zip(grads, ctx.needs))
    return (*scaled, *([None] * 18))


fused_linear_kd_weighted.register_autograd(_weighted_backward, setup_context=_weighted_setup)


@torch.library.custom_op("fastkd::fused_linear_kd_rows", mutates_args=())
def fused_linear_kd_rows(
    student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
    teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
    teacher_indices: Optional[Tensor], teacher_logprobs: Optional[Tensor], labels: Optional[Tensor],
    divergence: str, temperature: float, param: float, missing_mass: str, ignore_index: int, with_hard: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Returns per-row (soft, hard) losses, (N,) each."""
    tensors = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
               teacher_indices, teacher_logprobs, labels)
    options = (divergence, temperature, param, missing_mass, ignore_index, with_hard, backend)
    soft, hard, *_ = _run(tensors, options)
    return soft, hard


@fused_linear_kd_rows.register_fake
def _rows_fake(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
               teacher_indices, teacher_logprobs, *args):
    dtype = _row_dtype(student_hidden, teacher_hidden, teacher_logprobs)
    n_rows = student_hidden.shape[0]
    return student_hidden.new_empty(n_rows, dtype=dtype), student_hidden.new_empty(n_rows, dtype=dtype)


@torch.library.custom_op("fastkd::fused_linear_kd_rows_backward", mutates_args=())
def fused_linear_kd_rows_backward(
    grad_soft: Tensor, grad_hard: Tensor,
    student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
    teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
    teacher_indices: Optional[Tensor], teacher_logprobs: Optional[Tensor], labels: Optional[Tensor],
    divergence: str, temperature: float, param: float, missing_mass: str, ignore_index: int, with_hard: bool,
    backend: str, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Recomputes the logit blocks; returns (grad_hidden, grad_weight, grad_bias), empty where not asked."""
    tensors = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
               teacher_indices, teacher_logprobs, labels)
    options = (divergence, temperature, param, missing_mass, ignore_index, with_hard, backend)
    _, _, *grads = _run(tensors, options, grad_soft, grad_hard, (need_hidden, need_weight, need_bias))
    return _or_empty(grads, student_hidden)


@fused_linear_kd_rows_backward.register_fake
def _rows_backward_fake(grad_soft, grad_hard, student_hidden, student_weight, student_bias, *args):
    return _fake_grads(student_hidden, student_weight, student_bias, *args[-3:], student_hidden)


def _rows_setup(ctx, inputs, output):
    tensors, options = inputs[:N_TENSORS], inputs[N_TENSORS:]
    ctx.save_for_backward(*tensors)
    ctx.options = options
    ctx.needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                 tensors[2] is not None and ctx.needs_input_grad[2])


def _rows_backward(ctx, grad_soft, grad_hard):
    grads = fused_linear_kd_rows_backward(grad_soft.contiguous(), grad_hard.contiguous(), *ctx.saved_tensors,
                                          *ctx.options, *ctx.needs)
    return (*(grad if need else None for grad, need in zip(grads, ctx.needs)), *([None] * 13))


fused_linear_kd_rows.register_autograd(_rows_backward, setup_context=_rows_setup)
