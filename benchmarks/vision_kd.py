"""The vision logit-KD benchmarks of issue 17: decoupled KD and standardised KD at the sizes of
image classifiers, against the eager PyTorch code vision users run.

    dkd      mdistiller's dkd_loss (alpha 1, beta 8, T = 4, T², batch mean) against
             fastkd.kd_loss(divergence="dkd")
    kd_std   the logit-standardisation paper's kd_loss(logit_stand=True) (T = 2, T², batch mean)
             against fastkd.kd_loss(standardize=True)

at B ∈ {128, 1024} rows × C ∈ {100, 1000} classes, fp32, forward+backward. Every provider runs on
the same inputs, and its loss and gradient are checked against the eager code's before it is
timed (median and 20/80 quantiles of repeated runs); peak extra memory is measured in a fresh
process on a CPU (``python -m benchmarks.vision_kd '<json>'``), by the allocator on CUDA. Issue 17's
CPU target: DKD at B = 1024, C = 1000 ≥ 2× eager. Run by ``python -m benchmarks --op vision_kd``.
"""

import json
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import fastkd
from fastkd.kernels import registry

from . import report
from . import cpu_memory
from .cpu_memory import _high_water_bytes, _resident_bytes
from .harness import cuda_peak_extra_bytes, time_cpu, time_cuda
from .providers import timed_backends

_MIB = 1 << 20
ALPHA, BETA = 1.0, 8.0  # mdistiller's CIFAR-100 DKD setting
TEMPERATURE = {"dkd": 4.0, "kd_std": 2.0}


@dataclass(frozen=True)
class VisionCase:
    loss: str  # "dkd" or "kd_std"
    B: int
    C: int


def _grid(sizes):
    return tuple(VisionCase(loss, B, C) for loss in ("dkd", "kd_std") for B, C in sizes)


SUITES = {
    "cpu": _grid([(128, 100), (128, 1000), (1024, 100), (1024, 1000)]),
    "gpu": _grid([(128, 100), (128, 1000), (1024, 100), (1024, 1000)]),
    "quick": _grid([(1024, 1000)]),
    "smoke": _grid([(32, 100)]),
}
REPEATS = {"cpu": (3, 21, 200), "gpu": (3, 21, 200), "quick": (3, 21, 200), "smoke": (1, 5, 50)}


# --- inputs and the eager code ----------------------------------------------------------------

def make_inputs(case, device, seed=0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # Logits of a trained classifier: a few units wide, the target usually near the top.
    student = torch.randn(case.B, case.C, generator=generator).mul_(3.0)
    teacher = torch.randn(case.B, case.C, generator=generator).mul_(3.0)
    target = torch.randint(0, case.C, (case.B,), generator=generator)
    teacher.scatter_add_(1, target[:, None], torch.full((case.B, 1), 6.0))
    return student.to(device).requires_grad_(True), teacher.to(device), target.to(device)


def _normalize(logits):
    return (logits - logits.mean(dim=-1, keepdim=True)) / (1e-7 + logits.std(dim=-1, keepdim=True))


def eager_kd_std(student, teacher, temperature):
    """The logit-standardisation paper's kd_loss with logit_stand=True, as its code computes it."""
    log_pred_student = F.log_softmax(_normalize(student) / temperature, dim=1)
    pred_teacher = F.softmax(_normalize(teacher) / temperature, dim=1)
    return F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean() * temperature ** 2


def eager_dkd(student, teacher, target, alpha, beta, temperature):
    """mdistiller's dkd_loss as its code computes it (target masked with −1000 in NCKD)."""
    gt = torch.zeros_like(student).scatter_(1, target[:, None], 1).bool()
    other = ~gt
    pred_student = F.softmax(student / temperature, dim=1)
    pred_teacher = F.softmax(teacher / temperature, dim=1)

    def masses(pred):
        return torch.cat([(pred * gt).sum(1, keepdim=True), (pred * other).sum(1, keepdim=True)], dim=1)

    tckd = F.kl_div(torch.log(masses(pred_student)), masses(pred_teacher), reduction="sum")
    nckd = F.kl_div(F.log_softmax(student / temperature - 1000.0 * gt, dim=1),
                    F.softmax(teacher / temperature - 1000.0 * gt, dim=1), reduction="sum")
    return (alpha * tckd + beta * nckd) * temperature ** 2 / target.shape[0]


# --- providers: name → a loss function of (student, teacher, target) --------------------------

def _eager(case):
    if case.loss == "dkd":
        return lambda s, t, y: eager_dkd(s, t, y, ALPHA, BETA, TEMPERATURE["dkd"])
    return lambda s, t, y: eager_kd_std(s, t, TEMPERATURE["kd_std"])


def _fastkd(case, backend):
    if case.loss == "dkd":
        return lambda s, t, y: fastkd.kd_loss(s, t, y, divergence="dkd", alpha=ALPHA, beta=BETA,
                                              temperature=TEMPERATURE["dkd"], temperature_squared=True,
                                              backend=backend)
    return lambda s, t, y: fastkd.kd_loss(s, t, divergence="forward_kl", temperature=TEMPERATURE["kd_std"],
                                          temperature_squared=True, standardize=True, backend=backend)


def _features(case):
    return frozenset({"dkd"}) if case.loss == "dkd" else frozenset({"standardize"})


def providers(case, device):
    """({name: loss function}, notes): the fastkd backends that serve the case here, then eager."""
    names, notes = timed_backends(device)
    serving = set(registry.usable_backends("kd_rows", device.type, features=_features(case)))
    chosen = {}
    for name in names:
        if name in serving:
            chosen[f"fastkd-{name}"] = _fastkd(case, name)
        else:
            notes.append(f"fastkd-{name}: not run for {case.loss} (it does not implement {', '.join(_features(case))})")
    chosen["eager"] = _eager(case)
    return chosen, notes


def _step(loss_fn, student, teacher, target):
    def step():
        loss = loss_fn(student, teacher, target)
        (grad,) = torch.autograd.grad(loss, student)
        return loss.detach(), grad
    return step


# --- memory in a fresh process (CPU) ----------------------------------------------------------

def _cpu_memory(case, provider):
    line, _ = cpu_memory.run_probe("benchmarks.vision_kd", {"case": asdict(case), "provider": provider})
    return None if line is None else json.loads(line)


def _memory_child(payload):
    request = json.loads(payload)
    case = VisionCase(**request["case"])
    cpu = torch.device("cpu")
    loss_fn = providers(case, cpu)[0][request["provider"]]
    _step(loss_fn, *make_inputs(VisionCase(case.loss, 2, case.C), cpu))()  # lazy initialisation is not the op's
    inputs = make_inputs(case, cpu)
    before = _resident_bytes()
    result = _step(loss_fn, *inputs)()
    print(json.dumps(max(_high_water_bytes() - before, 0)))
    del result


# --- the run ----------------------------------------------------------------------------------

def _rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm())


