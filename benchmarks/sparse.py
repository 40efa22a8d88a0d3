"""The sparse-teacher benchmarks of issue 16: distillation from an offline top-k teacher.

One case: N tokens, student hidden size H, vocabulary V, k cached entries per token; the loss is
forward KL renormalised over the top-k (``missing_mass="renormalize"``: both sides restricted to
the k ids), mean over tokens, forward + backward to the student's hidden states and lm_head.
Providers, on the same inputs:

    fastkd-<backend>        fastkd.fused_linear_sparse_kd_loss: logit blocks, never (N, V)
    eager-topk              axolotl/DistillKit-style PyTorch: the (N, V) student logits, their
                            values at the k ids, log-softmax over those k, KL against the cached
                            log-probs renormalised over the same k (what both projects compute)
    fastkd-dense-<backend>  fastkd.fused_linear_kd_loss against the dense teacher the top-k came
                            from (teacher hidden states and lm_head of the same sizes): what the
                            sparse cache saves, a different loss (checked against its own float64
                            definition)

Each provider's loss and gradients are checked against a float64 reference before it is timed.
Peak extra memory: on CUDA from the allocator; on a CPU the high-water mark of resident memory of
a fresh process (``python -m benchmarks.sparse '<json>'``). Run by ``python -m benchmarks --op sparse``.
"""

import json
import sys
from dataclasses import asdict, dataclass, replace

import torch

import fastkd

from . import report
from . import cpu_memory
from .cpu_memory import _high_water_bytes, _resident_bytes
from .harness import cuda_peak_extra_bytes, time_cpu, time_cuda
from .progress import case_label, provider_label
from .providers import timed_backends

_MIB = 1 << 20


@dataclass(frozen=True)
class SparseCase:
    N: int
    H: int
    V: int
    k: int
    dtype: str  # "bf16" or "fp32"

    @property
    def torch_dtype(self):
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]


SUITES = {
    "gpu": (SparseCase(8192, 4096, 128256, 64, "bf16"),),
    "cpu": (SparseCase(1024, 256, 32000, 64, "fp32"),),
    "smoke": (SparseCase(64, 32, 1000, 8, "fp32"),),
    "quick": (SparseCase(8192, 4096, 128256, 64, "bf16"),),
}
REPEATS = {"gpu": (2, 10, 200), "cpu": (1, 5, 200), "smoke": (1, 3, 50), "quick": (1, 3, 200)}


