"""Triton kernels of the kd_rows family (divergences from logits), with their launchers.

One program per row streams the vocabulary in BLOCK_V-column tiles (triton_rows.py: per-thread
running state, no reduction inside the loop; full tiles load without a mask, the last partial
tile with one):
  * forward_kl / reverse_kl: one pass (running max and sum-exp of both distributions plus a shifted
    accumulator of Σ p·(log p − log q)), saving only five fp32 statistics per row;
  * dkd: the forward_kl pass over the non-target classes (NCKD) with the target's two logits read
    apart (TCKD from O(1) numbers);
  * jsd / skew_*_kl / tvd: two passes (log-sum-exps first, then the terms that need p and q);
  * backward: one pass that recomputes p and q and writes ∂L/∂student in the student's dtype.
The logit transforms (triton_transforms.py) are constexpr flags: a logit scale alone folds into the
temperature's multiplier; a soft-cap adds a tanh per element; standardisation adds one pass in
front of the forward (the row mean and std, saved: 4 more fp32 per row) and one reduction pass in
front of the backward (Σg and Σg·(y − mean)).
Exponentials and logarithms are base 2 on the special-function unit (triton_math.py); the
statistics stay in natural units (contract.STATS_COLUMNS). Row offsets are int64, so N·V ≥ 2³¹
elements is addressed correctly. Nothing (N, V) is allocated besides the gradient itself. The
math mirrors fastkd/divergences.py.
"""

import torch
import triton
import triton.language as tl

from ..layout import row_layout, row_shape
from ..triton_device import on_tensor_device
from ..triton_math import FLT_MIN, LN2, LOG2_FLOOR, LOG2E, fast_log2
from ..triton_rows import block_columns, launch_config, lse_merge, lse_step, row_offset, vector_width
from . import contract
from .triton_transforms import divide, load_side, row_mean_and_std, transform

# Kernel codes of the divergences (constexpr: each divergence compiles its own kernel).
FORWARD_KL = tl.constexpr(contract.DIVERGENCE_CODES["forward_kl"])
REVERSE_KL = tl.constexpr(contract.DIVERGENCE_CODES["reverse_kl"])
JSD = tl.constexpr(contract.DIVERGENCE_CODES["jsd"])
SKEW_FORWARD_KL = tl.constexpr(contract.DIVERGENCE_CODES["skew_forward_kl"])
SKEW_REVERSE_KL = tl.constexpr(contract.DIVERGENCE_CODES["skew_reverse_kl"])
TVD = tl.constexpr(contract.DIVERGENCE_CODES["tvd"])

NEG_START = tl.constexpr(contract.NEG_START)
_LOG2E = 1.4426950408889634  # on the host
# Columns per tile with a soft-cap or standardisation (_launch_config).
TRANSFORMED_BLOCK = 2048


@triton.jit
def _row_is_active(labels_ptr, row, ignore_index, HAS_LABELS: tl.constexpr):
    if HAS_LABELS:
        return tl.load(labels_ptr + row) != ignore_index
    else:
        return row >= 0


@triton.jit
def _target(labels_ptr, row, DKD: tl.constexpr):
    # dkd's target class (its launcher requires labels); −1 (no column) otherwise.
    if DKD:
        return tl.load(labels_ptr + row).to(tl.int64)
    else:
        return -1


@triton.jit
def _log2_probs(x, row_max, log_sum):
    # log2 of the softmax of scaled logits x, from the row's natural-unit statistics: (x − max) −
    # log_sum first (exact near the max, even for ±1e4 logits), then to base 2.
    return ((x - row_max) - log_sum) * LOG2E


@triton.jit
def _floored(log2_prob):
    # For the mixture divergences, whose log-ratios log p − log M and log q − log M are bounded:
    # −inf (masked) becomes LOG2_FLOOR, so p·(log p − log M) is 0 at p = 0 without a select.
    return tl.maximum(log2_prob, LOG2_FLOOR)


@triton.jit
def _mixture_log2(lp, lq, p, q, param, DIVERGENCE: tl.constexpr):
    # log2 M, M = param·p + (1−param)·q (jsd, skew_forward_kl) or param·q + (1−param)·p
    # (skew_reverse_kl), from the linear mixture: one multiply-add and one MUFU.LG2 instead of a
    # log-add-exp (two exponentials and a logarithm). M below FLT_MIN counts as FLT_MIN: only
    # elements whose own p and q are below it (and add nothing) see the difference.
    if DIVERGENCE == SKEW_REVERSE_KL:
        mixture = param * q + (1.0 - param) * p
    else:
        mixture = param * p + (1.0 - param) * q
    return fast_log2(tl.maximum(mixture, FLT_MIN))