def run_case(case, device, suite_name, notes):
    inputs = make_inputs(case, device)
    chosen, case_notes = providers(case, device)
    notes += case_notes
    reference = _step(chosen["eager"], *inputs)()
    label = f"[vision_kd {case.loss} B={case.B} C={case.C}]"
    rows = []
    warmup, repeats, gpu_ms = REPEATS[suite_name]
    for name, loss_fn in chosen.items():
        row = {"op": "vision_kd", **asdict(case), "dtype": "fp32", "mode": "fwd+bwd", "provider": name,
               "median_ms": None, "q20_ms": None, "q80_ms": None, "peak_extra_mib": None, "speedup_vs_eager": None,
               "check": "ok", "check_detail": "", "note": ""}
        rows.append(row)
        step = _step(loss_fn, *inputs)
        try:
            loss, grad = step()
        except Exception as exc:  # a provider that cannot run this case is reported, not fatal
            row.update(check="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            print(f"{label} {name}: {row['note']}", flush=True)
            continue
        loss_err, grad_err = _rel_err(loss, reference[0]), _rel_err(grad, reference[1])
        row["check_detail"] = f"loss {float(loss):.6g}, rel err vs eager: loss {loss_err:.1e}, grad {grad_err:.1e}"
        if not (loss_err < 1e-4 and grad_err < 1e-4):  # both fp32; they differ in summation order only
            row["check"] = "mismatch"
        timing = time_cuda(step, gpu_ms) if device.type == "cuda" else time_cpu(step, warmup, repeats)
        row.update(median_ms=timing.median_ms, q20_ms=timing.q20_ms, q80_ms=timing.q80_ms)
        if device.type == "cuda":
            row["peak_extra_mib"] = cuda_peak_extra_bytes(step) / _MIB
        elif suite_name != "smoke":  # a fresh process per provider: seconds each, more than the smoke run
            extra = _cpu_memory(case, name)
            row["peak_extra_mib"] = None if extra is None else extra / _MIB
        print(f"{label} {name}: {row['median_ms']:.4g} ms ({row['check']}: {row['check_detail']})", flush=True)
    report.add_ratio(rows, "speedup_vs_eager", "eager", speedup=True)
    return rows


COLUMNS = ("loss", "B", "C", "provider", "median ms", "q20–q80 ms", "vs eager", "peak extra MiB", "check")


def markdown_table(rows):
    return report.op_table(COLUMNS, rows, lambda r: (r["loss"], str(r["B"]), str(r["C"]), r["provider"]),
                           ("speedup_vs_eager",))


def run(suite_name, device, out_dir):
    """Runs the suite's cases, prints the table, writes vision_kd.json and vision_kd.md."""
    environment = report.environment(device)
    print(f"vision_kd benchmarks on {environment['device']}: suite {suite_name!r}", flush=True)
    notes, rows = [], []
    for case in SUITES[suite_name]:
        rows += run_case(case, device, suite_name, notes)
    if suite_name == "smoke" and device.type != "cuda":
        notes.append("peak memory: not measured in the smoke run on a CPU (a fresh process per provider)")
    results = {"environment": environment, "suite": suite_name, "notes": list(dict.fromkeys(notes)),
               "measurements": rows}
    report.write_op(out_dir, "vision_kd", "vision_kd", results,
                    "fp32, forward+backward. vs eager: the eager code's time (mdistiller's dkd_loss; the "
                    "logit-standardisation paper's kd_loss) / this time. Issue 17's CPU target: dkd at B=1024, "
                    "C=1000 ≥ 2×.", markdown_table(rows))
    return results


def has_mismatch(results):
    return any(r["check"] == "mismatch" for r in results["measurements"])


if __name__ == "__main__":
    _memory_child(sys.argv[1])
