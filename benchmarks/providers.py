"""One setup per op: the providers of kd_loss, each a function of (student, teacher) → scalar loss.

    fastkd-<backend>   fastkd.kd_loss with that backend, for every backend that runs natively here
                       (on a CPU: fastkd-torch and fastkd-native, the C++ kernels of fastkd._C)
    eager              the divergence written plainly with log_softmax, upcast to fp32 as users do
    compile            torch.compile of ``eager``

All return the mean over rows of the per-row divergence, like ``kd_loss(reduction="mean")``.
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import fastkd

from .config import BETA, SKEW, TEMPERATURE


@dataclass(frozen=True)
class Provider:
    """``make(case)`` returns the loss function for that case; ``fresh_process_memory`` says whether
    a fresh process can measure its peak memory without repeating an expensive set-up."""

    name: str
    make: Callable
    fresh_process_memory: bool = True


def make_inputs(case, device, seed=0):
    """Student (requires grad) and teacher logits: (N, V) of the case's dtype on ``device``.

    Filled in place, so creating them allocates nothing beyond the two tensors (the CPU memory
    probe measures from right after this).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    student = torch.empty(case.N, case.V, dtype=case.torch_dtype, device=device)
    teacher = torch.empty_like(student)
    student.normal_(generator=generator)
    teacher.normal_(generator=generator)
    return student.requires_grad_(True), teacher


def _fastkd(backend):
    def make(case):
        def loss(student, teacher):
            return fastkd.kd_loss(student, teacher, divergence=case.divergence, temperature=TEMPERATURE,
                                  beta=BETA, skew=SKEW, backend=backend)
        return loss
    return make


def eager_kd_loss(student, teacher, divergence, temperature=TEMPERATURE, beta=BETA, skew=SKEW):
    """The divergences as a user writes them in PyTorch (student, teacher: (N, V) logits).

    ``F.kl_div(log_b, log_a, log_target=True)`` is KL(a ‖ b); "batchmean" divides by N.
    """
    upcast = torch.promote_types(student.dtype, torch.float32)  # fp32, or fp64 for the checks' reference
    log_q = F.log_softmax(student.to(upcast) / temperature, dim=-1)
    log_p = F.log_softmax(teacher.to(upcast) / temperature, dim=-1)

    def kl(log_a, log_b):
        return F.kl_div(log_b, log_a, reduction="batchmean", log_target=True)

    def log_mixture(weight, log_x, log_y):  # log(weight·x + (1−weight)·y) without leaving log space
        return torch.logaddexp(log_x + math.log(weight), log_y + math.log1p(-weight))

    if divergence == "forward_kl":
        return kl(log_p, log_q)
    if divergence == "reverse_kl":
        return kl(log_q, log_p)
    if divergence == "jsd":
        log_m = log_mixture(beta, log_p, log_q)
        return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)
    if divergence == "skew_forward_kl":
        return kl(log_p, log_mixture(skew, log_p, log_q))
    if divergence == "skew_reverse_kl":
        return kl(log_q, log_mixture(skew, log_q, log_p))
    if divergence == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1).mean()
    raise ValueError(f"unknown divergence {divergence!r}")


def _eager(case):
    def loss(student, teacher):
        return eager_kd_loss(student, teacher, case.divergence)
    return loss


def _compiled(case):
    # Every case compiles the same code object (``loss`` above): without a reset, dynamo would
    # count the cases against its recompile limit, fall back to eager silently past it, and
    # turn the second shape seen into a dynamic-shape graph.
    torch._dynamo.reset()
    return torch.compile(_eager(case))


EAGER = Provider("eager", _eager)
# A fresh process would compile again before measuring: its memory is reported as n/a on CPU.
COMPILE = Provider("compile", _compiled, fresh_process_memory=False)


def timed_backends(device, family="kd_rows"):
    """The fastkd backends of ``family`` worth timing on ``device``, and notes on those left out:
    (names, notes). Shared by every op's benchmark."""
    chosen, notes = [], []
    for name, status in fastkd.available_backends()[family].items():
        if not status.available or not {device.type, "*"} & set(status.devices):
            notes.append(f"fastkd-{name}: not run ({status.reason})")
        elif name == "triton" and device.type == "cpu":
            notes.append("fastkd-triton: not run (the CPU interpreter is orders of magnitude too slow to time)")
        else:
            chosen.append(name)
    return chosen, notes


def select(device, with_compile):
    """The providers that run on ``device`` here, and notes on those left out.

    Returns (providers, notes); fastkd backends first, then eager (the speed-up baseline).
    """
    names, notes = timed_backends(device)
    providers = [Provider(f"fastkd-{name}", _fastkd(name)) for name in names]
    providers.append(EAGER)
    if with_compile:
        providers.append(COMPILE)
    return providers, notes


def by_name(name):
    """The provider called ``name`` (used by the CPU memory subprocess)."""
    if name == EAGER.name:
        return EAGER
    if name == COMPILE.name:
        return COMPILE
    if name.startswith("fastkd-"):
        return Provider(name, _fastkd(name[len("fastkd-"):]))
    raise ValueError(f"unknown provider {name!r}")
