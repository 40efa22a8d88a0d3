"""How every backend sees its inputs: the compute dtype and the addressing of rows.

Logits arrive as (…, V). The ops take them as 2-D (N, V) or 3-D (B, T, V) tensors over the same
memory (``as_rows``); the kernels address row r of a 3-D tensor at (r // T, r % T), so shifted
views such as ``logits[:, :-1]`` are read in place, never copied.
"""

import torch

# What the compiled (Triton and C++/CUDA) kernels read; float64 is the torch backend's.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def compute_dtype(*tensors):
    """The dtype fastkd computes in for these inputs: float64 if any is float64, else float32.
    The one rule every backend, op fake and public function uses."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def as_rows(x):
    """(…, V) logits → (N, V) for inputs of up to two dims, else (B, T, V), over the same memory
    where possible.

    Shifted LLM logits such as ``logits[:, :-1]`` cannot be flattened to (N, V) without a copy;
    the kernels address (B, T, V) tensors directly instead. Tensors of the same shape always get
    the same layout, so student and teacher rows line up. Rare layouts are copied once.
    """
    if x.dim() <= 3:
        return x.reshape(-1, x.shape[-1]) if x.dim() <= 2 else x
    leading = x.dim() - 2
    if all(x.shape[k] == 1 or x.stride(k) == x.stride(k + 1) * x.shape[k + 1] for k in range(leading - 1)):
        return x.view(-1, x.shape[-2], x.shape[-1])
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def row_shape(x):
    """(rows, V, inner) of an as_rows tensor: 2-D (N, V) or 3-D (B, T, V); inner = T, or 1 for 2-D."""
    n_cols = x.shape[-1]
    return (x.numel() // n_cols if n_cols else 0), n_cols, (x.shape[1] if x.dim() == 3 else 1)


def row_layout(x):
    """(stride_outer, stride_inner, stride_col) of the rows of an as_rows tensor, in elements: row r
    starts at (r // inner)·stride_outer + (r % inner)·stride_inner (every kernel addresses rows so)."""
    if x.dim() == 2:
        return x.stride(0), 0, x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


def row_chunks(n_rows, n_cols, elements):
    """[start, stop) ranges of rows whose (rows × n_cols) blocks hold at most ``elements`` (≥ 1 row)."""
    rows = max(1, elements // max(n_cols, 1))
    for start in range(0, n_rows, rows):
        yield start, min(start + rows, n_rows)


def rows_slice(x, start, stop):
    """Rows [start, stop) of a 2-D (N, V) or 3-D (B, T, V) tensor, as a (rows, V) tensor."""
    if x.dim() == 2:
        return x[start:stop]
    if x.is_contiguous():
        return x.view(-1, x.shape[-1])[start:stop]
    index = torch.arange(start, stop, device=x.device)
    return x[index // x.shape[1], index % x.shape[1]]  # gathers this chunk only


def clamped_ids(indices, present, vocab):
    """Token ids of sparse teachers (R, k), as gathers need them: int64, clamped into [0, V) (absent
    entries' ids are arbitrary, and clamping keeps every gather in bounds), and per row whether a
    present entry holds an id outside [0, V) (R,) bool, for the kernels to make that row NaN."""
    bad_row = (present & ((indices < 0) | (indices >= vocab))).any(-1)
    return indices.long().clamp(0, max(vocab - 1, 0)), bad_row
