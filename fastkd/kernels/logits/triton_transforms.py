"""The logit transforms of fastkd/logit_transforms.py inside the Triton kd_rows kernels: what one
side's softmax sees, s = transform(x) / T, and what the chain rule back to x needs.

Per side, with host-computed constants (kd_rows_forward's ``_side_constants``):
    plain:        s = x·mult,                      mult = scale / T
    soft-cap:     y = cap·tanh(scale·x/cap),       pre = 2·log2(e)·scale/cap (tanh from one exp2),
                                                   s = y·mult, mult = 1 / T
    no soft-cap:  y = x·pre,                       pre = scale
    standardise:  s = (y − mean)·mult,             mult = 1 / (T·(std + eps)), mean and std of y per row
−inf stays −inf through every step (a masked entry keeps zero probability). The plain path is
the unchanged ``x·mult`` of the kernels without transforms; each transform is a constexpr flag.

The row mean and sample standard deviation (divisor V − 1, 0 for V = 1) come from one extra pass,
merged per tile row by Chan et al.'s pairwise update: robust at logits of ±1e4 with a small
spread, where E[y²] − E[y]² cancels to noise.
"""

import triton
import triton.language as tl

from ..triton_rows import block_columns, load_block


@triton.jit
def transform(x, mult, pre, cap, mean, SOFTCAP: tl.constexpr, STANDARDIZE: tl.constexpr):
    """x (any shape, fp32) → (s, y − mean or y, 1 − tanh² or 1): the softmax input, what the
    standardisation's backward needs, and the soft-cap's derivative over ``scale``."""
    if SOFTCAP:
        # tanh(u) = 1 − 2r with r = 1/(e^{2u} + 1), pre = 2·log2(e)·scale/cap: per element one
        # multiply, one MUFU.EX2, an add, one MUFU.RCP and one fused multiply-add (the row constants
        # below are hoisted out of the loop). Exactly ±1 once e^{2u} overflows or underflows (no NaN
        # at ±inf); absolute error ~1e-7 near 0 (c·1e-7 on a logit). tanh.approx.f32 would be one
        # instruction but has a relative error of 2^-11: 0.015 on a logit capped at 30.
        r = tl.fdiv(1.0, tl.exp2(x * pre) + 1.0, approx=True)  # 2 ulp; 0 for an infinite divisor
        masked = x == float("-inf")
        y = tl.where(masked, x, (cap - mean) - (2.0 * cap) * r)
        s = tl.where(masked, x, (cap - mean) * mult - (2.0 * cap * mult) * r)
        deriv = 4.0 * r * (1.0 - r)  # 1 − tanh², 0 at x = −inf (r = 1)
        return s, y, deriv
    else:
        if STANDARDIZE:
            y = x * pre - mean
        else:
            y = x
        return y * mult, y, 1.0


@triton.jit
def load_side(row_ptr, cols, stride_col, n_cols, mult, pre, cap, mean,
              SOFTCAP: tl.constexpr, STANDARDIZE: tl.constexpr, MASKED: tl.constexpr):
    """One side's columns ``cols`` transformed (see ``transform``); columns ≥ n_cols are −inf."""
    x = load_block(row_ptr, cols, stride_col, n_cols, float("-inf"), MASKED)
    return transform(x, mult, pre, cap, mean, SOFTCAP, STANDARDIZE)


@triton.jit
def _moments_tile(count, mean, m2, row_ptr, start, stride_col, n_cols, pre, cap,
                  SOFTCAP: tl.constexpr, MASKED: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    # Chan's update of per-tile-row (count, mean, M2) by one tile row's VEC values.
    cols = block_columns(start, BLOCK_V, VEC)
    _, y, _ = load_side(row_ptr, cols, stride_col, n_cols, 1.0, pre, cap, 0.0, SOFTCAP, True, MASKED)
    if MASKED:
        valid = cols < n_cols
        n_tile = tl.sum(valid.to(tl.float32), axis=1)
        tile_mean = divide(tl.sum(tl.where(valid, y, 0.0), axis=1), tl.maximum(n_tile, 1.0))
        centred = tl.where(valid, y - tile_mean[:, None], 0.0)
    else:
        n_tile = VEC * 1.0
        tile_mean = tl.sum(y, axis=1) * (1.0 / VEC)
        centred = y - tile_mean[:, None]
    new_count = count + n_tile
    delta = tile_mean - mean
    weight = divide(n_tile, tl.maximum(new_count, 1.0))
    return new_count, mean + delta * weight, m2 + tl.sum(centred * centred, axis=1) + delta * delta * count * weight


@triton.jit
def row_mean_and_std(row_ptr, stride_col, n_cols, pre, cap,
                     SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    """Mean and sample std (divisor max(V − 1, 1)) of the row's y = scale·x or its soft-cap, over
    n_cols columns (0 for an ignored row: nothing is read, both are 0)."""
    count = tl.zeros([BLOCK_V // VEC], tl.float32)
    mean = tl.zeros([BLOCK_V // VEC], tl.float32)
    m2 = tl.zeros([BLOCK_V // VEC], tl.float32)
    n_full = (n_cols // BLOCK_V) * BLOCK_V
    for start in range(0, n_full, BLOCK_V):
        count, mean, m2 = _moments_tile(count, mean, m2, row_ptr, start, stride_col, n_cols, pre, cap, SOFTCAP,
                                        False, BLOCK_V, VEC)
    if n_full < n_cols:
        count, mean, m2 = _moments_tile(count, mean, m2, row_ptr, n_full, stride_col, n_cols, pre, cap, SOFTCAP,
                                        True, BLOCK_V, VEC)
    # Tile rows → the row: the same update, all at once (M2 = Σ M2_i + Σ n_i·(mean_i − mean)²).
    total = tl.sum(count, axis=0)
    row_mean = divide(tl.sum(count * mean, axis=0), tl.maximum(total, 1.0))
    spread = mean - row_mean
    row_m2 = tl.sum(m2 + count * spread * spread, axis=0)
    return row_mean, tl.sqrt(divide(row_m2, tl.maximum(total - 1.0, 1.0)))


@triton.jit
def divide(x, y):
    """x / y to 2 ulp for |y| in [2^-126, 2^126] (div.approx.f32: MUFU.RCP and a multiply). The
    IEEE `/` adds range checks and a called slow path; values live across that call, and the
    predicates of the checks, spilled in the kernels with every transform (docs/kernel-report.md)."""
    return tl.fdiv(x, y, approx=True)
