"""Thin calls into the compiled extension fastkd._C: argument structs built with keywords, raw
addresses, and the Python side of the contract the extension was compiled with.

Every entry point of fastkd._C takes one argument struct (``_C.KdRowsArgs(...)``,
``_C.CeRowsArgs(...)``, ``_C.SinkhornArgs(...)``), then keyword-only output addresses, then
where it runs: ``n_threads`` on the CPU, ``device`` and ``stream`` on CUDA (``launch`` adds them).
"""

import torch

from .layout import row_layout, row_shape
from .logits import contract as logits_contract
from .sparse import contract as sparse_contract

# The Python side of the contract with fastkd._C (the C++ side: csrc/include/fastkd/common/dtypes.h,
# logits/contract.h, cross_entropy/contract.h, sparse/sparse_rows.h; exported by fastkd._C.contract()). check_contract
# compares the two, so a build compiled against other codes is caught at import (the registry
# reports it unavailable), not in a result. The divergence codes and statistics columns are the
# logits families' contract (logits/contract.py); the dtype codes belong to the extension alone.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def expected_contract():
    """This package's side of the contract, in the form fastkd._C.contract() returns."""
    return {
        "divergence_codes": dict(logits_contract.DIVERGENCE_CODES),
        "stats_columns": list(logits_contract.STATS_COLUMNS),
        "standardized_stats_columns": list(logits_contract.STANDARDIZED_STATS_COLUMNS),
        "ce_stats_columns": list(logits_contract.CE_STATS_COLUMNS),
        "dtype_codes": {str(dtype).removeprefix("torch."): code for dtype, code in DTYPE_CODES.items()},
        "sparse_stats_columns": list(sparse_contract.STATS_COLUMNS),
        "sparse_id_sentinel": sparse_contract.ID_SENTINEL,
        "sparse_row_modes": dict(sparse_contract.ROW_MODES),
    }


def check_contract(ext, expected):
    """Compares ``ext.contract()`` with ``expected`` (a dict of the same form). Returns None when
    they agree, else one line describing every difference, e.g. "fastkd._C was compiled with a
    different contract: divergence_codes['jsd'] is 2 in fastkd._C, 3 here"."""
    contract = getattr(ext, "contract", None)
    if contract is None:
        return "fastkd._C has no contract() (built from older sources; rebuild it)"
    try:
        actual = contract()
    except Exception as exc:  # a broken build must be reported, not raise at import
        return f"fastkd._C.contract() failed ({type(exc).__name__}: {exc})"
    differences = []
    for key in sorted(set(expected) | set(actual), key=str):
        if key not in actual:
            differences.append(f"{key} is missing from fastkd._C")
        elif key not in expected:
            differences.append(f"{key} is in fastkd._C but not expected here")
        else:
            differences += _differences(key, actual[key], expected[key])
    if not differences:
        return None
    return "fastkd._C was compiled with a different contract: " + "; ".join(differences)


def _differences(key, actual, expected):
    if isinstance(actual, dict) and isinstance(expected, dict):
        out = []
        for name in sorted(set(actual) | set(expected), key=str):
            if name not in actual:
                out.append(f"{key}[{name!r}] is missing from fastkd._C (expected {expected[name]!r})")
            elif name not in expected:
                out.append(f"{key}[{name!r}] = {actual[name]!r} in fastkd._C is not expected here")
            elif actual[name] != expected[name]:
                out.append(f"{key}[{name!r}] is {actual[name]!r} in fastkd._C, {expected[name]!r} here")
        return out
    if _comparable(actual) != _comparable(expected):  # column lists: order matters
        return [f"{key} is {actual!r} in fastkd._C, {expected!r} here"]
    return []


def _comparable(value):
    return list(value) if isinstance(value, tuple) else value


def extension():
    """The loaded fastkd._C module; ImportError (with the reason) when it was not built."""
    from .. import _C

    return _C


def rows_view(x):
    """The rows of a 2-D (N, V) or 3-D (B, T, V) tensor as a ``_C.RowsView`` (the addressing of
    layout.row_layout, strides in elements; csrc/include/fastkd/common/rows_view.h)."""
    stride_outer, stride_inner, stride_col = row_layout(x)
    return extension().RowsView(data=x.data_ptr(), dtype=DTYPE_CODES[x.dtype], inner=row_shape(x)[2],
                                stride_outer=stride_outer, stride_inner=stride_inner, stride_col=stride_col)


def int64_labels(labels, n_rows):
    """The labels as the kernels read them: int64 (N,) contiguous (None stays None). Keep the
    result alive until the kernel has run: the kernels get its address."""
    if labels is None:
        return None
    if labels.numel() != n_rows:
        raise ValueError(f"labels must hold one entry per row ({n_rows}); got shape {tuple(labels.shape)}")
    return labels.reshape(-1).to(torch.int64).contiguous()


def launch(name, device, args, **outputs):
    """Calls ``<name>_cpu`` or ``<name>_cuda`` of fastkd._C for ``device`` with the argument struct
    ``args`` and the keyword ``outputs``. The CPU entry gets torch's intra-op thread count (so
    torch.set_num_threads applies; the one thread-count rule is csrc/include/fastkd/common/threads.h),
    the CUDA entry the device's current stream (no synchronisation)."""
    ext = extension()
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device).cuda_stream
        getattr(ext, name + "_cuda")(args, **outputs, device=device.index, stream=stream)
    elif device.type == "cpu":
        getattr(ext, name + "_cpu")(args, **outputs, n_threads=torch.get_num_threads())
    else:
        raise ValueError(f"fastkd._C runs on cpu and cuda tensors; got a tensor on {device}")
