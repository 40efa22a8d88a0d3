"""Before anything is timed: does each provider compute the right loss (and gradient)?

The reference is the eager formula (``providers.eager_kd_loss``) in float64 on the same inputs,
in row chunks so it fits next to the GPU-sized cases: independent of every fastkd backend. A
provider that disagrees is still timed, but its rows are marked, so a fast wrong answer cannot
pass unnoticed.
"""

from dataclasses import dataclass

import torch

from .providers import eager_kd_loss

REFERENCE_ROWS = 512  # rows per float64 chunk of the reference

# Relative tolerances by input dtype. The loss is accumulated in fp32 by every provider, so the
# bf16 bound covers only the inputs' rounding; gradients are rounded to the student's dtype.
LOSS_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}
GRAD_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@dataclass(frozen=True)
class CheckResult:
    status: str  # "ok", "mismatch" or "error"
    detail: str = ""


def reference(case, student, teacher):
    """The float64 loss (a float) and gradient for the case (the mean over rows of the divergence)."""
    n_rows = student.shape[0]
    total, grads = 0.0, []
    for start in range(0, n_rows, REFERENCE_ROWS):
        rows = student[start:start + REFERENCE_ROWS].detach().double().requires_grad_(True)
        chunk = eager_kd_loss(rows, teacher[start:start + REFERENCE_ROWS].double(), case.divergence)
        chunk = chunk * rows.shape[0] / n_rows  # eager_kd_loss averages over its own rows
        (grad,) = torch.autograd.grad(chunk, rows)
        total += float(chunk.detach())
        grads.append(grad)
    return total, torch.cat(grads)


def _relative_norm(value, ref):
    return float(torch.linalg.vector_norm(value.float() - ref.float()) /
                 torch.linalg.vector_norm(ref.float()).clamp_min(1e-30))


def check(loss_fn, student, teacher, ref_loss, ref_grad):
    """Compares ``loss_fn``'s loss and gradient with the reference; never raises."""
    try:
        loss = loss_fn(student, teacher)
        (grad,) = torch.autograd.grad(loss, student)
    except Exception as exc:  # a provider that cannot run this case is reported, not fatal
        return CheckResult("error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    loss_error = abs(float(loss.detach()) - ref_loss) / max(abs(ref_loss), 1e-30)
    grad_error = _relative_norm(grad, ref_grad)
    detail = f"loss rel err {loss_error:.1e}, grad rel err {grad_error:.1e}"
    ok = loss_error <= LOSS_TOLERANCE[student.dtype] and grad_error <= GRAD_TOLERANCE[student.dtype]
    return CheckResult("ok" if ok else "mismatch", detail)
