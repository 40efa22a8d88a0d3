#!/usr/bin/env python3
"""Writes the README's GPU table from a benchmark results folder (results.json, fused_linear.json,
sinkhorn.json: whichever are there), between the README's gpu-results markers.

    python scripts/gpu_readme_table.py benchmarks/results/nvidia-h100-80gb-hbm3 [README.md]

The forward + backward time of each provider at each measured size, its distance to the floor
(bandwidth floor for kd_loss, the four GEMMs for the fused loss) and the peer it is compared with.
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- gpu-results:start -->", "<!-- gpu-results:end -->"


def _ms(value):
    return "n/a" if value is None else f"{value:.4g}"


def _times(value, suffix="×"):
    return "n/a" if value is None else f"{value:.2f}{suffix}"


def _check(row):
    return row["check"] if row["check"] == "ok" else f"**{row['check']}**"


def kd_loss_rows(results):
    for r in results["measurements"]:
        if r["mode"] == "fwd+bwd":
            case = f"kd_loss {r['divergence']} {r['dtype']} N={r['N']} V={r['V']}"
            yield (case, r["provider"], _ms(r["median_ms"]), f"floor/time {_times(r['floor_fraction'], '')}",
                   f"{_times(r['speedup_vs_eager'])} vs eager", _check(r))


def fused_linear_rows(results):
    for r in results["measurements"]:
        case = f"fused linear jsd {r['dtype']} N={r['N']} H={r['Hs']} V={r['V']}"
        check = "floor" if r["provider"] == "gemms" else _check(r)
        yield (case, r["provider"], _ms(r["median_ms"]), f"{_times(r['vs_gemms'])} the GEMMs",
               f"{_times(r['speedup_vs_eager'])} vs eager", check)


def sinkhorn_rows(results):
    for r in results["measurements"]:
        case = f"Sinkhorn {r['kind']} B={r['B']} {r['n']}×{r['m']} {r['n_iter']} iters {r['mode']}"
        yield (case, r["provider"], _ms(r["median_ms"]), "", f"{_times(r['speedup_vs_peer'])} vs peer", _check(r))


def table(folder):
    folder = Path(folder)
    sources = (("results.json", kd_loss_rows), ("fused_linear.json", fused_linear_rows),
               ("sinkhorn.json", sinkhorn_rows))
    rows, environment = [], None
    for name, make_rows in sources:
        path = folder / name
        if path.exists():
            results = json.loads(path.read_text())
            environment = environment or results["environment"]
            rows += list(make_rows(results))
    if not rows:
        raise SystemExit(f"no benchmark results in {folder}")
    env = environment
    head = (f"Measured on {env['device']}, {env['date'][:10]} (torch {env['torch']}, Triton {env['triton']}, "
            f"CUDA {env['cuda']}, commit {str(env['git_commit'])[:10]}); full tables in "
            f"`{folder.resolve().relative_to(ROOT).as_posix() if folder.resolve().is_relative_to(ROOT) else folder}/`.")
    lines = [head, "", "| case | provider | fwd+bwd ms | floor | vs | check |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def update(readme, text):
    content = readme.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(content):
        raise SystemExit(f"{readme} has no {START} … {END} block")
    readme.write_text(pattern.sub(lambda _: f"{START}\n{text}\n{END}", content))


def main(argv):
    if not 1 <= len(argv) <= 2:
        raise SystemExit(__doc__)
    readme = Path(argv[1]) if len(argv) > 1 else ROOT / "README.md"
    update(readme, table(argv[0]))
    print(f"updated the GPU table of {readme}")


if __name__ == "__main__":
    main(sys.argv[1:])
