"""Where and what was measured (device, versions, commit) and the result files: results.json
with every measurement, results.md with the table."""

import json
import os
import platform
import re
import subprocess
from datetime import datetime
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

COLUMNS = ("op", "divergence", "dtype", "N", "V", "provider", "mode", "median ms", "q20–q80 ms",
           "floor/time", "vs eager", "peak extra MiB", "check")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_slug(device):
    """A folder name for the device: "nvidia-h100-80gb-hbm3", "cpu-amd-epyc-2c"."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu {_cpu_model()} {os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("(r)", "").replace("(tm)", "")).strip("-")


def _git(*args):
    try:
        done = subprocess.run(["git", *args], cwd=RESULTS_DIR.parent, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _triton_version():
    try:
        import triton
    except Exception:  # absent or broken: the report says so rather than failing
        return None
    return triton.__version__


# Settings that change what is measured: threads, the CPU allocator's huge pages, CUDA allocator.
_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "THP_MEM_ALLOC_ENABLE", "PYTORCH_CUDA_ALLOC_CONF",
             "CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET")


def environment(device):
    status = _git("status", "--porcelain", "--untracked-files=no")  # results/ is untracked until committed
    return {
        "device": device_name(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "env": {name: os.environ[name] for name in _ENV_VARS if name in os.environ},
        # Other jobs on the machine skew CPU timings; 1/5/15-minute averages at the start of the run.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def number(value, spec, suffix=""):
    """A table cell for a number, or n/a where there is none."""
    return "n/a" if value is None else format(value, spec) + suffix


def check_cell(m, floor=False):
    """The check column: ok (or floor, for a provider that is the floor), else the failure, and any note."""
    check = "floor" if floor else (m["check"] if m["check"] in ("ok", "floor") else
                                   f"{m['check'].upper()}: {m['check_detail']}")
    return check + (f" ({m['note']})" if m["note"] else "")


def table_row(m):
    spread = "n/a" if m["median_ms"] is None else f"{m['q20_ms']:.4g}–{m['q80_ms']:.4g}"
    return (m["op"], m["divergence"], m["dtype"], str(m["N"]), str(m["V"]), m["provider"], m["mode"],
            number(m["median_ms"], ".4g"), spread, number(m["floor_fraction"], ".2f"),
            number(m["speedup_vs_eager"], ".2f", "×"), number(m["peak_extra_mib"], ".1f"), check_cell(m))


def markdown_table(measurements):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_row(m)) + " |" for m in measurements]
    return "\n".join(lines)


def op_table(columns, rows, case_cells, ratio_keys, floor_provider=None):
    """One op's Markdown table: case_cells(row) gives its leading cells (the case and provider),
    then come the median, the q20–q80 spread, each ratio of ratio_keys (×), the peak extra memory
    and the check."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        spread = "n/a" if r["median_ms"] is None else f"{r['q20_ms']:.3g}–{r['q80_ms']:.3g}"
        cells = (*case_cells(r), number(r["median_ms"], ".4g"), spread,
                 *(number(r[key], ".2f", "×") for key in ratio_keys), number(r["peak_extra_mib"], ".1f"),
                 check_cell(r, floor=r["provider"] == floor_provider))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_ratio(rows, key, baseline, speedup):
    """row[key] for every timed row against the provider ``baseline``: its time over this one's
    (speedup) or this one's over its; left as it is where either time is missing."""
    base = next((r["median_ms"] for r in rows if r["provider"] == baseline), None)
    for row in rows:
        if base and row["median_ms"]:
            row[key] = base / row["median_ms"] if speedup else row["median_ms"] / base


def _load(averages):
    return "n/a" if not averages else " / ".join(f"{a:.2f}" for a in averages)


def markdown(results):
    env = results["environment"]
    header = [
        f"# kd_loss benchmarks: {env['device']}",
        "",
        f"{env['date']} · torch {env['torch']} · triton {env['triton']} · CUDA {env['cuda']} · "
        f"commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''} · suite `{results['suite']}` · "
        f"load average {_load(env.get('load_average'))}",
        "",
        f"Copy bandwidth measured in this run: {results['copy_bandwidth_gbs']:.1f} GB/s. "
        "floor/time: the bandwidth floor (5·N·V·b fwd+bwd for KL, 7·N·V·b for mixtures; 2 and 4 "
        "forward only) over the median time, 1.00 = at the floor. vs eager: eager time / this time. "
        "Peak extra: memory beyond the inputs during one step, output and gradient included.",
        "",
    ]
    notes = [f"- {note}" for note in results["notes"]]
    return "\n".join(header + notes + ([""] if notes else []) + [markdown_table(results["measurements"]), ""])


def write(results, out_dir):
    """Writes results.json and results.md into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(markdown(results))
    return [json_path, md_path]


def write_op(out_dir, stem, op, results, explanation, table):
    """Writes ``<stem>.json`` and ``<stem>.md`` (title, environment, explanation, notes, table) for
    one op's results, prints the table and notes; returns the two paths."""
    env = results["environment"]
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    text = [f"# {op} benchmarks: {env['device']}", "",
            f"{env['date']} · torch {env['torch']} · triton {env['triton']} · commit {env['git_commit']}"
            f"{' (dirty)' if env['git_dirty'] else ''} · suite `{results['suite']}`", "", explanation, ""]
    text += [f"- {note}" for note in results["notes"]] + ["", table, ""]
    md_path.write_text("\n".join(text))
    print()
    print(table)
    for note in results["notes"]:
        print(f"note: {note}")
    print(f"wrote {json_path}, {md_path}")
    return [json_path, md_path]
