"""Triton kernels of the sparse_kd family (divergences against a top-k teacher), with their launchers.

The tail mode's (R, V)-sized work runs in two kernels, one program per row streaming the vocabulary
in BLOCK_V-column tiles (triton_rows.py layout):
  * ``sparse_tail_stats_kernel`` (forward): one read of the row giving the max and log Σ exp of all
    scaled logits and of those outside the support: the row's max, log-sum-exp and log Q_t;
  * ``sparse_tail_grad_kernel`` (backward): one read and one write: ∂/∂s_i = factor·q_i −
    exp(log q_i + shift) on every column (buckets.tail_coefficients), then, after a barrier, k
    scalar stores of the support gradients (summed over repeated ids on the host, on (R, k)) over
    the support's columns; zeros in ignored rows (never a product with their logits: no NaN from
    ±1e4), NaN in rows with a present id outside [0, V).
The forward marks the support without a (BLOCK_V × k) comparison: the row's ids come sorted (absent
entries as a sentinel past every column), and each tile walks on from where the last one stopped
over the ids below its end, about k·BLOCK_V/V of them: O(V + k) work per row, repeats included.

Around the kernels, on (R, k) tensors only (small: torch ops, buckets.py): the gather of the k
support logits, the bucket loss, the support gradients and the sort of the ids. The renormalize
mode reads only the k support logits: the gather and the scatter of k gradients are torch's
(sparse/blocks.py), with no V pass to fuse. No host synchronisation anywhere.

The op's backward (rows_backward) gets no saved statistics, so it runs the stats pass again before
the gradient pass (two reads, one write); the fused linear driver's block_loss runs both passes on
the block it holds (one read forward, one read and one write backward).
"""

import torch
import triton
import triton.language as tl

from ..layout import row_layout, row_shape
from ..logits.contract import NEG_START
from ..triton_device import on_tensor_device
from ..triton_math import LOG2E, LN2, fast_log2
from ..triton_rows import block_columns, launch_config, load_scaled, lse_merge, lse_step, row_offset, vector_width
from . import blocks, contract

# Sorted ids of absent entries: past every column, so no tile's walk reaches them.
ID_SENTINEL = tl.constexpr(contract.ID_SENTINEL)
_NEG_START = tl.constexpr(NEG_START)
# Gradient rows (contract.ROW_MODES): zeros (ignored or no entry), NaN (a present id outside [0, V)).
ROW_ZERO = tl.constexpr(contract.ROW_MODES["zero"])
ROW_NAN = tl.constexpr(contract.ROW_MODES["nan"])

N_STATS = tl.constexpr(contract.N_STATS)  # columns: contract.STATS_COLUMNS

support_loss = blocks.support_loss


@triton.jit
def _next_id(ids_row, j, K):
    return tl.load(ids_row + j, mask=j < K, other=ID_SENTINEL)


