"""The cost of ``fp32_logits`` in the fused linear loss: time and peak memory, on vs off.

One case (default N = 1024, H = 512, V = 32000, bf16, forward KL, T = 1, mean), forward+backward
with gradients to the student's hidden states and weight. Both settings run on the same inputs,
interleaved (on, off, on, off, …) so that load from other processes falls on both alike; the
median and the 20/80 quantiles are printed. Peak memory: on a CPU, each setting in a fresh process
(VmHWM after one step minus VmRSS before it, as benchmarks/cpu_memory.py measures); on a GPU,
``max_memory_allocated`` during one step minus what was allocated before it.

    python -m benchmarks.fp32_logits [--n 1024 --h 512 --v 32000 --repeats 7]
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastkd

REPO_ROOT = Path(__file__).resolve().parent.parent
_MIB = 1 << 20


def make_inputs(n_rows, hidden, vocab, device, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=torch.bfloat16)

    return {"student_hidden": randn(n_rows, hidden).requires_grad_(True),
            "student_weight": randn(vocab, hidden, scale=1 / math.sqrt(hidden)).requires_grad_(True),
            "teacher_hidden": randn(n_rows, hidden),
            "teacher_weight": randn(vocab, hidden, scale=1 / math.sqrt(hidden))}


def step(inputs, fp32_logits):
    loss = fastkd.fused_linear_kd_loss(**inputs, fp32_logits=fp32_logits)
    return torch.autograd.grad(loss, (inputs["student_hidden"], inputs["student_weight"]))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(inputs, device, repeats):
    """{fp32_logits: [ms, …]} of fwd+bwd, the two settings alternating, after one warm-up each."""
    times = {True: [], False: []}
    for fp32 in (True, False):
        step(inputs, fp32)
    for _ in range(repeats):
        for fp32 in (True, False):
            _sync(device)
            start = time.perf_counter()
            step(inputs, fp32)
            _sync(device)
            times[fp32].append((time.perf_counter() - start) * 1e3)
    return times


def _status_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} missing from /proc/self/status")


def _cpu_peak_child(n_rows, hidden, vocab, fp32):
    step(make_inputs(4, hidden, 64, torch.device("cpu")), fp32)  # lazy initialisation is not the op's
    inputs = make_inputs(n_rows, hidden, vocab, torch.device("cpu"))
    before = _status_bytes("VmRSS")
    grads = step(inputs, fp32)
    print(json.dumps({"extra": _status_bytes("VmHWM") - before}))
    del grads


def cpu_peak_extra(n_rows, hidden, vocab, fp32):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "benchmarks.fp32_logits", "--child",
                           json.dumps([n_rows, hidden, vocab, fp32])], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["extra"]


def cuda_peak_extra(inputs, fp32):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = step(inputs, fp32)
    torch.cuda.synchronize()
    del grads
    return torch.cuda.max_memory_allocated() - before


def _quantiles(values):
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return statistics.median(values), pick(0.2), pick(0.8)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--h", type=int, default=512)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _cpu_peak_child(*json.loads(args.child))
        return
    device = torch.device(args.device)
    inputs = make_inputs(args.n, args.h, args.v, device)
    times = time_interleaved(inputs, device, args.repeats)
    print(f"fused_linear_kd_loss fwd+bwd, forward_kl, N={args.n} H={args.h} V={args.v} bf16, {device.type} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}, median of {args.repeats} (20%/80%)")
    for fp32 in (False, True):
        if device.type == "cuda":
            extra = cuda_peak_extra(inputs, fp32)
        else:
            extra = cpu_peak_extra(args.n, args.h, args.v, fp32)
        median, low, high = _quantiles(times[fp32])
        print(f"  fp32_logits={fp32!s:5}  {median:8.1f} ms ({low:.1f}/{high:.1f})  peak extra {extra / _MIB:7.1f} MiB")
    ratio = statistics.median(times[True]) / statistics.median(times[False])
    print(f"  time on/off: {ratio:.2f}x")


if __name__ == "__main__":
    main()
