"""Runs the kd_loss benchmarks for this machine's device and writes results/ (see benchmarks/__init__.py)."""

import argparse
import sys
from pathlib import Path

import torch

from . import config, fused_linear, report, runner, sinkhorn, sparse, topk, tp, vision_kd


def _parse(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--smoke", action="store_true", help="tiny sizes, every divergence: a quick end-to-end check")
    sizes.add_argument("--quick", action="store_true",
                       help="the GPU target sizes only: kd_loss forward_kl and jsd at N=8192, V=128256 bf16, the fused "
                       "linear loss at N=8192, H=4096, V=128256, the Sinkhorn WKD case (B=256, C=1000)")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<device>/, "
                        "smoke-<device>/ with --smoke, custom-<device>/ when sizes are overridden)")
    parser.add_argument("--divergences", nargs="+", metavar="NAME", help="only these divergences")
    parser.add_argument("--shape", nargs=2, type=int, metavar=("N", "V"), help="rows and vocabulary size")
    parser.add_argument("--dtype", choices=sorted(config.DTYPES), help="logits dtype")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="time torch.compile of the eager code (auto: on CUDA, and in --smoke on CPU)")
    parser.add_argument("--op", choices=("all", "kd_loss", "fused_linear", "sinkhorn", "sparse", "topk", "vision_kd",
                                         "tp"),
                        default="all",
                        help="which benchmarks: kd_loss, the fused linear loss (benchmarks/fused_linear.py), the "
                        "Sinkhorn cases (benchmarks/sinkhorn.py), the sparse (top-k) teacher losses "
                        "(benchmarks/sparse.py), fused_linear_topk (benchmarks/topk.py), DKD and "
                        "standardised KD at vision sizes (benchmarks/vision_kd.py), the vocab-parallel fused loss "
                        "(benchmarks/tp.py: counted; measured where 2+ GPUs exist), or all (size overrides apply "
                        "to kd_loss, which then runs alone)")
    return parser.parse_args(argv)


def main(argv=None):
    args = _parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    suite_name = config.default_suite_name(device, args.smoke, args.quick)
    suite = config.SUITES[suite_name]
    custom = bool(args.divergences or args.shape or args.dtype)
    suite = config.override(suite, args.divergences, args.shape, args.dtype)

    notes = []
    with_compile = {"on": True, "off": False}.get(args.compile, device.type == "cuda" or args.smoke)
    if not with_compile:
        notes.append("compile: not run (" + ("--compile off" if args.compile == "off" else
                     "on this CPU compiling each divergence costs more than the run; --compile on forces it") + ")")

    prefix = "smoke-" if args.smoke else "quick-" if args.quick else "custom-" if custom else ""
    out_dir = args.out or report.RESULTS_DIR / (prefix + report.device_slug(device))
    failed = False
    if args.op in ("all", "kd_loss"):
        results = runner.run(suite, device, out_dir, with_compile, notes)
        failed |= runner.has_mismatch(results)
    if args.op == "fused_linear" or (args.op == "all" and not custom):
        failed |= fused_linear.has_mismatch(fused_linear.run(suite_name, device, out_dir))
    if args.op == "sinkhorn" or (args.op == "all" and not custom):
        sinkhorn_results = sinkhorn.run(suite_name, device, out_dir)
        failed |= sinkhorn.has_mismatch(sinkhorn_results)
    # Not in the --smoke run: its fresh-process memory probes take a minute on the 2-core CPU.
    if args.op == "sparse" or (args.op == "all" and not custom and not args.smoke):
        failed |= sparse.has_mismatch(sparse.run(suite_name, device, out_dir))
    if args.op == "topk" or (args.op == "all" and not custom):
        failed |= topk.has_mismatch(topk.run(suite_name, device, out_dir))
    if args.op == "vision_kd" or (args.op == "all" and not custom):
        failed |= vision_kd.has_mismatch(vision_kd.run(suite_name, device, out_dir))
    if args.op == "tp" or (args.op == "all" and not custom):
        failed |= tp.has_mismatch(tp.run(suite_name, device, out_dir))
    # A wrong answer fails the run (CI runs --smoke); a provider that cannot run here is a note.
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
