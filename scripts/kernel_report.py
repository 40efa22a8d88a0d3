#!/usr/bin/env python3
"""What the compilers say about every GPU kernel of fastkd, without a GPU: compiles each Triton
kernel at the specialisations its launchers choose for realistic sizes, and each CUDA C++ kernel
with nvcc, for sm_90 and sm_80, and writes docs/kernel-report.md (registers, spills, shared memory,
16-byte loads, resident programs, bytes in flight, static issue ceilings; the method is at the top
of the report).

    python scripts/kernel_report.py                 # regenerate docs/kernel-report.md
    python scripts/kernel_report.py --check         # CI: is the committed report current and clean?
    python scripts/kernel_report.py --verify        # regenerate and compare with the committed one
    python scripts/kernel_report.py --select "kd_rows bfloat16 V=128256" --arch 90 --out -   # a quick look

Exit status: 0 clean; 1 a kernel fails to compile, spills, is not
covered by any case, or a launcher cannot be called; 2 (--check, --verify) the committed report is
stale. --check compiles nothing: it records every launch, derives every specialisation's key
(source, specialisation, options, compiler versions, the report's code) and compares their digest
with the one the committed report was generated from; a matching report's gate is this code's
gate. Compile results are cached (~/.cache/fastkd/kernel-report, by key), so a regeneration
compiles only what changed. Runs without TRITON_INTERPRET (the interpreter replaces the compiler).
"""

import argparse
import difflib
import os
import re
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kreport import cache, collect, gate, gpus, render  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "kernel-report.md"
_INPUTS = re.compile(r"<!-- inputs: ([0-9a-f]+) gate: (pass|fail) -->")


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPORT), help="where to write the report ('-': stdout)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="compile nothing: exit 2 if the committed report's inputs digest is not this code's, "
                      "else the committed report's gate")
    mode.add_argument("--verify", action="store_true",
                      help="regenerate and compare with the committed report instead of writing it: exit 2 if it differs")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--cache-dir", default=str(cache.default_directory()), help="'' disables the cache")
    parser.add_argument("--select", help="only cases whose label holds every word (partial report, never gated "
                        "for coverage)")
    parser.add_argument("--arch", type=int, action="append", choices=gpus.ARCHS, help="only these targets")
    parser.add_argument("--no-cuda", action="store_true", help="leave out the CUDA C++ kernels (partial report)")
    args = parser.parse_args(argv)
    partial = args.select or args.arch or args.no_cuda
    if partial and (args.check or args.verify):
        parser.error("--check and --verify compare the whole report")
    if partial and args.out == str(REPORT):
        args.out = "-"  # a partial report never replaces the committed one
    return args


def _selector(words):
    if not words:
        return None
    wanted = words.split()
    return lambda case: all(word in case.label.split() or word in case.label for word in wanted)


def inputs_digest(collected):
    """What the report is made of: every compile result's key, the kernels left uncovered, and the
    report's own code (cases, metrics, rendering, gate)."""
    return cache.digest(*collected.keys, *collected.uncovered, cache.code_version())


def check(path, archs):
    """--check: the committed report against this code, compiling nothing."""
    planned = collect.collect(None, 1, None, archs, plan_only=True)
    committed = _INPUTS.search(Path(path).read_text()) if Path(path).exists() else None
    for name in planned.uncovered:
        print(f"kernel report: FAIL: no case covers {name}", file=sys.stderr)
    if committed is None or committed.group(1) != inputs_digest(planned):
        print(f"kernel report: {path} is stale (its inputs digest is not this code's): run `make kernel-report` "
              "and commit it", file=sys.stderr)
        return 2
    if committed.group(2) != "pass" or planned.uncovered:
        print(f"kernel report: the current report's gate fails: see the Gate section of {path}", file=sys.stderr)
        return 1
    print(f"kernel report: {path} is current and its gate passes", file=sys.stderr)
    return 0


def build(collected):
    """The report's text and its gate failures."""
    reasons = gate.failures(collected)
    parts = [
        "# Kernel report",
        "",
        f"<!-- inputs: {inputs_digest(collected)} gate: {'fail' if reasons else 'pass'} -->",
        "Generated by `scripts/kernel_report.py` (`make kernel-report`); do not edit. CI checks that it is "
        "current (`--check`: the digest above covers every kernel source, specialisation, compiler version "
        "and the report's own code).",
        "",
        render.method(collected.toolchain),
        "## Gate",
        "",
        ("**FAIL**:\n\n" + "\n".join(f"- {reason}" for reason in reasons)) if reasons else
        "**pass**: every kernel compiles for every target, every kernel is covered, and none spills.",
    ]
    target = [(case, kernel, description, key, result)
              for arch, case, kernel, description, key, result in collected.triton_rows
              if case.family in ("kd_rows", "kl_div", "ce") and arch == render.TARGET_CASE["arch"]
              and case.dtype == render.TARGET_CASE["dtype"] and case.size == render.TARGET_CASE["size"]]
    if target:
        parts += ["", f"## Target: logits kernels at bf16, V = 128256, sm_90 (issue ceiling ≥ {gpus.TARGET_TB_S} TB/s)",
                  "", render.target_table(target)]
    for arch in sorted({row[0] for row in collected.triton_rows}, reverse=True):
        gpu = gpus.GPUS[arch]
        parts += ["", f"## Triton kernels, sm_{arch} ({gpu.name})"]
        for family in render.FAMILY_ORDER:
            rows = [(case, kernel, description, key, result)
                    for row_arch, case, kernel, description, key, result in collected.triton_rows
                    if row_arch == arch and case.family == family]
            if rows:
                parts += ["", f"### {family}", "", render.triton_table(rows, gpu)]
    for arch in sorted({row[0] for row in collected.cuda_rows}, reverse=True):
        gpu = gpus.GPUS[arch]
        selected = [row for row in collected.cuda_rows if row[0] == arch]
        names = render.demangle([row[2] for row in selected])
        rows = [(source, name, result) for (_, source, _, result), name in zip(selected, names)]
        parts += ["", f"## CUDA C++ kernels, sm_{arch} ({gpu.name})", "", render.cuda_table(rows, gpu)]
    return "\n".join(parts) + "\n", reasons


def main(argv=None):
    args = _parse(argv)
    started = time.time()
    archs = tuple(args.arch) if args.arch else gpus.ARCHS
    if args.check:
        return check(args.out, archs)
    collected = collect.collect(args.cache_dir or None, max(1, args.jobs), _selector(args.select), archs,
                                with_cuda=not args.no_cuda)
    text, reasons = build(collected)
    print(f"kernel report: {len(collected.keys)} compile results ({collected.compiled} compiled now) in "
          f"{time.time() - started:.0f} s", file=sys.stderr)
    for reason in reasons:
        print(f"kernel report: FAIL: {reason}", file=sys.stderr)
    status = 1 if reasons else 0
    if args.verify:
        committed = Path(args.out).read_text() if Path(args.out).exists() else ""
        if committed != text:
            diff = difflib.unified_diff(committed.splitlines(), text.splitlines(), "committed", "current", lineterm="")
            print("\n".join(list(diff)[:200]), file=sys.stderr)
            print(f"kernel report: {args.out} is stale: run `make kernel-report` and commit it", file=sys.stderr)
            return 2
        return status
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