@triton.jit
def _stats_tile(m, z, m_r, z_r, row_ptr, ids_row, j, nxt, start, n_live, K, stride_col, inv_temperature,
                MASKED: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    cols = block_columns(start, BLOCK_V, VEC)
    x = load_scaled(row_ptr, cols, stride_col, n_live, inv_temperature, MASKED)
    in_support = cols < 0
    while nxt < start + BLOCK_V:  # the sorted ids inside this tile
        in_support = in_support | (cols == nxt)
        j += 1
        nxt = _next_id(ids_row, j, K)
    m, z = lse_step(m, z, x)
    m_r, z_r = lse_step(m_r, z_r, tl.where(in_support, float("-inf"), x))
    return m, z, m_r, z_r, j, nxt


@triton.jit
def sparse_tail_stats_kernel(
    student_ptr,  # (R, V) fp32|fp16|bf16, rows addressed as layout.row_layout
    ids_ptr,  # (R, K) int32, each row sorted, ID_SENTINEL at absent entries
    active_ptr,  # (R,) int8: rows that count (others read nothing)
    stats_ptr,  # (R, 4) fp32: max, log Σ exp(s − max) of the row; the same over the columns off the support
    V, K, inner, stride_outer, stride_inner, stride_col, inv_temperature,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n_live = tl.where(tl.load(active_ptr + row) != 0, V, 0)
    row_ptr = student_ptr + row_offset(row, inner, stride_outer, stride_inner)
    ids_row = ids_ptr + row * K
    m = tl.full([BLOCK_V // VEC], _NEG_START, tl.float32)
    z = tl.zeros([BLOCK_V // VEC], tl.float32)
    m_r = tl.full([BLOCK_V // VEC], _NEG_START, tl.float32)
    z_r = tl.zeros([BLOCK_V // VEC], tl.float32)
    j = tl.program_id(0) * 0
    nxt = _next_id(ids_row, j, K)
    n_full = (n_live // BLOCK_V) * BLOCK_V
    for start in range(0, n_full, BLOCK_V):
        m, z, m_r, z_r, j, nxt = _stats_tile(m, z, m_r, z_r, row_ptr, ids_row, j, nxt, start, n_live, K, stride_col,
                                             inv_temperature, False, BLOCK_V, VEC)
    if n_full < n_live:
        m, z, m_r, z_r, j, nxt = _stats_tile(m, z, m_r, z_r, row_ptr, ids_row, j, nxt, n_full, n_live, K,
                                             stride_col, inv_temperature, True, BLOCK_V, VEC)
    top, total = lse_merge(m, z)
    top_r, total_r = lse_merge(m_r, z_r)
    base = stats_ptr + row * N_STATS
    tl.store(base + 0, top)
    tl.store(base + 1, fast_log2(total) * LN2)
    tl.store(base + 2, top_r)
    tl.store(base + 3, fast_log2(total_r) * LN2)  # log 0 = -inf: nothing outside the support


@triton.jit
def _grad_tile(row_ptr, out_row, start, n_cols, stride_col, inv_temperature, row_max, log_sum, factor, shift, scale,
               mode, MASKED: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    # The tail gradient on every column, the support's included: they are overwritten afterwards.
    cols = block_columns(start, BLOCK_V, VEC)
    x = load_scaled(row_ptr, cols, stride_col, n_cols, inv_temperature, MASKED)
    log_q = (x - row_max) - log_sum  # exact near the max, even for ±1e4 logits
    q = tl.exp2(log_q * LOG2E)
    tail = (factor * q - tl.exp2((log_q + shift) * LOG2E)) * scale
    g = tl.where(x == float("-inf"), 0.0, tail)
    g = tl.where(mode == ROW_ZERO, 0.0, tl.where(mode == ROW_NAN, float("nan"), g))
    out_ptrs = out_row + cols
    if MASKED:
        tl.store(out_ptrs, g.to(out_row.dtype.element_ty), mask=cols < n_cols)
    else:
        tl.store(out_ptrs, g.to(out_row.dtype.element_ty))


@triton.jit
def sparse_tail_grad_kernel(
    student_ptr,  # (R, V) fp32|fp16|bf16, rows addressed as layout.row_layout
    ids_ptr,  # (R, K) int32, ID_SENTINEL at absent entries (any order)
    totals_ptr,  # (R, K) fp32: ∂/∂(support logit) summed over the entries of the same id, 0 at absent ones
    stats_ptr,  # (R, 4) fp32: sparse_tail_stats_kernel's
    coef_ptr,  # (R, 3) fp32: factor, shift, scale (grad_output / T)
    mode_ptr,  # (R,) int8: contract.ROW_MODES
    out_ptr,  # (R, V) contiguous, the student's dtype
    V, K, inner, stride_outer, stride_inner, stride_col, inv_temperature,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = student_ptr + row_offset(row, inner, stride_outer, stride_inner)
    out_row = out_ptr + row * V
    mode = tl.load(mode_ptr + row).to(tl.int32)
    row_max = tl.load(stats_ptr + row * N_STATS + 0)
    log_sum = tl.load(stats_ptr + row * N_STATS + 1)
    factor = tl.load(coef_ptr + row * 3 + 0)
    shift = tl.load(coef_ptr + row * 3 + 1)
    scale = tl.load(coef_ptr + row * 3 + 2)
    n_full = (V // BLOCK_V) * BLOCK_V
    for start in range(0, n_full, BLOCK_V):
        _grad_tile(row_ptr, out_row, start, V, stride_col, inv_temperature, row_max, log_sum, factor, shift, scale,
                   mode, False, BLOCK_V, VEC)
    if n_full < V:
        _grad_tile(row_ptr, out_row, n_full, V, stride_col, inv_temperature, row_max, log_sum, factor, shift, scale,
                   mode, True, BLOCK_V, VEC)
    # The support's columns, k scalar stores after the row's tile stores: the barrier orders the
    # program's global writes, so these land last. Repeated ids store the same total.
    tl.debug_barrier()
    for j in range(0, K):
        col = tl.load(ids_ptr + row * K + j)
        total = tl.load(totals_ptr + row * K + j)
        total = tl.where(mode == ROW_ZERO, 0.0, tl.where(mode == ROW_NAN, float("nan"), total))
        tl.store(out_row + col, total.to(out_row.dtype.element_ty), mask=col < V)


def _stats_config(n_cols, vec):
    """One 16-byte load per thread per tile (BLOCK_V = 256·VEC at 8 warps): each id of the walk
    costs a compare over the thread's columns of the tile, so the walk's cost per row is k × the
    columns per thread, and smaller tiles make it cheaper (the tile work per row stays V/256)."""
    block_v, num_warps = launch_config(n_cols)
    return min(block_v, 256 * vec), num_warps


@on_tensor_device
def tail_stats(student, sorted_ids, active, inv_temperature):
    """student: (R, V) fp32|fp16|bf16; sorted_ids: (R, k) int32 (blocks.sorted_support); active: (R,) bool.
    Returns (R, 4) fp32: row max and log Σ exp(s − max) of s = student / T over the row and over
    the columns off the support (log 0 = -inf there when nothing is outside). Inactive rows are
    not read: their statistics are meaningless."""
    n_rows, n_cols, inner = row_shape(student)
    stats = torch.empty(n_rows, N_STATS.value, dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return stats
    block_v, num_warps = _stats_config(n_cols, vector_width(student))
    sparse_tail_stats_kernel[(n_rows,)](student, sorted_ids, active.to(torch.int8), stats, n_cols,
                                        sorted_ids.shape[1], inner, *row_layout(student), inv_temperature,
                                        BLOCK_V=block_v, VEC=vector_width(student), num_warps=num_warps)
    return stats


def _summed_over_repeats(sorted_ids, sorted_grads):
    """(R, k): each entry's gradient summed over the entries of its row with the same id (sorted
    rows: equal ids are adjacent, and searchsorted finds each run's first entry)."""
    first = torch.searchsorted(sorted_ids, sorted_ids, side="left")
    sums = torch.zeros_like(sorted_grads).scatter_add_(1, first, sorted_grads)
    return sums.gather(1, first)


@on_tensor_device
def tail_grad(student, sorted_ids, sorted_grads, stats, coefficients, mode, inv_temperature):
    """The gradient (R, V) in the student's dtype: sorted_grads (R, k) fp32 at the sorted ids' columns
    (summed over repeats), factor·q_i − exp(log q_i + shift) times scale elsewhere (coefficients (R,
    3) fp32: factor, shift, scale), zeros where q_i = 0 and in ROW_ZERO rows, NaN in ROW_NAN rows
    (mode (R,) int8)."""
    n_rows, n_cols, inner = row_shape(student)
    out = torch.empty(n_rows, n_cols, dtype=student.dtype, device=student.device)
    if n_rows == 0:
        return out
    totals = _summed_over_repeats(sorted_ids, sorted_grads.float()).contiguous()
    block_v, num_warps = launch_config(n_cols)
    sparse_tail_grad_kernel[(n_rows,)](student, sorted_ids, totals, stats, coefficients, mode, out, n_cols,
                                       sorted_ids.shape[1], inner, *row_layout(student), inv_temperature,
                                       BLOCK_V=block_v, VEC=vector_width(student), num_warps=num_warps)
    return out


def block_loss(student_logits, indices, logprobs, labels, spec, missing_mass, ignore_index, scale=None):
    """As sparse/torch.py's block_loss: student_logits (R, V) fp32|fp16|bf16; indices, logprobs
    (R, k); labels (R,) or None. The tail mode's V passes are this module's kernels; the
    renormalize mode reads k logits per row and is torch's gather and scatter."""
    if missing_mass == "renormalize":
        return blocks.renormalize_block(student_logits, indices, logprobs, labels, spec, ignore_index, scale)
    return blocks.tail_block(student_logits, indices, logprobs, labels, spec, ignore_index, scale, tail_stats,
                             tail_grad)


def rows_forward(student, indices, logprobs, labels, spec, missing_mass, ignore_index):
    """student: (N, V); indices, logprobs: (N, k). Per-row losses (N,); no (N, V) temporary."""
    return block_loss(student, indices, logprobs, labels, spec, missing_mass, ignore_index)[0]


def rows_backward(grad_rows, student, indices, logprobs, labels, spec, missing_mass, ignore_index):
    """∂(Σ grad_rows·loss)/∂student: (N, V) in the student's dtype."""
    return block_loss(student, indices, logprobs, labels, spec, missing_mass, ignore_index, grad_rows)[1]