def make_inputs(case, device, seed=0):
    """Student hidden (N, H) and lm_head (V, H); teacher hidden and lm_head of the same sizes; the
    teacher's top-k (ids (N, k), log-probs (N, k) fp32, as a cache stores them)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tensors = [torch.randn(case.N, case.H, generator=generator),
               torch.randn(case.V, case.H, generator=generator) * case.H ** -0.5 * 3,  # logits of std ~3
               torch.randn(case.N, case.H, generator=generator),
               torch.randn(case.V, case.H, generator=generator) * case.H ** -0.5 * 3]
    hidden, weight, teacher_hidden, teacher_weight = (t.to(device, case.torch_dtype) for t in tensors)
    top = fastkd.fused_linear_topk(teacher_hidden, teacher_weight, case.k)
    return hidden, weight, teacher_hidden, teacher_weight, top.indices, top.logprobs.float()


def eager_topk_kl(hidden, weight, indices, logprobs):
    """axolotl/DistillKit-style top-k forward KL, renormalised over the k ids on both sides."""
    logits = (hidden @ weight.t()).float()
    student = torch.log_softmax(logits.gather(-1, indices), -1)
    teacher = torch.log_softmax(logprobs, -1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def _steps(device):
    """{provider: (make(case, inputs) → no-argument loss function, kind)}, kind "sparse" or
    "dense" (which reference checks it), and notes."""
    names, notes = _own_code(timed_backends(device, "sparse_kd"), "sparse_kd")
    dense_names, dense_notes = timed_backends(device, "kd_rows")
    steps = {f"fastkd-{name}": (lambda case, x, name=name: lambda: fastkd.fused_linear_sparse_kd_loss(
        x[0], x[1], x[4], x[5], backend=name), "sparse") for name in names}
    steps["eager-topk"] = (lambda case, x: lambda: eager_topk_kl(x[0], x[1], x[4], x[5]), "sparse")
    steps.update({f"fastkd-dense-{name}": (lambda case, x, name=name: lambda: fastkd.fused_linear_kd_loss(
        x[0], x[1], x[2], x[3], backend=name), "dense") for name in dense_names})
    return steps, notes + [note.replace("fastkd-", "fastkd-dense-") for note in dense_notes]


def _own_code(chosen, family):
    """The backends that run their own code: rows that reuse another backend's (their registry
    note says so) would time the same code twice."""
    names, notes = chosen
    statuses = fastkd.available_backends()[family]
    reused = [name for name in names if "(note: the torch implementation" in statuses[name].reason]
    notes = notes + [f"fastkd-{name}: not run (it runs the torch backend's code)" for name in reused]
    return [name for name in names if name not in reused], notes


def reference(inputs, kind, rows_per_chunk=128):
    """float64 (loss, ∂/∂hidden, ∂/∂weight) of the sparse (renormalised top-k forward KL) or the
    dense (forward KL) loss, mean over rows, with closed-form gradients, in row chunks."""
    hidden, weight, teacher_hidden, teacher_weight, indices, logprobs = (t.double() if t.is_floating_point() else t
                                                                        for t in inputs)
    n_rows = hidden.shape[0]
    loss, grad_hidden, grad_weight = 0.0, torch.empty_like(hidden), torch.zeros_like(weight)
    for start in range(0, n_rows, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        logits = hidden[rows] @ weight.t()
        if kind == "sparse":
            log_q = torch.log_softmax(logits.gather(1, indices[rows]), -1)
            log_p = torch.log_softmax(logprobs[rows], -1)
            grad = torch.zeros_like(logits).scatter_(1, indices[rows], log_q.exp() - log_p.exp())
        else:
            log_q = torch.log_softmax(logits, -1)
            log_p = torch.log_softmax(teacher_hidden[rows] @ teacher_weight.t(), -1)
            grad = log_q.exp() - log_p.exp()
        loss += float((log_p.exp() * (log_p - log_q)).sum())
        grad /= n_rows
        grad_hidden[rows] = grad @ weight
        grad_weight += grad.t() @ hidden[rows]
    return loss / n_rows, grad_hidden, grad_weight


def _check(loss_fn, inputs, refs, kind, case):
    hidden, weight = inputs[0].detach().requires_grad_(True), inputs[1].detach().requires_grad_(True)
    loss = loss_fn(hidden, weight)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_loss, *ref_grads = refs[kind]
    errors = [abs(float(loss.detach()) - ref_loss) / abs(ref_loss)]
    errors += [float((g.double() - r).norm() / r.norm()) for g, r in zip(grads, ref_grads)]
    tolerance = 2e-2 if case.dtype == "bf16" else 1e-4
    status = "ok" if max(errors) < tolerance else "mismatch"
    return status, "rel err loss {:.1e}, grad hidden {:.1e}, grad weight {:.1e}".format(*errors)


def _bind(make, case, inputs):
    """The provider's loss as a function of the (hidden, weight) that receive gradients."""
    def loss_fn(hidden, weight):
        return make(case, (hidden, weight, *inputs[2:]))()
    return loss_fn


def _fwd_bwd(loss_fn, inputs):
    hidden, weight = inputs[0].detach().requires_grad_(True), inputs[1].detach().requires_grad_(True)
    return lambda: torch.autograd.grad(loss_fn(hidden, weight), (hidden, weight))


def _cpu_peak_mib(case, provider):
    """Peak extra resident memory of one fwd+bwd step in a fresh process, or None and a reason."""
    return cpu_memory.peak_mib("benchmarks.sparse", {"case": asdict(case), "provider": provider})


