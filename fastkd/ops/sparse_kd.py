"""Custom ops for the divergence against a top-k teacher from full student logits."""

from typing import Optional

import torch

from ..backends import sparse_teacher, torch_ref
from ..divergences import DivergenceSpec

Tensor = torch.Tensor


@torch.library.custom_op("fastkd::sparse_kd_rows", mutates_args=())
def sparse_kd_rows(student: Tensor, teacher_indices: Tensor, teacher_logprobs: Tensor, labels: Optional[Tensor],
                   divergence: str, temperature: float, missing_mass: str, ignore_index: int) -> Tensor:
    """student: (N, V); teacher_indices, teacher_logprobs: (N, k). Returns per-row losses (N,)."""
    spec = DivergenceSpec(divergence, temperature)
    return sparse_teacher.rows_forward(student, teacher_indices, teacher_logprobs, labels, spec, missing_mass,
                                       ignore_index)


@sparse_kd_rows.register_fake
def _rows_fake(student, teacher_indices, teacher_logprobs, *args):
    return student.new_empty(student.shape[0], dtype=torch_ref.compute_dtype(student, teacher_logprobs))


@torch.library.custom_op("fastkd::sparse_kd_rows_backward", mutates_args=())
def sparse_kd_rows_backward(grad_rows: Tensor, student: Tensor, teacher_indices: Tensor, teacher_logprobs: Tensor,
                            labels: Optional[Tensor], divergence: str, temperature: float, missing_mass: str,
                            ignore_index: int) -> Tensor:
    """Returns ∂(Σ grad_rows·loss)/∂student: (N, V), the student's dtype."""
    spec = DivergenceSpec(divergence, temperature)
    return sparse_teacher.rows_backward(grad_rows, student, teacher_indices, teacher_logprobs, labels, spec,
                                        missing_mass, ignore_index)


@sparse_kd_rows_backward.register_fake
def _rows_backward_fake(grad_rows, student, *args):
    return student.new_empty(student.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.options = inputs[4:]


def _backward(ctx, grad_rows):
    grad = None
    if ctx.needs_input_grad[0]:
        grad = sparse_kd_rows_backward(grad_rows.contiguous(), *ctx.saved_tensors, *ctx.options)
    return grad, None, None, None, None, None, None, None


sparse_kd_rows.register_autograd(_backward, setup_context=_setup)
