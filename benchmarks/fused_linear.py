"""The fused linear KD benchmarks of issue 3 (distillation from hidden states), with providers,
checks and report.

One case: N tokens, student and teacher hidden sizes Hs and Ht, vocabulary V, JSD (β = 0.5),
forward+backward with gradients to the student's hidden states and lm_head weight. Providers,
on the same inputs and checked against a float64 eager reference before they are timed:

    fastkd-<backend>   fastkd.fused_linear_kd_loss
    eager              logits by matmul, upcast to fp32, the JSD written with log_softmax
    compile            torch.compile of eager (CUDA, and --smoke)
    liger              Liger-Kernel's LigerFusedLinearJSDLoss, where installed
    trl-chunked        TRL's ChunkedDivergenceFunction (trl/kernels/chunked_divergence.py, TRL ≥ 1.16),
                       called as its DistillationTrainer does, where installed: vocabulary tiles of
                       4096 × 32768 fp32 logits, Triton kernels on CUDA, the same math in PyTorch on a CPU
    gemms              the four GEMMs alone (teacher and student logits, grad-hidden,
                       grad-weight): the compute floor every fused loss is set against

Issue 3's targets, on an H100 at Hs = Ht = 4096, V = 128256, bf16: fastkd ≤ 1.15× the GEMMs;
peak memory above inputs and gradients ≤ 2 GB at N = 8192; faster than Liger with ≤ ⅓ of its
peak memory; at N = 1024 no slower than eager; issue 15: faster than TRL's chunked loss with less
peak memory at N = 1024 and 8192. Peak extra memory: on CUDA from the allocator; on a CPU the
resident high-water mark of a fresh process per provider (loss and gradients included). Run by
``python -m benchmarks`` (``--op fused_linear`` for these alone).
"""

import importlib.util
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

import fastkd

from . import report
from . import cpu_memory
from .cpu_memory import _high_water_bytes, _resident_bytes
from .harness import cuda_peak_extra_bytes, time_cpu, time_cuda
from .progress import case_label, provider_label
from .providers import timed_backends

_MIB = 1 << 20
BETA = 0.5


@dataclass(frozen=True)
class FusedCase:
    N: int
    Hs: int
    Ht: int
    V: int
    dtype: str  # "bf16" or "fp32"

    @property
    def torch_dtype(self):
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]


SUITES = {
    "gpu": (FusedCase(1024, 4096, 4096, 128256, "bf16"), FusedCase(8192, 4096, 4096, 128256, "bf16")),
    "cpu": (FusedCase(1024, 256, 256, 32000, "fp32"),),
    "smoke": (FusedCase(64, 32, 48, 1000, "fp32"),),
    "quick": (FusedCase(8192, 4096, 4096, 128256, "bf16"),),
}
REPEATS = {"gpu": (2, 10, 300), "cpu": (1, 3, 200), "smoke": (1, 3, 50),  # cpu warm-up, cpu repeats, gpu ms
           "quick": (1, 3, 200)}


@dataclass(frozen=True)
class FusedProvider:
    """``make(inputs)`` returns a no-argument fwd+bwd step returning (loss, grad_hidden, grad_weight),
    or None for the GEMM floor, which computes no loss."""

    name: str
    make: Callable
    checked: bool = True
    fresh_process_memory: bool = True  # False: a fresh process would compile again before measuring


def make_inputs(case, device, seed=0):
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=case.torch_dtype)

    # Weights scaled by 1/sqrt(H): logits of order 1, as in a trained model.
    return {"student_hidden": randn(case.N, case.Hs).requires_grad_(True),
            "student_weight": randn(case.V, case.Hs, scale=1 / math.sqrt(case.Hs)).requires_grad_(True),
            "teacher_hidden": randn(case.N, case.Ht),
            "teacher_weight": randn(case.V, case.Ht, scale=1 / math.sqrt(case.Ht))}


def _grads(loss, inputs):
    return (loss, *torch.autograd.grad(loss, (inputs["student_hidden"], inputs["student_weight"])))


def _fastkd(backend):
    def make(inputs):
        return lambda: _grads(fastkd.fused_linear_kd_loss(**inputs, divergence="jsd", beta=BETA, backend=backend),
                              inputs)
    return make


def eager_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight):
    """What a user writes without a fused loss: full fp32 logits (fp64 for fp64 inputs), log-softmax,
    mixture in log space."""
    upcast = torch.promote_types(student_hidden.dtype, torch.float32)
    log_q = torch.log_softmax((student_hidden @ student_weight.t()).to(upcast), -1)
    with torch.no_grad():
        log_p = torch.log_softmax((teacher_hidden @ teacher_weight.t()).to(upcast), -1)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(BETA), log_q + math.log(1 - BETA)]), 0)
    rows = BETA * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - BETA) * (log_q.exp() * (log_q - log_m)).sum(-1)
    return rows.mean()


