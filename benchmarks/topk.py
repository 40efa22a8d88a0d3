"""The fused_linear_topk benchmarks of issue 16 (a teacher's top-k cache from hidden states).

One case: N tokens, hidden size H, vocabulary V, k entries per row, forward only. Providers, on
the same inputs; each is checked against the float64 top-k of the full log-softmax before it is
timed (tie-tolerant: the k largest values, and each id's reference log-prob equal to its own):

    fastkd-<backend>   fastkd.fused_linear_topk
    eager              torch.log_softmax(hidden @ weight.T, -1).topk(k): the full (N, V) logits
    gemm               hidden @ weight.T alone: the teacher's GEMM, the floor every provider is set against

Peak extra memory: on CUDA from the allocator; on a CPU the high-water mark of resident memory
of a fresh process (``python -m benchmarks.topk '<json>'``), outputs included. Issue 16's target,
on a GPU: fused_linear_topk ≤ 1.1× the GEMM. Run by ``python -m benchmarks --op topk``.
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
class TopKCase:
    N: int
    H: int
    V: int
    k: int
    dtype: str  # "bf16" or "fp32"

    @property
    def torch_dtype(self):
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]


SUITES = {
    "gpu": (TopKCase(8192, 4096, 128256, 64, "bf16"),),
    "cpu": (TopKCase(2048, 512, 32000, 64, "fp32"),),
    "smoke": (TopKCase(64, 32, 1000, 8, "fp32"),),
    "quick": (TopKCase(8192, 4096, 128256, 64, "bf16"),),
}
REPEATS = {"gpu": (2, 10, 200), "cpu": (1, 5, 200), "smoke": (1, 3, 50), "quick": (1, 3, 200)}


def make_inputs(case, device, seed=0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(case.N, case.H, generator=generator)
    weight = torch.randn(case.V, case.H, generator=generator) * case.H ** -0.5 * 3  # logits of std ~3
    return hidden.to(device, case.torch_dtype), weight.to(device, case.torch_dtype)


def eager_topk(hidden, weight, k):
    return torch.log_softmax((hidden @ weight.t()).float(), -1).topk(k, dim=-1)


def _steps(device):
    """{provider: (make(case, hidden, weight) → no-argument step, checked)} and notes."""
    names, notes = timed_backends(device, "topk")
    steps = {f"fastkd-{name}": (lambda case, h, w, name=name: lambda: fastkd.fused_linear_topk(
        h, w, case.k, backend=name), True) for name in names}
    steps["eager"] = (lambda case, h, w: lambda: eager_topk(h, w, case.k), True)
    steps["gemm"] = (lambda case, h, w: lambda: h @ w.t(), False)
    return steps, notes


class Reference:
    """The float64 problem of a case, kept small: each row's log-sum-exp and top-k log-probs,
    computed in chunks of rows (at N=8192, V=128256 the float64 log-probs would be 8 GB); the
    log-prob at any ids is recomputed from the inputs on demand."""

    def __init__(self, hidden, weight, k, rows_per_chunk=256):
        self.hidden, self.weight, self.rows_per_chunk = hidden, weight, rows_per_chunk
        log_sums, tops = [], []
        for start in range(0, hidden.shape[0], rows_per_chunk):
            logits = hidden[start:start + rows_per_chunk].double() @ weight.double().t()
            log_sums.append(torch.logsumexp(logits, -1))
            tops.append(logits.topk(k, dim=-1).values - log_sums[-1][:, None])
        self.log_sum, self.top = torch.cat(log_sums), torch.cat(tops)

    def at(self, indices):
        """float64 log-probs (N, k) of the rows at ``indices`` (N, k)."""
        out = []
        for start in range(0, indices.shape[0], self.rows_per_chunk):
            rows = slice(start, start + self.rows_per_chunk)
            logits = torch.einsum("nh,nkh->nk", self.hidden[rows].double(), self.weight[indices[rows]].double())
            out.append(logits - self.log_sum[rows][:, None])
        return torch.cat(out)


def _check(result, ref, case):
    """(status, detail) of a provider's (values, indices) against the float64 reference."""
    values, indices = (result.logprobs, result.indices) if isinstance(result, fastkd.TopK) else result
    values = values.double()
    error = float((values - ref.top).norm() / ref.top.norm())
    at_ids = float((values - ref.at(indices)).norm() / ref.top.norm())
    tolerance = 2e-2 if case.dtype == "bf16" else 2e-5
    status = "ok" if max(error, at_ids) < tolerance else "mismatch"
    return status, f"rel err {error:.1e} (values), {at_ids:.1e} (at its ids)"


