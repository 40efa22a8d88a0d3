"""Timing of one step (forward, or forward+backward) and its peak extra GPU memory.

GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs) median with the 20/80
quantiles; CUDA events by hand where triton is missing. CPU: ``time.perf_counter`` median of
repeats after warm-up. CPU memory is measured in a fresh process: see ``cpu_memory``.
"""

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    q20_ms: float
    q80_ms: float
    repeats: int  # None where do_bench chose the count


def make_step(loss_fn, student, teacher, mode):
    """A no-argument callable running one ``mode`` step ("fwd" or "fwd+bwd").

    The forward runs with a student that requires grad, as in training, so it includes saving
    what the backward needs. ``autograd.grad`` returns the gradient instead of accumulating it
    into ``student.grad``, so repeated steps do not add work.
    """
    if mode == "fwd":
        return lambda: loss_fn(student, teacher)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(loss_fn(student, teacher), student)
    raise ValueError(f"unknown mode {mode!r}")


def _quantiles(times_ms):
    if len(times_ms) < 2:
        return times_ms[0], times_ms[0]
    cuts = statistics.quantiles(times_ms, n=5)  # the 20th, 40th, 60th and 80th percentiles
    return cuts[0], cuts[3]


def time_cpu(step, warmup, repeats):
    for _ in range(warmup):
        step()
    times_ms = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times_ms.append((time.perf_counter() - start) * 1e3)
    q20, q80 = _quantiles(times_ms)
    return Timing(statistics.median(times_ms), q20, q80, repeats)


def _time_cuda_events(step, rep_ms):
    step()
    torch.cuda.synchronize()
    times_ms, total = [], 0.0
    while total < rep_ms or len(times_ms) < 5:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        stop.record()
        stop.synchronize()
        times_ms.append(start.elapsed_time(stop))
        total += times_ms[-1]
    q20, q80 = _quantiles(times_ms)
    return Timing(statistics.median(times_ms), q20, q80, len(times_ms))


def time_cuda(step, rep_ms):
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_cuda_events(step, rep_ms)
    median, q20, q80 = do_bench(step, warmup=max(rep_ms // 4, 1), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Timing(median, q20, q80, None)


def time_step(step, device, suite):
    if device.type == "cuda":
        return time_cuda(step, suite.gpu_rep_ms)
    return time_cpu(step, suite.cpu_warmup, suite.cpu_repeats)


def cuda_peak_extra_bytes(step):
    """Peak bytes allocated during one step beyond what was allocated before it (the inputs:
    the runner keeps nothing else alive), outputs and the gradient included."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return peak - before


def wall_clock_step(step, device):
    """``step`` for timers that read a wall clock (pytest-benchmark): on CUDA, wait for the kernels."""
    if device.type != "cuda":
        return step

    def synchronized():
        step()
        torch.cuda.synchronize()

    return synchronized