def _eager(inputs):
    return lambda: _grads(eager_jsd(**inputs), inputs)


def _compiled(inputs):
    compiled = torch.compile(eager_jsd)
    return lambda: _grads(compiled(**inputs), inputs)


def _liger(inputs):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA)
    labels = torch.zeros(inputs["student_hidden"].shape[0], dtype=torch.long, device=inputs["student_hidden"].device)
    return lambda: _grads(loss_fn(inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"],
                                  inputs["teacher_weight"], labels), inputs)


def _trl_chunked(inputs):
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    # TRL's beta selects the divergence with fastkd's convention (jsd mixture beta·p_teacher +
    # (1 − beta)·p_student; 0 is forward KL, 1 reverse KL). Its function returns per-token
    # (divergence, student entropy); DistillationTrainer sums the divergence over valid tokens and
    # divides by their count: all rows are valid here, so the mean.
    def loss():
        divergence, _ = ChunkedDivergenceFunction.apply(
            inputs["student_hidden"], inputs["student_weight"], None, inputs["teacher_hidden"],
            inputs["teacher_weight"], None, BETA, 1.0, 1.0, None, 1.0, None)
        return divergence.mean()

    return lambda: _grads(loss(), inputs)


def _trl_chunked_missing():
    """Why TRL's chunked divergence cannot run here, or "" when it can."""
    try:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # noqa: F401
    except Exception as exc:  # absent, or a TRL before 1.16 without the module
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return ""


def _gemms(inputs):
    sh, sw, th, tw = (inputs[k].detach() for k in ("student_hidden", "student_weight", "teacher_hidden",
                                                    "teacher_weight"))

    def step():
        teacher_logits = th @ tw.t()
        student_logits = sh @ sw.t()
        return teacher_logits, student_logits @ sw, student_logits.t() @ sh

    return step


def select(device, suite_name):
    """(providers, notes): fastkd backends that run natively here, then the peers and the floor."""
    names, notes = timed_backends(device)
    providers = [FusedProvider(f"fastkd-{name}", _fastkd(name)) for name in names]
    providers.append(FusedProvider("eager", _eager))
    if device.type == "cuda" or suite_name == "smoke":
        providers.append(FusedProvider("compile", _compiled, fresh_process_memory=False))
    else:
        notes.append("compile: not run on this CPU (its compile time exceeds the run)")
    if importlib.util.find_spec("liger_kernel") is not None and device.type == "cuda":
        providers.append(FusedProvider("liger", _liger))
    else:
        notes.append("liger: not run (Liger-Kernel is not installed, or no GPU)")
    missing = _trl_chunked_missing()
    if missing:
        notes.append(f"trl-chunked: not run (trl.kernels.chunked_divergence does not import: {missing})")
    else:
        providers.append(FusedProvider("trl-chunked", _trl_chunked))
    providers.append(FusedProvider("gemms", _gemms, checked=False))
    return providers, notes


