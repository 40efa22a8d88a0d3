"""Where the gemm Sinkhorn backend overtakes the log-domain kernels: B problems on one shared n×n
cost (1 − cosine of class prototypes, as WKD's), ε = 0.05, 10 iterations, value_linear; forward
alone and forward+backward (unrolled, gradient to the row masses, as WKD). Prints a table of
median times of fastkd-gemm and of the backend ``auto`` takes when gemm is left out (the torch
backend on a CPU, Triton on CUDA), and the ratio. gemm.MIN_ELEMENTS comes from this table.

    python -m benchmarks.sinkhorn_crossover [--sizes 16 32 64 128 256] [--batches 1 4 16 64]
"""

import argparse

import torch
import torch.nn.functional as F

import fastkd
from fastkd.kernels import registry

from .harness import time_cpu, time_cuda


def _inputs(B, n, device, generator):
    prototypes = F.normalize(torch.randn(n, 16, generator=generator), dim=-1)
    cost = (1 - prototypes @ prototypes.T).clamp_min_(0)
    a = torch.softmax(torch.randn(B, n, generator=generator) * 2, -1)
    b = torch.softmax(torch.randn(B, n, generator=generator) * 2, -1)
    return cost.to(device), a.to(device).requires_grad_(True), b.to(device)


def _step(cost, a, b, backend, mode):
    def step():
        out = fastkd.sinkhorn(cost, a, b, eps=0.05, max_iter=10, tol=None, backend=backend,
                              grad="unrolled" if mode == "fwd+bwd" else "none")
        if mode == "fwd+bwd":
            return torch.autograd.grad(out.value_linear.sum(), a)
        return out.value_linear
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sinkhorn_crossover", description=__doc__)
    parser.add_argument("--sizes", nargs="+", type=int, default=[16, 32, 64, 128, 256])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64])
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fp32 = (torch.float32,)
    log_domain = registry.select("sinkhorn", "auto", device, fp32)  # no call described: gemm is passed over
    generator = torch.Generator().manual_seed(0)
    print(f"device {device}, threads {torch.get_num_threads()}, log-domain backend {log_domain!r}")
    print("| B | n = m | B·n·m | mode | gemm ms | log-domain ms | log-domain / gemm |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for B in args.batches:
            cost, a, b = _inputs(B, n, device, generator)
            for mode in ("fwd", "fwd+bwd"):
                times = []
                for backend in ("gemm", log_domain):
                    step = _step(cost, a, b, backend, mode)
                    timing = time_cuda(step, 100) if device.type == "cuda" else time_cpu(step, 2, 7)
                    times.append(timing.median_ms)
                gemm_ms, log_ms = times
                print(f"| {B} | {n} | {B * n * n} | {mode} | {gemm_ms:.3g} | {log_ms:.3g} | {log_ms / gemm_ms:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
