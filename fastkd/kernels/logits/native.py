"""Launchers of the compiled kd_rows and kl_div kernels of fastkd._C (csrc/cpu/kd_rows.cpp,
csrc/cuda/kd_rows.cu): the ``native`` backend of those families. Same signatures and outputs as
the torch implementation (logits/torch.py); the tensors' device picks the CPU or CUDA entry point.

Nothing (N, V) is allocated besides the gradient; the forward keeps (N, 5) fp32 statistics.
"""

import torch

from ..layout import row_shape
from ..native_ext import launch, rows_view
from .contract import DIVERGENCE_CODES, KERNEL_DTYPES, N_STATS


def _check_pair(first_name, first, second_name, second):
    for name, x in ((first_name, first), (second_name, second)):
        if x.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{name}: the compiled kernels take float32, float16 or bfloat16; got {x.dtype}")
        if x.dim() not in (2, 3):
            raise ValueError(f"{name} must be (N, V) or (B, T, V); got shape {tuple(x.shape)}")
    if first.shape != second.shape or first.device != second.device:
        raise ValueError(f"{first_name} {tuple(first.shape)} on {first.device} and {second_name} "
                         f"{tuple(second.shape)} on {second.device} must match in shape and device")


def _labels_address(labels, n_rows):
    """(address, keep-alive tensor) of the labels as int64 (N,), or (0, None) without labels."""
    if labels is None:
        return 0, None
    if labels.numel() != n_rows:
        raise ValueError(f"labels must hold one entry per row ({n_rows}); got shape {tuple(labels.shape)}")
    labels = labels.reshape(-1).to(torch.int64).contiguous()
    return labels.data_ptr(), labels


def _spec_tuple(spec):
    return (DIVERGENCE_CODES[spec.name], spec.inv_temperature, spec.param, spec.log_param, spec.log1m_param)


def kd_rows_forward(student, teacher, labels, spec, ignore_index):
    """student, teacher: (N, V) or (B, T, V), fp32|fp16|bf16 (may differ), one device;
    labels: (N,) int or None. Returns (loss (N,), stats (N, 5)) fp32, zeros on ignored rows."""
    _check_pair("student", student, "teacher", teacher)
    n_rows, n_cols, _ = row_shape(student)
    loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    stats = torch.empty(n_rows, N_STATS, dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return loss, stats
    labels_address, _keep = _labels_address(labels, n_rows)
    launch("kd_rows_forward", student.device, n_rows, n_cols, rows_view(student), rows_view(teacher),
           labels_address, ignore_index, _spec_tuple(spec), loss.data_ptr(), stats.data_ptr())
    return loss, stats


def kd_rows_backward(grad_loss, student, teacher, labels, stats, spec, ignore_index):
    """grad_loss: (N,); stats: (N, 5) from the forward.
    Returns ∂output/∂student: contiguous, the student's shape and dtype."""
    _check_pair("student", student, "teacher", teacher)
    n_rows, n_cols, _ = row_shape(student)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    if n_rows == 0:
        return grad
    grad_loss = grad_loss.to(torch.float32).contiguous()  # autograd often hands in an expanded scalar
    stats = stats.to(torch.float32).contiguous()
    if grad_loss.numel() != n_rows or stats.shape != (n_rows, N_STATS):
        raise ValueError(f"grad_loss must be ({n_rows},) and stats ({n_rows}, {N_STATS}); got "
                         f"{tuple(grad_loss.shape)} and {tuple(stats.shape)}")
    labels_address, _keep = _labels_address(labels, n_rows)
    launch("kd_rows_backward", student.device, n_rows, n_cols, rows_view(student), rows_view(teacher),
           labels_address, ignore_index, _spec_tuple(spec), grad_loss.data_ptr(), stats.data_ptr(),
           grad.data_ptr())
    return grad


def kl_div_rows_forward(input, target, log_target):
    """input: (N, V) or (B, T, V) log-probabilities; target: probabilities (log-probabilities if
    log_target), same shape. Returns Σ_V target·(log target − input) per row: (N,) fp32."""
    _check_pair("input", input, "target", target)
    n_rows, n_cols, _ = row_shape(input)
    out = torch.empty(n_rows, dtype=torch.float32, device=input.device)
    if n_rows:
        launch("kl_div_rows_forward", input.device, n_rows, n_cols, rows_view(input), rows_view(target),
               bool(log_target), out.data_ptr())
    return out


def kl_div_rows_backward(grad_rows, input, target, log_target):
    """grad_rows: (N,). Returns −target_prob·grad_rows: contiguous, input's shape and dtype."""
    _check_pair("input", input, "target", target)
    n_rows, n_cols, _ = row_shape(input)
    grad = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    if n_rows:
        grad_rows = grad_rows.to(torch.float32).contiguous()
        launch("kl_div_rows_backward", input.device, n_rows, n_cols, rows_view(input), rows_view(target),
               bool(log_target), grad_rows.data_ptr(), grad.data_ptr())
    return grad