def reference(inputs, rows_per_chunk=256):
    """(loss, grad_hidden, grad_weight) in float64 from the eager formula, in row chunks: the
    independent answer every provider, fastkd included, is checked against."""
    hidden, weight, teacher_hidden, teacher_weight = (
        inputs[k].detach().double() for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight"))
    weight.requires_grad_(True)
    n_rows = hidden.shape[0]
    total, grad_hidden, grad_weight = 0.0, [], torch.zeros_like(weight)
    for start in range(0, n_rows, rows_per_chunk):
        rows = hidden[start:start + rows_per_chunk].requires_grad_(True)
        chunk = eager_jsd(rows, weight, teacher_hidden[start:start + rows_per_chunk], teacher_weight)
        chunk = chunk * rows.shape[0] / n_rows  # eager_jsd averages over its own rows
        g_rows, g_weight = torch.autograd.grad(chunk, (rows, weight))
        total += float(chunk.detach())
        grad_hidden.append(g_rows)
        grad_weight += g_weight
    return torch.tensor(total, dtype=torch.float64), torch.cat(grad_hidden), grad_weight


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()  # losses still carry autograd: read their values only
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _check(result, reference, case):
    tolerance = 2e-2 if case.dtype == "bf16" else 1e-4
    errors = [_rel(a, b) for a, b in zip(result, reference)]
    status = "ok" if max(errors) <= tolerance else "mismatch"
    return status, "rel err loss {:.1e}, grad_hidden {:.1e}, grad_weight {:.1e}".format(*errors)


def _cpu_peak_mib(case, provider_name, suite_name):
    """Peak extra resident memory of one fwd+bwd step in a fresh process (MiB), or None and a reason."""
    return cpu_memory.peak_mib("benchmarks.fused_linear", {"case": asdict(case), "provider": provider_name, "suite": suite_name})


def _memory_child(payload):
    # VmHWM only grows: one process per provider. Extra = high-water mark after the step minus
    # resident memory before it, the gradients and loss it returns included; the inputs are not.
    request = json.loads(payload)
    case, cpu = FusedCase(**request["case"]), torch.device("cpu")
    providers, _ = select(cpu, request["suite"])
    make = next(p.make for p in providers if p.name == request["provider"])
    make(make_inputs(replace(case, N=2), cpu))()  # lazy initialisation is not the loss's memory
    step = make(make_inputs(case, cpu))
    before = _resident_bytes()
    result = step()
    print(max(_high_water_bytes() - before, 0))
    del result


def _time(step, device, suite_name):
    warmup, repeats, gpu_ms = REPEATS[suite_name]
    return time_cuda(step, gpu_ms) if device.type == "cuda" else time_cpu(step, warmup, repeats)


def run_case(case, device, suite_name, notes, label):
    inputs = make_inputs(case, device)
    providers, case_notes = select(device, suite_name)
    notes += case_notes
    expected = reference(inputs)
    rows = []
    for index, provider in enumerate(providers, 1):
        row = {"op": "fused_linear", **asdict(case), "divergence": "jsd", "mode": "fwd+bwd",
               "provider": provider.name, "median_ms": None, "q20_ms": None, "q80_ms": None,
               "peak_extra_mib": None, "vs_gemms": None, "speedup_vs_eager": None, "check": "ok",
               "check_detail": "", "note": ""}
        rows.append(row)
        try:
            step = provider.make(inputs)
            result = step()
            if provider.checked:
                row["check"], row["check_detail"] = _check(result, expected, case)
            del result
            timing = _time(step, device, suite_name)
            row.update(median_ms=timing.median_ms, q20_ms=timing.q20_ms, q80_ms=timing.q80_ms)
            if device.type == "cuda":
                row["peak_extra_mib"] = cuda_peak_extra_bytes(step) / _MIB
            elif provider.fresh_process_memory:
                row["peak_extra_mib"], reason = _cpu_peak_mib(case, provider.name, suite_name)
                if reason:
                    notes.append(f"{provider.name}: {reason}")
            else:
                notes.append(f"{provider.name}: peak memory not measured on a CPU (a fresh process would compile "
                             "again)")
        except Exception as exc:  # a provider that cannot run (e.g. out of memory) is reported, not fatal
            row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if not row["check_detail"]:
                row["check"] = "error"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"{label} {provider_label(index, len(providers), provider.name)}: "
              + (f"{row['median_ms']:.4g} ms" if row["median_ms"] else row["note"])
              + (f" ({row['check']}: {row['check_detail']})" if provider.checked else ""), flush=True)
    report.add_ratio(rows, "vs_gemms", "gemms", speedup=False)
    report.add_ratio(rows, "speedup_vs_eager", "eager", speedup=True)
    return rows


COLUMNS = ("N", "Hs", "Ht", "V", "dtype", "provider", "median ms", "q20–q80 ms", "× gemms", "vs eager",
           "peak extra MiB", "check")


def markdown_table(rows):
    return report.op_table(COLUMNS, rows, lambda r: (str(r["N"]), str(r["Hs"]), str(r["Ht"]), str(r["V"]), r["dtype"],
                                                     r["provider"]), ("vs_gemms", "speedup_vs_eager"),
                           floor_provider="gemms")


def run(suite_name, device, out_dir):
    """Runs the suite's fused-linear cases, prints the table, writes fused_linear.json and .md."""
    environment = report.environment(device)
    print(f"fused_linear benchmarks on {environment['device']}: suite {suite_name!r}", flush=True)
    notes, rows = [], []
    cases = SUITES[suite_name]
    for index, case in enumerate(cases, 1):
        label = case_label("fused_linear", index, len(cases),
                           f"jsd {case.dtype} N={case.N} Hs={case.Hs} Ht={case.Ht} V={case.V}")
        rows += run_case(case, device, suite_name, notes, label)
    notes = list(dict.fromkeys(notes))
    results = {"environment": environment, "suite": suite_name, "notes": notes, "measurements": rows}
    report.write_op(out_dir, "fused_linear", "fused_linear", results,
                    "forward+backward, JSD β=0.5, gradients to the student's hidden states and weight. × gemms: "
                    "time over the four GEMMs alone (issue 3's target ≤ 1.15× on an H100). Peak extra: beyond the "
                    "inputs, loss and gradients included (CPU: resident memory of a fresh process).",
                    markdown_table(rows))
    return results


def has_mismatch(results):
    return any(r["check"] == "mismatch" for r in results["measurements"])


if __name__ == "__main__":
    _memory_child(sys.argv[1])
