"""Launcher of the compiled Sinkhorn forward of fastkd._C (csrc/cpu/sinkhorn.cpp,
csrc/cuda/sinkhorn.cu): the ``native`` backend of the sinkhorn family. Same signature and outputs
as sinkhorn/torch.py, in fp32; the tensors' device picks the CPU or CUDA entry point.

Only the forward is compiled. The backward (envelope: P and the centred potentials; unrolled:
the reverse pass over the saved f̃, g̃ histories) is the torch implementation's (the registry's
sinkhorn_backward row of this backend), run on the fp32 outputs of this forward: the op passes
exactly those tensors, so mixing is exact. On a GPU that backward
runs every saved iteration with masks (no host synchronisation) rather than stopping early.
"""

import torch

from ..native_ext import DTYPE_CODES, launch
from .contract import allocate_outputs

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cost_view(cost):
    """(address, dtype code, stride_b, stride_n, stride_m) in elements; stride_b 0 for a shared (n, m) cost."""
    stride_b = 0 if cost.dim() == 2 else cost.stride(0)
    return cost.data_ptr(), DTYPE_CODES[cost.dtype], stride_b, cost.stride(-2), cost.stride(-1)


def sinkhorn_forward(cost, a, b, eps, max_iter, tol, save_history, return_plan):
    """cost: (n, m) shared or (B, n, m), fp32|fp16|bf16; a: (B, n), b: (B, m) (stride-0 views
    allowed). tol < 0 runs exactly max_iter iterations. Returns the tuple of
    sinkhorn/torch.py's sinkhorn_forward (SinkhornOutputs), in fp32 (n_iter int32)."""
    if cost.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"cost: the compiled Sinkhorn kernels take float32, float16 or bfloat16; got {cost.dtype}")
    if cost.dim() not in (2, 3):
        raise ValueError(f"cost must be (n, m) or (B, n, m); got shape {tuple(cost.shape)}")
    device = cost.device
    n_problems, n = a.shape
    m = b.shape[1]
    if cost.shape[-2:] != (n, m) or (cost.dim() == 3 and cost.shape[0] != n_problems):
        raise ValueError(f"cost {tuple(cost.shape)} does not match a {tuple(a.shape)} and b {tuple(b.shape)}")
    if a.device != device or b.device != device:
        raise ValueError(f"cost, a and b must be on one device; got {device}, {a.device}, {b.device}")
    a = a.to(torch.float32).contiguous()
    b = b.to(torch.float32).contiguous()

    # Histories are zero after each problem's last iteration, as the torch backend leaves them.
    outputs = allocate_outputs(n_problems, n, m, max_iter, save_history, return_plan, device, zero_history=True)
    if n_problems == 0:
        return outputs
    args = (n_problems, n, m, _cost_view(cost), a.data_ptr(), b.data_ptr(), float(eps), int(max_iter), float(tol),
            bool(save_history), bool(return_plan), tuple(x.data_ptr() for x in outputs))
    if device.type == "cuda":
        workspace = torch.empty(n_problems * (3 * n + 4 * m), dtype=torch.float32, device=device)
        launch("sinkhorn_forward", device, *args, workspace.data_ptr())
    else:
        launch("sinkhorn_forward", device, *args)
    return outputs