def _cpu_peak_mib(case, provider):
    """Peak extra resident memory of one step in a fresh process, or None and a reason."""
    return cpu_memory.peak_mib("benchmarks.topk", {"case": asdict(case), "provider": provider})


def _memory_child(payload):
    request = json.loads(payload)
    case = TopKCase(**request["case"])
    make, _ = _steps(torch.device("cpu"))[0][request["provider"]]
    cpu = torch.device("cpu")
    tiny = replace(case, N=2)
    make(tiny, *make_inputs(tiny, cpu))()  # lazy initialisation is not the op's memory
    step = make(case, *make_inputs(case, cpu))
    before = _resident_bytes()
    result = step()
    print(max(_high_water_bytes() - before, 0))
    del result


def _time(step, device, suite_name):
    warmup, repeats, gpu_ms = REPEATS[suite_name]
    return time_cuda(step, gpu_ms) if device.type == "cuda" else time_cpu(step, warmup, repeats)


def run_case(case, device, suite_name, notes, label):
    hidden, weight = make_inputs(case, device)
    ref = Reference(hidden, weight, case.k)
    steps, case_notes = _steps(device)
    notes += case_notes
    rows = []
    for index, (name, (make, checked)) in enumerate(steps.items(), 1):
        row = {"op": "topk", **asdict(case), "provider": name, "median_ms": None, "q20_ms": None, "q80_ms": None,
               "peak_extra_mib": None, "vs_gemm": None, "speedup_vs_eager": None, "check": "ok" if checked else "floor",
               "check_detail": "", "note": ""}
        rows.append(row)
        try:
            step = make(case, hidden, weight)
            result = step()
            if checked:
                row["check"], row["check_detail"] = _check(result, ref, case)
            del result
            timing = _time(step, device, suite_name)
            row.update(median_ms=timing.median_ms, q20_ms=timing.q20_ms, q80_ms=timing.q80_ms)
            if device.type == "cuda":
                row["peak_extra_mib"] = cuda_peak_extra_bytes(step) / _MIB
            else:
                row["peak_extra_mib"], reason = _cpu_peak_mib(case, name)
                if reason:
                    notes.append(f"{name}: {reason}")
        except Exception as exc:  # a provider that cannot run (e.g. out of memory) is reported, not fatal
            row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if checked and not row["check_detail"]:
                row["check"] = "error"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"{label} {provider_label(index, len(steps), name)}: "
              + (f"{row['median_ms']:.4g} ms" if row["median_ms"] else row["note"])
              + (f" ({row['check']}: {row['check_detail']})" if checked else ""), flush=True)
    report.add_ratio(rows, "vs_gemm", "gemm", speedup=False)
    report.add_ratio(rows, "speedup_vs_eager", "eager", speedup=True)
    return rows


COLUMNS = ("N", "H", "V", "k", "dtype", "provider", "median ms", "q20–q80 ms", "× gemm", "vs eager",
           "peak extra MiB", "check")


def markdown_table(rows):
    return report.op_table(COLUMNS, rows, lambda r: (str(r["N"]), str(r["H"]), str(r["V"]), str(r["k"]), r["dtype"],
                                                     r["provider"]), ("vs_gemm", "speedup_vs_eager"))


def run(suite_name, device, out_dir):
    """Runs the suite's top-k cases, prints the table, writes topk.json and topk.md."""
    environment = report.environment(device)
    print(f"topk benchmarks on {environment['device']}: suite {suite_name!r}", flush=True)
    notes, rows = [], []
    cases = SUITES[suite_name]
    for index, case in enumerate(cases, 1):
        label = case_label("topk", index, len(cases), f"{case.dtype} N={case.N} H={case.H} V={case.V} k={case.k}")
        rows += run_case(case, device, suite_name, notes, label)
    notes = list(dict.fromkeys(notes))
    results = {"environment": environment, "suite": suite_name, "notes": notes, "measurements": rows}
    report.write_op(out_dir, "topk", "topk", results,
                    "forward only: top-k ids and log-probabilities of softmax(hidden @ weight.T). × gemm: time over "
                    "the teacher's GEMM alone (issue 16's target ≤ 1.1× on a GPU). Peak extra: beyond the inputs, "
                    "outputs included (CPU: resident memory of a fresh process).", markdown_table(rows))
    return results


def has_mismatch(results):
    return any(r["check"] == "mismatch" for r in results["measurements"])


if __name__ == "__main__":
    _memory_child(sys.argv[1])