def _memory_child(payload):
    request = json.loads(payload)
    case = SparseCase(**request["case"])
    cpu = torch.device("cpu")
    make, _ = _steps(cpu)[0][request["provider"]]
    tiny = replace(case, N=2)
    tiny_inputs = make_inputs(tiny, cpu)
    _fwd_bwd(_bind(make, tiny, tiny_inputs), tiny_inputs)()  # lazy initialisation is not the op's memory
    inputs = make_inputs(case, cpu)
    step = _fwd_bwd(_bind(make, case, inputs), inputs)
    _reset_high_water()  # making the inputs (the teacher's top-k) peaks higher than some steps
    before = _resident_bytes()
    result = step()
    print(max(_high_water_bytes() - before, 0))
    del result


def _reset_high_water():
    """Linux: VmHWM back to the current resident size (writing 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def _time(step, device, suite_name):
    warmup, repeats, gpu_ms = REPEATS[suite_name]
    return time_cuda(step, gpu_ms) if device.type == "cuda" else time_cpu(step, warmup, repeats)


def run_case(case, device, suite_name, notes, label):
    inputs = make_inputs(case, device)
    refs = {kind: reference(inputs, kind) for kind in ("sparse", "dense")}
    steps, case_notes = _steps(device)
    notes += case_notes
    rows = []
    for index, (name, (make, kind)) in enumerate(steps.items(), 1):
        row = {"op": "sparse", **asdict(case), "provider": name, "loss": kind, "median_ms": None, "q20_ms": None,
               "q80_ms": None, "peak_extra_mib": None, "speedup_vs_eager": None, "check": "error",
               "check_detail": "", "note": ""}
        rows.append(row)
        try:
            loss_fn = _bind(make, case, inputs)
            row["check"], row["check_detail"] = _check(loss_fn, inputs, refs, kind, case)
            timing = _time(_fwd_bwd(loss_fn, inputs), device, suite_name)
            row.update(median_ms=timing.median_ms, q20_ms=timing.q20_ms, q80_ms=timing.q80_ms)
            if device.type == "cuda":
                row["peak_extra_mib"] = cuda_peak_extra_bytes(_fwd_bwd(loss_fn, inputs)) / _MIB
            else:
                row["peak_extra_mib"], reason = _cpu_peak_mib(case, name)
                if reason:
                    notes.append(f"{name}: {reason}")
        except Exception as exc:  # a provider that cannot run (e.g. out of memory) is reported, not fatal
            row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"{label} {provider_label(index, len(steps), name)}: "
              + (f"{row['median_ms']:.4g} ms" if row["median_ms"] else row["note"])
              + f" ({row['check']}: {row['check_detail']})", flush=True)
    report.add_ratio(rows, "speedup_vs_eager", "eager-topk", speedup=True)
    return rows


COLUMNS = ("N", "H", "V", "k", "dtype", "provider", "loss", "median ms", "q20–q80 ms", "vs eager-topk",
           "peak extra MiB", "check")


def markdown_table(rows):
    return report.op_table(COLUMNS, rows, lambda r: (str(r["N"]), str(r["H"]), str(r["V"]), str(r["k"]), r["dtype"],
                                                     r["provider"], r["loss"]), ("speedup_vs_eager",))


def run(suite_name, device, out_dir):
    """Runs the suite's sparse-teacher cases, prints the table, writes sparse.json and sparse.md."""
    environment = report.environment(device)
    print(f"sparse benchmarks on {environment['device']}: suite {suite_name!r}", flush=True)
    notes, rows = [], []
    cases = SUITES[suite_name]
    for index, case in enumerate(cases, 1):
        label = case_label("sparse", index, len(cases), f"{case.dtype} N={case.N} H={case.H} V={case.V} k={case.k}")
        rows += run_case(case, device, suite_name, notes, label)
    notes = list(dict.fromkeys(notes))
    results = {"environment": environment, "suite": suite_name, "notes": notes, "measurements": rows}
    report.write_op(out_dir, "sparse", "sparse", results,
                    "forward + backward (to the student's hidden states and lm_head) of the mean top-k forward KL, "
                    "renormalised over the k cached ids; the dense rows are the same distillation from the full "
                    "teacher (another loss, checked against its own float64 definition). Peak extra: beyond the "
                    "inputs, gradients included (CPU: resident memory of a fresh process).", markdown_table(rows))
    return results


def has_mismatch(results):
    return any(r["check"] == "mismatch" for r in results["measurements"])


if __name__ == "__main__":
    _memory_child(sys.argv[1])
