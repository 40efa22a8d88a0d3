"""The run: for each case, check every provider against the float64 reference, then time each
mode, measure peak memory, and set each time against the bandwidth floor and the eager time."""

import torch

from . import checks, cpu_memory, floors, plot, report
from .progress import case_label, provider_label
from .config import MODES, OP
from .harness import cuda_peak_extra_bytes, make_step, time_step
from .providers import make_inputs, select

_MIB = 1 << 20


def _is_oom(exc):
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


def _measurement(case, provider, mode, check, bandwidth):
    floor = floors.floor_bytes(case, mode)
    return {"op": OP, "divergence": case.divergence, "dtype": case.dtype, "N": case.N, "V": case.V,
            "provider": provider, "mode": mode, "median_ms": None, "q20_ms": None, "q80_ms": None,
            "repeats": None, "floor_bytes": floor, "floor_ms": floor / bandwidth * 1e3, "floor_fraction": None,
            "speedup_vs_eager": None, "peak_extra_mib": None, "check": check.status,
            "check_detail": check.detail, "note": ""}


def _cpu_memory(case, provider, notes):
    """{mode: extra bytes} from a fresh process, or None with a note saying why."""
    if not provider.fresh_process_memory:
        notes.append(f"{provider.name}: CPU memory not measured (a fresh process would compile again first)")
        return None
    extra, reason = cpu_memory.measure(case, provider.name, MODES)
    if extra is None:
        notes.append(f"{provider.name} {case.divergence}: {reason}")
    return extra


def _time_and_measure(row, step, device, suite):
    """Fills ``row``'s time (and GPU memory) for one mode; a failure becomes a note, not an abort."""
    try:
        timing = time_step(step, device, suite)
        extra = cuda_peak_extra_bytes(step) if device.type == "cuda" else None
    except RuntimeError as exc:
        row["note"] = "out of memory" if _is_oom(exc) else f"{type(exc).__name__}: {exc}".splitlines()[0]
    if row["note"]:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # here, not in the except block, whose traceback pins the tensors
        return
    row.update(median_ms=timing.median_ms, q20_ms=timing.q20_ms, q80_ms=timing.q80_ms, repeats=timing.repeats,
               floor_fraction=row["floor_ms"] / timing.median_ms,
               peak_extra_mib=None if extra is None else extra / _MIB)


def _check_all(case, providers, inputs, label):
    """Each provider's loss function and its check against the float64 reference, before timing."""
    ref_loss, ref_grad = checks.reference(case, *inputs)
    checked = []
    for index, provider in enumerate(providers, 1):
        loss_fn = provider.make(case)
        result = checks.check(loss_fn, *inputs, ref_loss, ref_grad)
        print(f"{label} check {provider_label(index, len(providers), provider.name)}: {result.status} "
              f"({result.detail})", flush=True)
        checked.append((provider, loss_fn, result))
    return checked


def run_case(case, providers, device, suite, bandwidth, notes, label):
    """All measurements of one case: a list of dicts, one per (provider, mode)."""
    inputs = make_inputs(case, device)
    rows = []
    for index, (provider, loss_fn, check) in enumerate(_check_all(case, providers, inputs, label), 1):
        provider_rows = [_measurement(case, provider.name, mode, check, bandwidth) for mode in MODES]
        rows += provider_rows
        if check.status == "error":
            for row in provider_rows:
                row["note"] = "not timed: it failed to run"
            continue
        for row in provider_rows:
            _time_and_measure(row, make_step(loss_fn, *inputs, row["mode"]), device, suite)
            print(f"{label} {provider_label(index, len(providers), provider.name)} {row['mode']}: "
                  + (f"{row['median_ms']:.4g} ms" if row["median_ms"] is not None else row["note"]), flush=True)
        if device.type == "cpu":
            extra = _cpu_memory(case, provider, notes)
            for row in provider_rows:
                if extra is not None and row["median_ms"] is not None:
                    row["peak_extra_mib"] = extra[row["mode"]] / _MIB
    return rows


def _speedups(rows):
    eager = {(r["divergence"], r["dtype"], r["N"], r["V"], r["mode"]): r["median_ms"]
             for r in rows if r["provider"] == "eager"}
    for r in rows:
        base = eager.get((r["divergence"], r["dtype"], r["N"], r["V"], r["mode"]))
        if base is not None and r["median_ms"] is not None:
            r["speedup_vs_eager"] = base / r["median_ms"]


def run(suite, device, out_dir, with_compile, notes=()):
    """Runs ``suite`` on ``device``, prints the table and writes results into ``out_dir``."""
    environment = report.environment(device)
    print(f"kd_loss benchmarks on {environment['device']}: suite {suite.name!r}, torch {environment['torch']}, "
          f"triton {environment['triton']}, commit {environment['git_commit']}", flush=True)
    providers, provider_notes = select(device, with_compile)
    notes = list(notes) + provider_notes
    for note in notes:
        print(f"note: {note}", flush=True)
    bandwidth = floors.copy_bandwidth(device)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)

    rows = []
    for index, case in enumerate(suite.cases, 1):
        label = case_label("kd_loss", index, len(suite.cases), f"{case.divergence} {case.dtype} N={case.N} V={case.V}")
        rows += run_case(case, providers, device, suite, bandwidth, notes, label)
    _speedups(rows)
    notes = list(dict.fromkeys(notes))  # one per provider, not one per case

    results = {"environment": environment, "suite": suite.name, "copy_bandwidth_gbs": bandwidth / 1e9,
               "notes": notes, "measurements": rows}
    paths = report.write(results, out_dir)
    try:
        paths += plot.plot(results, out_dir)
    except ImportError as exc:  # matplotlib is not on every GPU machine; the data is written anyway
        print(f"note: no plot ({exc})")
    print()
    print(report.markdown_table(rows))
    for note in notes:
        print(f"note: {note}")
    mismatches = [r for r in rows if r["check"] != "ok"]
    if mismatches:
        print(f"WARNING: {len(mismatches)} rows disagree with fastkd or failed; see the check column")
    print("wrote " + ", ".join(str(p) for p in paths))
    return results


def has_mismatch(results):
    """Whether a provider that ran computed a different loss or gradient than fastkd."""
    return any(m["check"] == "mismatch" for m in results["measurements"])
