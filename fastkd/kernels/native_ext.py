"""Thin calls into the compiled extension fastkd._C: pointers, sizes, strides, dtype codes."""

import torch

from .layout import row_layout, row_shape

# Must match fastkd::DType in csrc/include/fastkd/dtypes.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def extension():
    """The loaded fastkd._C module; ImportError (with the reason) when it was not built."""
    from .. import _C

    return _C


def row_logsumexp(x, temperature=1.0):
    """logsumexp(x / temperature) over the last dim of a (N, V) CPU tensor, as (N,) float32."""
    if x.device.type != "cpu" or x.dim() != 2:
        raise ValueError(f"row_logsumexp takes a 2-D CPU tensor; got {x.dim()}-D on {x.device}")
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"row_logsumexp takes float32, float16, bfloat16 or float64; got {x.dtype}")
    out = torch.empty(x.shape[0], dtype=torch.float32)
    extension().row_logsumexp_cpu(x.data_ptr(), DTYPE_CODES[x.dtype], x.shape[0], x.shape[1],
                                  x.stride(0), x.stride(1), 1.0 / temperature, out.data_ptr())
    return out


def rows_view(x):
    """The rows of a 2-D (N, V) or 3-D (B, T, V) tensor as fastkd._C takes them:
    (address, dtype code, inner, stride_outer, stride_inner, stride_col), strides in elements
    (the addressing of reduction.row_layout; csrc/include/fastkd/kd_rows.h)."""
    return (x.data_ptr(), DTYPE_CODES[x.dtype], row_shape(x)[2], *row_layout(x))


def launch(name, device, *args):
    """Calls ``<name>_cpu`` (with torch's intra-op thread count, so torch.set_num_threads applies)
    or ``<name>_cuda`` (on the device's current stream, no synchronisation) for ``device``."""
    ext = extension()
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device).cuda_stream
        getattr(ext, name + "_cuda")(*args, device.index, stream)
    elif device.type == "cpu":
        getattr(ext, name + "_cpu")(*args, torch.get_num_threads())
    else:
        raise ValueError(f"fastkd._C runs on cpu and cuda tensors; got a tensor on {device}")


def contract_mismatch(ext):
    """None when the loaded fastkd._C keeps the contract of this Python package (entry points of
    the kernel families; once it exports ``contract()``, the codes and layouts themselves), else a
    description of the difference: a stale build must not run with mismatched codes."""
    from .logits import contract

    missing = [name for name in ("kd_rows_forward_cpu", "kl_div_rows_forward_cpu", "sinkhorn_forward_cpu")
               if not hasattr(ext, name)]
    if missing:
        return f"it lacks {', '.join(missing)}"
    if not hasattr(ext, "contract"):
        return None
    expected = {"divergence_codes": contract.DIVERGENCE_CODES, "stats_columns": list(contract.STATS_COLUMNS),
                "ce_stats_columns": list(contract.CE_STATS_COLUMNS),
                "dtype_codes": {str(dtype).replace("torch.", ""): code for dtype, code in DTYPE_CODES.items()}}
    actual = ext.contract()
    differing = [key for key in expected if actual.get(key) != expected[key]]
    return f"{', '.join(differing)} differ" if differing else None
