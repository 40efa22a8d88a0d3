"""Launcher of the compiled Sinkhorn forward of fastkd._C (csrc/sinkhorn/cpu.cpp,
csrc/sinkhorn/cuda.cu): the ``native`` backend of the sinkhorn family. Same signature and outputs
as sinkhorn/torch.py, in fp32; the tensors' device picks the CPU or CUDA entry point.

Only the forward is compiled. The backward (envelope: P and the centred potentials; unrolled:
the reverse pass over the saved f̃, g̃ histories) is the torch implementation's (the registry's
sinkhorn_backward row of this backend), run on the fp32 outputs of this forward: the op passes
exactly those tensors, so mixing is exact. On a GPU that backward
runs every saved iteration with masks (no host synchronisation) rather than stopping early.
"""

import torch

from ..layout import KERNEL_DTYPES
from ..native_ext import DTYPE_CODES, extension, launch
from .contract import allocate_outputs


def _cost_view(cost):
    """The cost as a _C.CostView, strides in elements; stride_b 0 for a shared (n, m) cost."""
    return extension().CostView(data=cost.data_ptr(), dtype=DTYPE_CODES[cost.dtype],
                                stride_b=0 if cost.dim() == 2 else cost.stride(0), stride_n=cost.stride(-2),
                                stride_m=cost.stride(-1))


def sinkhorn_forward(cost, a, b, eps, max_iter, tol, save_history, return_plan, *, gemm_precision="fp32"):
    """cost: (n, m) shared or (B, n, m), fp32|fp16|bf16; a: (B, n), b: (B, m) (stride-0 views
    allowed). tol < 0 runs exactly max_iter iterations. Returns SinkhornOutputs (contract.py), in
    fp32 (n_iter int32). ``gemm_precision``: unused (the gemm backend's)."""
    if cost.dtype not in KERNEL_DTYPES:
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
    ext = extension()
    args = ext.SinkhornArgs(n_problems=n_problems, n=n, m=m, cost=_cost_view(cost), a=a.data_ptr(), b=b.data_ptr(),
                            eps=float(eps), max_iter=int(max_iter), tol=float(tol), save_history=bool(save_history),
                            return_plan=bool(return_plan))
    value, value_linear, f, g, n_iter, err, plan, f_hist, g_hist = outputs
    addresses = ext.SinkhornOutputs(
        value=value.data_ptr(), value_linear=value_linear.data_ptr(), f=f.data_ptr(), g=g.data_ptr(),
        n_iter=n_iter.data_ptr(), err=err.data_ptr(), plan=plan.data_ptr() if return_plan else 0,
        f_hist=f_hist.data_ptr() if save_history else 0, g_hist=g_hist.data_ptr() if save_history else 0)
    if device.type == "cuda":
        workspace = torch.empty(n_problems * (3 * n + 4 * m), dtype=torch.float32, device=device)
        launch("sinkhorn_forward", device, args, outputs=addresses, workspace=workspace.data_ptr())
    else:
        launch("sinkhorn_forward", device, args, outputs=addresses)
    return outputs
