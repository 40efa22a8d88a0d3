"""The memory-bandwidth floor of kd_loss: bytes that must move, over copy bandwidth measured in
the same run.

Bytes, in units of N·V·elem_size (one logits tensor):
    forward_kl, reverse_kl   fwd: read student + teacher once                    = 2
                             fwd+bwd: + read both again, write the gradient      = 5
    jsd, skew_*, tvd         fwd: two reads of both (the mixture needs each row's
                             normalisers before its terms can be summed)          = 4
                             fwd+bwd                                              = 7
A row of a large vocabulary does not fit on chip, hence the re-reads (docs/perf-notes.md).
"""

import torch

from fastkd.divergences import MIXTURE_DIVERGENCES

from .harness import time_cpu, time_cuda

_TENSOR_PASSES = {("kl", "fwd"): 2, ("kl", "fwd+bwd"): 5, ("mixture", "fwd"): 4, ("mixture", "fwd+bwd"): 7}


def floor_bytes(case, mode):
    family = "mixture" if case.divergence in MIXTURE_DIVERGENCES else "kl"
    elem_size = torch.empty((), dtype=case.torch_dtype).element_size()
    return _TENSOR_PASSES[family, mode] * case.N * case.V * elem_size


def copy_bandwidth(device):
    """Bytes per second of ``dst.copy_(src)``, counting the read and the write (2·numel·elem).

    1 GiB on a GPU and 256 MiB on a CPU: far beyond the L2 / last-level cache either way.
    """
    numel = (1 << 28) if device.type == "cuda" else (1 << 26)
    src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    moved = 2 * numel * src.element_size()
    if device.type == "cuda":
        timing = time_cuda(lambda: dst.copy_(src), rep_ms=200)
    else:
        timing = time_cpu(lambda: dst.copy_(src), warmup=1, repeats=10)  # warm-up: first touch of dst's pages
    return moved / (timing.median_ms / 1e3)