@triton.jit
def _store_stats(stats_ptr, row, active, max_s, log_sum_s, max_t, log_sum_t, aux, mean_s, std_s, mean_t, std_t,
                 STANDARDIZE: tl.constexpr, STATS_WIDTH: tl.constexpr):
    # Max and log-sum are kept apart: (x − max) − log_sum keeps the precision of ±1e4 logits that
    # x − (max + log_sum) would round away.
    base = stats_ptr + row * STATS_WIDTH
    tl.store(base + 0, tl.where(active, max_s, 0.0))
    tl.store(base + 1, tl.where(active, log_sum_s, 0.0))
    tl.store(base + 2, tl.where(active, max_t, 0.0))
    tl.store(base + 3, tl.where(active, log_sum_t, 0.0))
    tl.store(base + 4, tl.where(active, aux, 0.0))
    if STANDARDIZE:
        tl.store(base + 5, tl.where(active, mean_s, 0.0))
        tl.store(base + 6, tl.where(active, std_s, 0.0))
        tl.store(base + 7, tl.where(active, mean_t, 0.0))
        tl.store(base + 8, tl.where(active, std_t, 0.0))


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _standardized(s_row, t_row, stride_s_col, stride_t_col, n_live, s_mult, s_pre, s_cap, t_mult, t_pre, t_cap,
                  eps, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr, STANDARDIZE: tl.constexpr,
                  BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    # The extra pass of ``standardize``: each side's row mean and std, and its multiplier 1/(T·(std + eps)).
    if STANDARDIZE:
        mean_s, std_s = row_mean_and_std(s_row, stride_s_col, n_live, s_pre, s_cap, SOFTCAP_S, BLOCK_V, VEC)
        mean_t, std_t = row_mean_and_std(t_row, stride_t_col, n_live, t_pre, t_cap, SOFTCAP_T, BLOCK_V, VEC)
        return mean_s, std_s, divide(s_mult, std_s + eps), mean_t, std_t, divide(t_mult, std_t + eps)
    else:
        return 0.0, 0.0, s_mult, 0.0, 0.0, t_mult


@triton.jit
def _load_pair(s_row, t_row, cols, n_live, stride_s_col, stride_t_col, s_mult, s_pre, s_cap, mean_s,
               t_mult, t_pre, t_cap, mean_t, target, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr,
               STANDARDIZE: tl.constexpr, DKD: tl.constexpr, MASKED: tl.constexpr):
    # Both sides' softmax inputs at ``cols``; dkd drops the target class (−inf) from both.
    s, _, _ = load_side(s_row, cols, stride_s_col, n_live, s_mult, s_pre, s_cap, mean_s, SOFTCAP_S, STANDARDIZE,
                        MASKED)
    t, _, _ = load_side(t_row, cols, stride_t_col, n_live, t_mult, t_pre, t_cap, mean_t, SOFTCAP_T, STANDARDIZE,
                        MASKED)
    if DKD:
        s = tl.where(cols == target, float("-inf"), s)
        t = tl.where(cols == target, float("-inf"), t)
    return s, t


@triton.jit
def _kl_tile(m_a, z_a, m_b, z_b, acc, s_row, t_row, start, n_live, stride_s_col, stride_t_col,
             s_mult, s_pre, s_cap, mean_s, t_mult, t_pre, t_cap, mean_t, target,
             REVERSE: tl.constexpr, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr, STANDARDIZE: tl.constexpr,
             DKD: tl.constexpr, MASKED: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    # One tile into the per-tile-row state of KL(a ‖ b), a the distribution that weights the sum
    # (teacher for KL(p‖q), student for KL(q‖p)). In base 2: acc = Σ w·(da − db), w = 2^da,
    # da = (a − m_a)·log2 e; when the maxima move, earlier terms shift by (Δa − Δb) and rescale by 2^Δa.
    cols = block_columns(start, BLOCK_V, VEC)
    s, t = _load_pair(s_row, t_row, cols, n_live, stride_s_col, stride_t_col, s_mult, s_pre, s_cap, mean_s,
                      t_mult, t_pre, t_cap, mean_t, target, SOFTCAP_S, SOFTCAP_T, STANDARDIZE, DKD, MASKED)
    if REVERSE:
        a = s
        b = t
    else:
        a = t
        b = s
    m_a_new = tl.maximum(m_a, tl.max(a, axis=1))
    m_b_new = tl.maximum(m_b, tl.max(b, axis=1))
    shift_a = (m_a - m_a_new) * LOG2E
    shift_b = (m_b - m_b_new) * LOG2E
    rescale = tl.exp2(shift_a)
    da = (a - m_a_new[:, None]) * LOG2E
    db = (b - m_b_new[:, None]) * LOG2E
    w = tl.exp2(da)
    # w > 0: a masked a (−inf) adds nothing, even where b is masked too (no 0·inf).
    terms = tl.sum(tl.where(w > 0, w * (da - db), 0.0), axis=1)
    acc = rescale * (acc + (shift_a - shift_b) * z_a) + terms
    z_a = z_a * rescale + tl.sum(w, axis=1)
    z_b = z_b * tl.exp2(shift_b) + tl.sum(tl.exp2(db), axis=1)
    return m_a_new, z_a, m_b_new, z_b, acc


@triton.jit
def _binary_kl(log_a, log_b):
    # a·(log a − log b), 0 where a = 0 (log a = −inf).
    return tl.where(log_a > float("-inf"), tl.exp(log_a) * (log_a - log_b), 0.0)


@triton.jit
def _target_and_rest(log_sum, target_shifted):
    # log of the target's probability and of the non-target mass, from the non-target log-sum and
    # the target's logit (both relative to the non-target max).
    top = tl.maximum(log_sum, target_shifted)
    log_all = top + tl.log(tl.exp(log_sum - top) + tl.exp(target_shifted - top))
    return target_shifted - log_all, log_sum - log_all


@triton.jit
def _target_logit(row_ptr, target, stride_col, ok, mult, pre, cap, mean, SOFTCAP: tl.constexpr,
                  STANDARDIZE: tl.constexpr):
    x = tl.load(row_ptr + tl.where(ok, target, 0) * stride_col, mask=ok, other=0.0).to(tl.float32)
    s, _, _ = transform(x, mult, pre, cap, mean, SOFTCAP, STANDARDIZE)
    return s


@triton.jit
def kd_single_pass_forward_kernel(
    student_ptr,  # (N, V) fp32|fp16|bf16
    teacher_ptr,  # (N, V) fp32|fp16|bf16
    labels_ptr,  # (N,) int, read only if HAS_LABELS
    loss_ptr,  # (N,) fp32
    stats_ptr,  # (N, STATS_WIDTH) fp32: contract.stats_columns
    V, inner, stride_s_outer, stride_s_inner, stride_s_col, stride_t_outer, stride_t_inner, stride_t_col,
    s_mult, s_pre, s_cap, t_mult, t_pre, t_cap, eps, ignore_index, alpha, beta,
    REVERSE: tl.constexpr, HAS_LABELS: tl.constexpr, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr,
    STANDARDIZE: tl.constexpr, DKD: tl.constexpr, STATS_WIDTH: tl.constexpr,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    active = _row_is_active(labels_ptr, row, ignore_index, HAS_LABELS)
    n_live = tl.where(active, V, 0)  # ignored rows read nothing
    s_row = student_ptr + row_offset(row, inner, stride_s_outer, stride_s_inner)
    t_row = teacher_ptr + row_offset(row, inner, stride_t_outer, stride_t_inner)
    target = _target(labels_ptr, row, DKD)
    mean_s, std_s, s_mult, mean_t, std_t, t_mult = _standardized(
        s_row, t_row, stride_s_col, stride_t_col, n_live, s_mult, s_pre, s_cap, t_mult, t_pre, t_cap, eps,
        SOFTCAP_S, SOFTCAP_T, STANDARDIZE, BLOCK_V, VEC)

    m_a = tl.full([BLOCK_V // VEC], NEG_START, tl.float32)
    z_a = tl.zeros([BLOCK_V // VEC], tl.float32)
    m_b = tl.full([BLOCK_V // VEC], NEG_START, tl.float32)
    z_b = tl.zeros([BLOCK_V // VEC], tl.float32)
    acc = tl.zeros([BLOCK_V // VEC], tl.float32)
    n_full = (n_live // BLOCK_V) * BLOCK_V
    for start in range(0, n_full, BLOCK_V):
        m_a, z_a, m_b, z_b, acc = _kl_tile(m_a, z_a, m_b, z_b, acc, s_row, t_row, start, n_live, stride_s_col,
                                           stride_t_col, s_mult, s_pre, s_cap, mean_s, t_mult, t_pre, t_cap, mean_t,
                                           target, REVERSE, SOFTCAP_S, SOFTCAP_T, STANDARDIZE, DKD, False,
                                           BLOCK_V, VEC)
    if n_full < n_live:
        m_a, z_a, m_b, z_b, acc = _kl_tile(m_a, z_a, m_b, z_b, acc, s_row, t_row, n_full, n_live, stride_s_col,
                                           stride_t_col, s_mult, s_pre, s_cap, mean_s, t_mult, t_pre, t_cap, mean_t,
                                           target, REVERSE, SOFTCAP_S, SOFTCAP_T, STANDARDIZE, DKD, True,
                                           BLOCK_V, VEC)

    # Tile rows → the row, by the same shift-and-rescale as between tiles.
    top_a = tl.max(m_a, axis=0)
    top_b = tl.max(m_b, axis=0)
    shift_a = (m_a - top_a) * LOG2E
    shift_b = (m_b - top_b) * LOG2E
    weight_a = tl.exp2(shift_a)
    acc_row = tl.sum(weight_a * (acc + (shift_a - shift_b) * z_a), axis=0)
    z_a_row = tl.sum(z_a * weight_a, axis=0)
    z_b_row = tl.sum(z_b * tl.exp2(shift_b), axis=0)
    log_sum_a = tl.log(z_a_row)
    log_sum_b = tl.log(z_b_row)
    loss = acc_row * LN2 / z_a_row + log_sum_b - log_sum_a
    if DKD:
        # loss is NCKD (the KL over the non-target classes); TCKD from the target's two logits.
        ok = active & (target >= 0) & (target < V)
        s_y = _target_logit(s_row, target, stride_s_col, ok, s_mult, s_pre, s_cap, mean_s, SOFTCAP_S, STANDARDIZE)
        t_y = _target_logit(t_row, target, stride_t_col, ok, t_mult, t_pre, t_cap, mean_t, SOFTCAP_T, STANDARDIZE)
        log_q_y, log_q_rest = _target_and_rest(log_sum_b, s_y - top_b)
        log_p_y, log_p_rest = _target_and_rest(log_sum_a, t_y - top_a)
        tckd = _binary_kl(log_p_y, log_q_y) + _binary_kl(log_p_rest, log_q_rest)
        loss = tl.where(ok, alpha * tckd + beta * loss, float("nan"))  # a label out of range: NaN
        aux = tl.exp(log_q_y) - tl.exp(log_p_y)
        _store_stats(stats_ptr, row, active, top_b, log_sum_b, top_a, log_sum_a, aux, mean_s, std_s, mean_t, std_t,
                     STANDARDIZE, STATS_WIDTH)
    elif REVERSE:
        _store_stats(stats_ptr, row, active, top_a, log_sum_a, top_b, log_sum_b, loss, mean_s, std_s, mean_t, std_t,
                     STANDARDIZE, STATS_WIDTH)
    else:
        _store_stats(stats_ptr, row, active, top_b, log_sum_b, top_a, log_sum_a, 0.0, mean_s, std_s, mean_t, std_t,
                     STANDARDIZE, STATS_WIDTH)
    tl.store(loss_ptr + row, tl.where(active, loss, 0.0))


@triton.jit
def _lse_tile(m_s, z_s, m_t, z_t, s_row, t_row, start, n_live, stride_s_col, stride_t_col,
              s_mult, s_pre, s_cap, mean_s, t_mult, t_pre, t_cap, mean_t,
              SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr, STANDARDIZE: tl.constexpr,
              MASKED: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    cols = block_columns(start, BLOCK_V, VEC)
    s, t = _load_pair(s_row, t_row, cols, n_live, stride_s_col, stride_t_col, s_mult, s_pre, s_cap, mean_s,
                      t_mult, t_pre, t_cap, mean_t, -1, SOFTCAP_S, SOFTCAP_T, STANDARDIZE, False, MASKED)
    m_s, z_s = lse_step(m_s, z_s, s)
    m_t, z_t = lse_step(m_t, z_t, t)
    return m_s, z_s, m_t, z_t


@triton.jit
def _mixture_tile(first, second, s_row, t_row, start, n_live, stride_s_col, stride_t_col,
                  s_mult, s_pre, s_cap, mean_s, t_mult, t_pre, t_cap, mean_t,
                  m_s, log_sum_s, m_t, log_sum_t, param,
                  DIVERGENCE: tl.constexpr, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr,
                  STANDARDIZE: tl.constexpr, MASKED: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    # Adds one tile's two per-element sums of the second pass (which two: kd_two_pass_forward_kernel).
    cols = block_columns(start, BLOCK_V, VEC)
    s, t = _load_pair(s_row, t_row, cols, n_live, stride_s_col, stride_t_col, s_mult, s_pre, s_cap, mean_s,
                      t_mult, t_pre, t_cap, mean_t, -1, SOFTCAP_S, SOFTCAP_T, STANDARDIZE, False, MASKED)
    lq = _floored(_log2_probs(s, m_s, log_sum_s))
    lp = _floored(_log2_probs(t, m_t, log_sum_t))
    q = tl.exp2(lq)
    p = tl.exp2(lp)
    if DIVERGENCE == TVD:
        first_terms = 0.5 * tl.abs(p - q)
        second_terms = 0.5 * q * _sign(q - p)
    else:
        lm = _mixture_log2(lp, lq, p, q, param, DIVERGENCE)
        if DIVERGENCE == JSD:
            first_terms = p * (lp - lm)
            second_terms = q * (lq - lm)
        elif DIVERGENCE == SKEW_FORWARD_KL:
            first_terms = p * (lp - lm)
            second_terms = tl.exp2(lq + lp - lm)  # q·p/M
        else:  # SKEW_REVERSE_KL
            first_terms = q * (lq - lm)
            second_terms = tl.exp2(lq + lp - lm)
    return first + tl.sum(first_terms, axis=1), second + tl.sum(second_terms, axis=1)


@triton.jit
def kd_two_pass_forward_kernel(
    student_ptr,  # (N, V) fp32|fp16|bf16
    teacher_ptr,  # (N, V) fp32|fp16|bf16
    labels_ptr,  # (N,) int, read only if HAS_LABELS
    loss_ptr,  # (N,) fp32
    stats_ptr,  # (N, STATS_WIDTH) fp32: contract.stats_columns
    V, inner, stride_s_outer, stride_s_inner, stride_s_col, stride_t_outer, stride_t_inner, stride_t_col,
    s_mult, s_pre, s_cap, t_mult, t_pre, t_cap, eps, ignore_index, param,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr,
    STANDARDIZE: tl.constexpr, STATS_WIDTH: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    active = _row_is_active(labels_ptr, row, ignore_index, HAS_LABELS)
    n_live = tl.where(active, V, 0)  # ignored rows read nothing
    s_row = student_ptr + row_offset(row, inner, stride_s_outer, stride_s_inner)
    t_row = teacher_ptr + row_offset(row, inner, stride_t_outer, stride_t_inner)
    n_full = (n_live // BLOCK_V) * BLOCK_V
    mean_s, std_s, s_mult, mean_t, std_t, t_mult = _standardized(
        s_row, t_row, stride_s_col, stride_t_col, n_live, s_mult, s_pre, s_cap, t_mult, t_pre, t_cap, eps,
        SOFTCAP_S, SOFTCAP_T, STANDARDIZE, BLOCK_V, VEC)

    m_s = tl.full([BLOCK_V // VEC], NEG_START, tl.float32)
    z_s = tl.zeros([BLOCK_V // VEC], tl.float32)
    m_t = tl.full([BLOCK_V // VEC], NEG_START, tl.float32)
    z_t = tl.zeros([BLOCK_V // VEC], tl.float32)
    for start in range(0, n_full, BLOCK_V):
        m_s, z_s, m_t, z_t = _lse_tile(m_s, z_s, m_t, z_t, s_row, t_row, start, n_live, stride_s_col, stride_t_col,
                                       s_mult, s_pre, s_cap, mean_s, t_mult, t_pre, t_cap, mean_t,
                                       SOFTCAP_S, SOFTCAP_T, STANDARDIZE, False, BLOCK_V, VEC)
    if n_full < n_live:
        m_s, z_s, m_t, z_t = _lse_tile(m_s, z_s, m_t, z_t, s_row, t_row, n_full, n_live, stride_s_col, stride_t_col,
                                       s_mult, s_pre, s_cap, mean_s, t_mult, t_pre, t_cap, mean_t,
                                       SOFTCAP_S, SOFTCAP_T, STANDARDIZE, True, BLOCK_V, VEC)
    m_s, z_s = lse_merge(m_s, z_s)
    m_t, z_t = lse_merge(m_t, z_t)
    log_sum_s = tl.log(z_s)
    log_sum_t = tl.log(z_t)

    # Second pass, two sums per tile row (base 2 where a logarithm enters):
    #   jsd: Σ p·(lp − lm), Σ q·(lq − lm); skew_forward_kl: Σ p·(lp − lm), Σ q·p/M;
    #   skew_reverse_kl: Σ q·(lq − lm), Σ q·p/M; tvd: Σ ½|p − q|, Σ ½·q·sign(q − p).
    first = tl.zeros([BLOCK_V // VEC], tl.float32)
    second = tl.zeros([BLOCK_V // VEC], tl.float32)
    for start in range(0, n_full, BLOCK_V):
        first, second = _mixture_tile(first, second, s_row, t_row, start, n_live, stride_s_col, stride_t_col,
                                      s_mult, s_pre, s_cap, mean_s, t_mult, t_pre, t_cap, mean_t,
                                      m_s, log_sum_s, m_t, log_sum_t, param, DIVERGENCE,
                                      SOFTCAP_S, SOFTCAP_T, STANDARDIZE, False, BLOCK_V, VEC)
    if n_full < n_live:
        first, second = _mixture_tile(first, second, s_row, t_row, n_full, n_live, stride_s_col, stride_t_col,
                                      s_mult, s_pre, s_cap, mean_s, t_mult, t_pre, t_cap, mean_t,
                                      m_s, log_sum_s, m_t, log_sum_t, param, DIVERGENCE,
                                      SOFTCAP_S, SOFTCAP_T, STANDARDIZE, True, BLOCK_V, VEC)
    first = tl.sum(first, axis=0)
    second = tl.sum(second, axis=0)
    if DIVERGENCE == TVD:
        loss = first
        aux = second
    elif DIVERGENCE == JSD:
        loss = LN2 * (param * first + (1.0 - param) * second)
        aux = LN2 * second  # KL(q ‖ M)
    elif DIVERGENCE == SKEW_FORWARD_KL:
        loss = LN2 * first
        aux = second
    else:  # SKEW_REVERSE_KL
        loss = LN2 * first
        aux = loss + (1.0 - param) * second
    tl.store(loss_ptr + row, tl.where(active, loss, 0.0))
    _store_stats(stats_ptr, row, active, m_s, log_sum_s, m_t, log_sum_t, aux, mean_s, std_s, mean_t, std_t,
                 STANDARDIZE, STATS_WIDTH)


@triton.jit
def _grad_tile(s_row, t_row, start, V, stride_s_col, stride_t_col, s_mult, s_pre, s_cap, mean_s,
               t_mult, t_pre, t_cap, mean_t, target, m_s, log_sum_s, m_t, log_sum_t, aux, param, alpha,
               DIVERGENCE: tl.constexpr, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr,
               STANDARDIZE: tl.constexpr, DKD: tl.constexpr, MASKED: tl.constexpr,
               BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    # One tile's ∂L/∂s up to the row's scale (the upstream gradient, and (1 − param) for jsd and
    # skew_forward_kl), with what the transforms' backward needs: (g, y − mean, 1 − tanh², cols).
    cols = block_columns(start, BLOCK_V, VEC)
    s, centred, deriv = load_side(s_row, cols, stride_s_col, V, s_mult, s_pre, s_cap, mean_s, SOFTCAP_S,
                                  STANDARDIZE, MASKED)
    t, _, _ = load_side(t_row, cols, stride_t_col, V, t_mult, t_pre, t_cap, mean_t, SOFTCAP_T, STANDARDIZE, MASKED)
    if DKD:
        s = tl.where(cols == target, float("-inf"), s)
        t = tl.where(cols == target, float("-inf"), t)
    lq = _log2_probs(s, m_s, log_sum_s)
    lp = _log2_probs(t, m_t, log_sum_t)
    q = tl.exp2(lq)
    p = tl.exp2(lp)
    if DKD:
        # q̂, p̂ (the stats cover the non-target classes): q̂·(beta − alpha·aux) − beta·p̂; alpha·aux at y.
        g = tl.where(cols == target, alpha * aux, q * (param - alpha * aux) - param * p)
    elif DIVERGENCE == FORWARD_KL:
        g = q - p
    elif DIVERGENCE == REVERSE_KL:
        # log p unbounded (q may sit where p underflows): no floor, a select against 0·inf instead.
        g = tl.where(q > 0, q * ((lq - lp) * LN2 - aux), 0.0)
    elif DIVERGENCE == TVD:
        g = q * (0.5 * _sign(q - p) - aux)
    else:
        lq = _floored(lq)
        lp = _floored(lp)
        lm = _mixture_log2(lp, lq, p, q, param, DIVERGENCE)
        if DIVERGENCE == JSD:
            g = q * ((lq - lm) * LN2 - aux)
        elif DIVERGENCE == SKEW_FORWARD_KL:
            g = q * aux - tl.exp2(lq + lp - lm)
        else:  # SKEW_REVERSE_KL
            g = q * ((lq - lm) * LN2 - aux) + (1.0 - param) * tl.exp2(lq + lp - lm)
    return g, centred, deriv, cols


@triton.jit
def _gradient_sums(g_sum, gc_sum, s_row, t_row, start, V, stride_s_col, stride_t_col, s_mult, s_pre, s_cap, mean_s,
                   t_mult, t_pre, t_cap, mean_t, target, m_s, log_sum_s, m_t, log_sum_t, aux, param, alpha,
                   DIVERGENCE: tl.constexpr, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr,
                   DKD: tl.constexpr, MASKED: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    # The standardisation backward's reduction pass: per tile row Σg and Σg·(y − mean).
    g, centred, _, cols = _grad_tile(s_row, t_row, start, V, stride_s_col, stride_t_col, s_mult, s_pre, s_cap,
                                     mean_s, t_mult, t_pre, t_cap, mean_t, target, m_s, log_sum_s, m_t, log_sum_t,
                                     aux, param, alpha, DIVERGENCE, SOFTCAP_S, SOFTCAP_T, True, DKD, MASKED,
                                     BLOCK_V, VEC)
    gc = g * centred
    if MASKED:
        gc = tl.where(cols < V, gc, 0.0)  # past the row: 0·(−inf)
    return g_sum + tl.sum(g, axis=1), gc_sum + tl.sum(gc, axis=1)


@triton.jit
def _write_grad_tile(g_row, s_row, t_row, start, V, stride_s_col, stride_t_col, s_mult, s_pre, s_cap, mean_s,
                     t_mult, t_pre, t_cap, mean_t, target, m_s, log_sum_s, m_t, log_sum_t, aux, param, alpha,
                     row_scale, g_mean, through_std,
                     DIVERGENCE: tl.constexpr, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr,
                     STANDARDIZE: tl.constexpr, DKD: tl.constexpr, MASKED: tl.constexpr,
                     BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    g, centred, deriv, cols = _grad_tile(s_row, t_row, start, V, stride_s_col, stride_t_col, s_mult, s_pre, s_cap,
                                         mean_s, t_mult, t_pre, t_cap, mean_t, target, m_s, log_sum_s, m_t,
                                         log_sum_t, aux, param, alpha, DIVERGENCE, SOFTCAP_S, SOFTCAP_T, STANDARDIZE,
                                         DKD, MASKED, BLOCK_V, VEC)
    if STANDARDIZE:
        g = (g - g_mean) - centred * through_std
    g = g * row_scale
    if SOFTCAP_S:
        g = g * deriv
    g = g.to(g_row.dtype.element_ty)
    if MASKED:
        tl.store(g_row + cols, g, mask=cols < V)
    else:
        tl.store(g_row + cols, g)


@triton.jit
def kd_backward_kernel(
    grad_student_ptr,  # (N, V) student dtype, written
    student_ptr,  # (N, V) fp32|fp16|bf16
    teacher_ptr,  # (N, V) fp32|fp16|bf16
    labels_ptr,  # (N,) int, read only if HAS_LABELS
    grad_loss_ptr,  # (N,) fp32
    stats_ptr,  # (N, STATS_WIDTH) fp32 from the forward
    V, inner, stride_s_outer, stride_s_inner, stride_s_col, stride_t_outer, stride_t_inner, stride_t_col,
    s_mult, s_pre, s_cap, t_mult, t_pre, t_cap, eps, ignore_index, param, alpha,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr,
    STANDARDIZE: tl.constexpr, DKD: tl.constexpr, STATS_WIDTH: tl.constexpr,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    active = _row_is_active(labels_ptr, row, ignore_index, HAS_LABELS)
    g_row = grad_student_ptr + row * V  # the gradient is allocated contiguous
    if active:
        s_row = student_ptr + row_offset(row, inner, stride_s_outer, stride_s_inner)
        t_row = teacher_ptr + row_offset(row, inner, stride_t_outer, stride_t_inner)
        target = _target(labels_ptr, row, DKD)
        base = stats_ptr + row * STATS_WIDTH
        m_s = tl.load(base + 0)
        log_sum_s = tl.load(base + 1)
        m_t = tl.load(base + 2)
        log_sum_t = tl.load(base + 3)
        aux = tl.load(base + 4)
        # ∂L/∂x = ∂L/∂s · ∂s/∂x: the multiplier of x in s (scale / T, or 1/(T·(std + eps)) times the
        # scale), times the upstream gradient of this row's loss; per element 1 − tanh² (soft-cap).
        row_scale = tl.load(grad_loss_ptr + row) * s_mult
        if SOFTCAP_S:
            row_scale = row_scale * (s_cap * s_pre * (0.5 * LN2))  # the student's scale
        elif STANDARDIZE:
            row_scale = row_scale * s_pre
        if not DKD:
            if DIVERGENCE == JSD or DIVERGENCE == SKEW_FORWARD_KL:
                row_scale = row_scale * (1.0 - param)
        if DKD:
            # A label out of range has a NaN loss: a NaN gradient too, never a quietly wrong one.
            row_scale = tl.where((target >= 0) & (target < V), row_scale, float("nan"))
        n_full = (V // BLOCK_V) * BLOCK_V
        g_mean = 0.0
        through_std = 0.0
        mean_s = 0.0
        mean_t = 0.0
        if STANDARDIZE:
            mean_s = tl.load(base + 5)
            std_s = tl.load(base + 6)
            mean_t = tl.load(base + 7)
            std_t = tl.load(base + 8)
            s_mult = divide(s_mult, std_s + eps)
            t_mult = divide(t_mult, std_t + eps)
            row_scale = divide(row_scale, std_s + eps)
            # z = c/(std + eps), c = y − mean:
            #   ∂L/∂y ∝ (g − mean(g)) − c·Σ(g·c)/((std + eps)·(V − 1)·std), the last term 0 at std = 0
            # (logit_transforms.backward).
            g_sum = tl.zeros([BLOCK_V // VEC], tl.float32)
            gc_sum = tl.zeros([BLOCK_V // VEC], tl.float32)
            for start in range(0, n_full, BLOCK_V):
                g_sum, gc_sum = _gradient_sums(g_sum, gc_sum, s_row, t_row, start, V, stride_s_col, stride_t_col,
                                               s_mult, s_pre, s_cap, mean_s, t_mult, t_pre, t_cap, mean_t, target,
                                               m_s, log_sum_s, m_t, log_sum_t, aux, param, alpha, DIVERGENCE,
                                               SOFTCAP_S, SOFTCAP_T, DKD, False, BLOCK_V, VEC)
            if n_full < V:
                g_sum, gc_sum = _gradient_sums(g_sum, gc_sum, s_row, t_row, n_full, V, stride_s_col, stride_t_col,
                                               s_mult, s_pre, s_cap, mean_s, t_mult, t_pre, t_cap, mean_t, target,
                                               m_s, log_sum_s, m_t, log_sum_t, aux, param, alpha, DIVERGENCE,
                                               SOFTCAP_S, SOFTCAP_T, DKD, True, BLOCK_V, VEC)
            # V as fp32 through a tensor: Triton makes an integer argument equal to 1 a constant.
            n_cols = tl.full([], 1.0, tl.float32) * V
            g_mean = divide(tl.sum(g_sum, axis=0), n_cols)
            denominator = (std_s + eps) * tl.maximum(n_cols - 1.0, 1.0) * std_s
            through_std = tl.where(std_s > 0, divide(tl.sum(gc_sum, axis=0), denominator), 0.0)
        for start in range(0, n_full, BLOCK_V):
            _write_grad_tile(g_row, s_row, t_row, start, V, stride_s_col, stride_t_col, s_mult, s_pre, s_cap, mean_s,
                             t_mult, t_pre, t_cap, mean_t, target, m_s, log_sum_s, m_t, log_sum_t, aux, param, alpha,
                             row_scale, g_mean, through_std, DIVERGENCE, SOFTCAP_S, SOFTCAP_T, STANDARDIZE, DKD,
                             False, BLOCK_V, VEC)
        if n_full < V:
            _write_grad_tile(g_row, s_row, t_row, n_full, V, stride_s_col, stride_t_col, s_mult, s_pre, s_cap,
                             mean_s, t_mult, t_pre, t_cap, mean_t, target, m_s, log_sum_s, m_t, log_sum_t, aux,
                             param, alpha, row_scale, g_mean, through_std, DIVERGENCE, SOFTCAP_S, SOFTCAP_T,
                             STANDARDIZE, DKD, True, BLOCK_V, VEC)
    else:
        zeros = tl.zeros([BLOCK_V // VEC, VEC], g_row.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            cols = block_columns(start, BLOCK_V, VEC)
            tl.store(g_row + cols, zeros, mask=cols < V)


def _side_constants(spec, side):
    """(mult, pre, cap, SOFTCAP) of one side (triton_transforms.py): s = x·mult without transforms
    or with a scale alone; y = cap·tanh(x·pre/(2·log2 e)) with a soft-cap; y = x·pre under
    standardisation."""
    scale, cap = getattr(spec, f"{side}_scale"), getattr(spec, f"{side}_softcap")
    if cap > 0:
        return spec.inv_temperature, 2.0 * _LOG2E * scale / cap, cap, True
    if spec.standardize:
        return spec.inv_temperature, scale, 1.0, False
    return scale * spec.inv_temperature, 1.0, 1.0, False


def _transform_arguments(spec):
    """The kernels' runtime side constants and their constexpr flags."""
    s_mult, s_pre, s_cap, softcap_s = _side_constants(spec, "student")
    t_mult, t_pre, t_cap, softcap_t = _side_constants(spec, "teacher")
    flags = dict(SOFTCAP_S=softcap_s, SOFTCAP_T=softcap_t, STANDARDIZE=spec.standardize,
                 STATS_WIDTH=contract.stats_width(spec))
    return (s_mult, s_pre, s_cap, t_mult, t_pre, t_cap, spec.standardize_eps), flags


def _transformed(spec, flags):
    return flags["SOFTCAP_S"] or flags["SOFTCAP_T"] or spec.standardize


def _launch_config(n_cols, spec, flags):
    """triton_rows.launch_config, with smaller tiles when a soft-cap or standardisation adds their
    per-element state: at 4096 columns the kernels with every flag spilled 4–56 bytes (sm_80, sm_90)."""
    block_v, num_warps = launch_config(n_cols)
    if _transformed(spec, flags):
        block_v = min(block_v, TRANSFORMED_BLOCK)
        num_warps = min(num_warps, launch_config(block_v)[1])
    return block_v, num_warps


def _register_budget(spec, flags):
    # ptxas spilled 8–48 bytes at 80 registers in the kernels with a soft-cap and standardisation
    # when left to its own budget; a stated ceiling lets it use more (docs/kernel-report.md).
    return {"maxnreg": 128} if _transformed(spec, flags) else {}


def _check_labels(spec, labels):
    if spec.name == "dkd" and labels is None:
        raise ValueError("divergence='dkd' needs labels: the target class of each row")


@on_tensor_device
def kd_rows_forward(student, teacher, labels, spec, ignore_index):
    """student, teacher: (N, V) or (B, T, V), fp32|fp16|bf16, one device; labels: (N,) int or None
    (dkd: required).

    Returns (loss (N,), stats (N, contract.stats_width(spec))) in fp32, zeros on ignored rows
    (columns: contract.stats_columns(spec)).
    """
    _check_labels(spec, labels)
    n_rows, n_cols, inner = row_shape(student)
    constants, flags = _transform_arguments(spec)
    loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    stats = torch.empty(n_rows, flags["STATS_WIDTH"], dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return loss, stats
    two_pass = spec.name not in ("forward_kl", "reverse_kl", "dkd")
    block_v, num_warps = _launch_config(n_cols, spec, flags)
    common = dict(HAS_LABELS=labels is not None, BLOCK_V=block_v, VEC=vector_width(student, teacher),
                  num_warps=num_warps, **flags, **_register_budget(spec, flags))
    labels_arg = labels if labels is not None else loss  # never read without HAS_LABELS
    args = (student, teacher, labels_arg, loss, stats, n_cols, inner, *row_layout(student),
            *row_layout(teacher), *constants, ignore_index)
    if not two_pass:
        kd_single_pass_forward_kernel[(n_rows,)](*args, spec.alpha, spec.param, REVERSE=spec.name == "reverse_kl",
                                                 DKD=spec.name == "dkd", **common)
    else:
        kd_two_pass_forward_kernel[(n_rows,)](*args, spec.param, DIVERGENCE=contract.DIVERGENCE_CODES[spec.name],
                                              **common)
    return loss, stats


@on_tensor_device
def kd_rows_backward(grad_loss, student, teacher, labels, stats, spec, ignore_index):
    """grad_loss: (N,) fp32; stats: (N, contract.stats_width(spec)) fp32 from the forward.
    Returns ∂output/∂student: contiguous, the student's shape and dtype."""
    _check_labels(spec, labels)
    n_rows, n_cols, inner = row_shape(student)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    if n_rows == 0:
        return grad
    constants, flags = _transform_arguments(spec)
    block_v, num_warps = _launch_config(n_cols, spec, flags)
    grad_loss = grad_loss.to(torch.float32).contiguous()  # autograd often hands in an expanded scalar
    dkd = spec.name == "dkd"
    kd_backward_kernel[(n_rows,)](
        grad, student, teacher, labels if labels is not None else grad_loss, grad_loss, stats,
        n_cols, inner, *row_layout(student), *row_layout(teacher), *constants, ignore_index, spec.param, spec.alpha,
        DIVERGENCE=contract.DIVERGENCE_CODES["forward_kl" if dkd else spec.name], HAS_LABELS=labels is not None,
        DKD=dkd, BLOCK_V=block_v, VEC=vector_width(student, teacher), num_warps=num_warps, **flags,
        **_register_budget(spec, flags))
    return grad
