"""Launchers of the compiled kd_rows and kl_div kernels of fastkd._C (csrc/logits/cpu.cpp,
csrc/logits/cuda.cu; dkd: csrc/logits/dkd_cpu.cpp and cuda.cu): the ``native`` backend of those
families. Same signatures and outputs as the torch implementation (logits/torch.py); the tensors'
device picks the CPU or CUDA entry point. The spec's logit transforms (logit scale, soft-cap,
standardize; fastkd/logit_transforms.py) travel in the call's ``_C.LogitTransforms``.

Nothing (N, V) is allocated besides the gradient; the forward keeps (N, 5) fp32 statistics, (N, 9)
with standardize (contract.stats_width: each side's mean and std too).
"""

import torch

from ..layout import KERNEL_DTYPES, row_shape
from ..native_ext import extension, int64_labels, launch, rows_view
from .contract import DIVERGENCE_CODES, stats_width


def _check_pair(first_name, first, second_name, second):
    for name, x in ((first_name, first), (second_name, second)):
        if x.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{name}: the compiled kernels take float32, float16 or bfloat16; got {x.dtype}")
        if x.dim() not in (2, 3):
            raise ValueError(f"{name} must be (N, V) or (B, T, V); got shape {tuple(x.shape)}")
    if first.shape != second.shape or first.device != second.device:
        raise ValueError(f"{first_name} {tuple(first.shape)} on {first.device} and {second_name} "
                         f"{tuple(second.shape)} on {second.device} must match in shape and device")


def _check_dkd_built(name, device):
    # The contract does not cover entry points: an extension built before the dkd kernels passes it.
    entry = f"{name}_{'cpu' if device.type == 'cpu' else 'cuda'}"
    if not hasattr(extension(), entry):
        raise RuntimeError(f"fastkd._C has no {entry}: it was built before the dkd kernels; rebuild it: "
                           "pip install --no-build-isolation -e .")


def _transforms(spec):
    """The spec's logit transforms as _C.LogitTransforms (the identity when it has none)."""
    ext = extension()
    if not spec.transforms_logits:
        return ext.LogitTransforms()
    return ext.LogitTransforms(student_scale=spec.student_scale, student_softcap=spec.student_softcap,
                               teacher_scale=spec.teacher_scale, teacher_softcap=spec.teacher_softcap,
                               standardize=spec.standardize, eps=spec.standardize_eps)


def _kd_rows_args(student, teacher, labels, spec, ignore_index):
    """The _C.KdRowsArgs of a call; labels: int64 (N,) contiguous, or None."""
    n_rows, n_cols, _ = row_shape(student)
    ext = extension()
    # dkd has entry points of its own, which read no code: any valid one fills the field.
    code = DIVERGENCE_CODES["forward_kl" if spec.name == "dkd" else spec.name]
    divergence = ext.DivergenceParams(code=code, inv_temperature=spec.inv_temperature,
                                      param=spec.param, log_param=spec.log_param, log1m_param=spec.log1m_param)
    return ext.KdRowsArgs(n_rows=n_rows, n_cols=n_cols, student=rows_view(student), teacher=rows_view(teacher),
                          labels=0 if labels is None else labels.data_ptr(), ignore_index=ignore_index,
                          divergence=divergence, transforms=_transforms(spec))


def _kl_div_rows_args(input, target, log_target):
    n_rows, n_cols, _ = row_shape(input)
    return extension().KlDivRowsArgs(n_rows=n_rows, n_cols=n_cols, input=rows_view(input), target=rows_view(target),
                                     log_target=bool(log_target))


def kd_rows_forward(student, teacher, labels, spec, ignore_index):
    """student, teacher: (N, V) or (B, T, V), fp32|fp16|bf16 (may differ), one device;
    labels: (N,) int or None. Returns (loss (N,), stats (N, contract.stats_width(spec))) fp32, zeros on
    ignored rows."""
    _check_pair("student", student, "teacher", teacher)
    n_rows = row_shape(student)[0]
    loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    stats = torch.empty(n_rows, stats_width(spec), dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return loss, stats
    labels = int64_labels(labels, n_rows)
    args = _kd_rows_args(student, teacher, labels, spec, ignore_index)
    if spec.name == "dkd":  # csrc/logits/dkd_cpu.cpp, cuda.cu
        _check_dkd_built("dkd_rows_forward", student.device)
        launch("dkd_rows_forward", student.device, args, alpha=spec.alpha, loss=loss.data_ptr(),
               stats=stats.data_ptr())
    else:
        launch("kd_rows_forward", student.device, args, loss=loss.data_ptr(), stats=stats.data_ptr())
    return loss, stats


def kd_rows_backward(grad_loss, student, teacher, labels, stats, spec, ignore_index):
    """grad_loss: (N,); stats: (N, contract.stats_width(spec)) from the forward.
    Returns ∂output/∂student: contiguous, the student's shape and dtype."""
    _check_pair("student", student, "teacher", teacher)
    n_rows = row_shape(student)[0]
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    if n_rows == 0:
        return grad
    grad_loss = grad_loss.to(torch.float32).contiguous()  # autograd often hands in an expanded scalar
    stats = stats.to(torch.float32).contiguous()
    width = stats_width(spec)
    if grad_loss.numel() != n_rows or stats.shape != (n_rows, width):
        raise ValueError(f"grad_loss must be ({n_rows},) and stats ({n_rows}, {width}); got "
                         f"{tuple(grad_loss.shape)} and {tuple(stats.shape)}")
    labels = int64_labels(labels, n_rows)
    args = _kd_rows_args(student, teacher, labels, spec, ignore_index)
    if spec.name == "dkd":
        _check_dkd_built("dkd_rows_backward", student.device)
        launch("dkd_rows_backward", student.device, args, alpha=spec.alpha, grad_loss=grad_loss.data_ptr(),
               stats=stats.data_ptr(), grad=grad.data_ptr())
    else:
        launch("kd_rows_backward", student.device, args, grad_loss=grad_loss.data_ptr(), stats=stats.data_ptr(),
               grad=grad.data_ptr())
    return grad


def kl_div_rows_forward(input, target, log_target):
    """input: (N, V) or (B, T, V) log-probabilities; target: probabilities (log-probabilities if
    log_target), same shape. Returns Σ_V target·(log target − input) per row: (N,) fp32."""
    _check_pair("input", input, "target", target)
    n_rows = row_shape(input)[0]
    out = torch.empty(n_rows, dtype=torch.float32, device=input.device)
    if n_rows:
        launch("kl_div_rows_forward", input.device, _kl_div_rows_args(input, target, log_target), out=out.data_ptr())
    return out


def kl_div_rows_backward(grad_rows, input, target, log_target):
    """grad_rows: (N,). Returns −target_prob·grad_rows: contiguous, input's shape and dtype."""
    _check_pair("input", input, "target", target)
    n_rows = row_shape(input)[0]
    grad = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    if n_rows:
        grad_rows = grad_rows.to(torch.float32).contiguous()
        launch("kl_div_rows_backward", input.device, _kl_div_rows_args(input, target, log_target),
               grad_rows=grad_rows.data_ptr(), grad=grad.data_ptr())
    return grad
