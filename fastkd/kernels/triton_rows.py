"""Row addressing, column blocks, running log-sum-exps and launch sizes shared by the Triton kernels
of the logits families (one program per row). The host side of the addressing (row_shape,
row_layout) lives in layout.py.

A row is streamed in blocks of BLOCK_V columns, each held as a (BLOCK_V // VEC, VEC) tile: VEC
columns are 16 bytes of the widest input, and Triton gives each thread whole tile rows (one
16-byte load each). Running maxima and sums are kept per tile row, so a reduction over the last
axis stays inside a thread and the streaming loop needs no shuffle or barrier; the tile rows are
merged once per row, after the loop.
"""

import triton
import triton.language as tl

from .triton_math import LOG2E


@triton.jit
def row_offset(row, inner, stride_outer, stride_inner):
    # Rows of a (B, T, V) tensor are (row // T, row % T); a 2-D tensor passes inner = 1, which
    # Triton specialises away. row is int64, so offsets past 2³¹ elements are exact.
    return (row // inner) * stride_outer + (row % inner) * stride_inner


@triton.jit
def block_columns(start, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    # (BLOCK_V // VEC, VEC) column indices of the block starting at ``start``.
    return start + tl.arange(0, BLOCK_V // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]


@triton.jit
def load_block(row_ptr, cols, stride_col, n_cols, other, MASKED: tl.constexpr):
    # Columns ``cols`` of one row as fp32; columns ≥ n_cols read as ``other``, in MASKED blocks only:
    # full blocks load without a predicate.
    ptrs = row_ptr + cols.to(tl.int64) * stride_col
    if MASKED:
        x = tl.load(ptrs, mask=cols < n_cols, other=other)
    else:
        x = tl.load(ptrs)
    return x.to(tl.float32)


@triton.jit
def load_scaled(row_ptr, cols, stride_col, n_cols, scale, MASKED: tl.constexpr):
    # Logits times ``scale`` (1/T); masked columns are −inf: zero probability.
    return load_block(row_ptr, cols, stride_col, n_cols, float("-inf"), MASKED) * scale


@triton.jit
def lse_step(m, z, x):
    # One block into per-tile-row running (max, Σ exp(x − max)); m, z: (ROWS,), x: (ROWS, VEC).
    m_new = tl.maximum(m, tl.max(x, axis=1))
    z_new = z * tl.exp2((m - m_new) * LOG2E) + tl.sum(tl.exp2((x - m_new[:, None]) * LOG2E), axis=1)
    return m_new, z_new


@triton.jit
def lse_merge(m, z):
    # Per-tile-row (max, sum) → the row's max and Σ exp(x − max). Tile rows that saw only −inf
    # keep their finite start max and a zero sum, and add nothing.
    top = tl.max(m, axis=0)
    return top, tl.sum(z * tl.exp2((m - top) * LOG2E), axis=0)


def launch_config(n_cols):
    # Blocks of up to 4096 columns keep ~16 fp32 values per thread and tensor at 8 warps.
    block_v = min(4096, max(16, triton.next_power_of_2(n_cols)))
    num_warps = 8 if block_v >= 2048 else 4
    return block_v, num_warps


def vector_width(*tensors):
    """Columns per 16-byte load of the widest input dtype: the VEC of block_columns."""
    return 16 // max(t.element_size() for t in tensors)
