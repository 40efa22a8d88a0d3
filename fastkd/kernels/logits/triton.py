"""Triton kernels of the kd_rows family (divergences from logits), with their launchers.

One program per row streams the vocabulary in BLOCK_V chunks:
  * forward_kl / reverse_kl: one pass (online max/sum-exp of both distributions plus a shifted
    accumulator of Σ p·(log p − log q)), saving only five fp32 statistics per row;
  * jsd / skew_*_kl / tvd: two passes (log-sum-exp first, then the terms that need p and q);
  * backward: one pass that recomputes p and q and writes ∂L/∂student in the student's dtype.
Row offsets are int64, so N·V ≥ 2³¹ elements is addressed correctly. Nothing (N, V) is allocated
besides the gradient itself. The math mirrors fastkd/divergences.py.
"""

import torch
import triton
import triton.language as tl

from ..layout import row_layout, row_shape
from ..triton_rows import launch_config, row_offset
from . import contract

# Kernel codes of the divergences (constexpr: each divergence compiles its own kernel).
FORWARD_KL = tl.constexpr(contract.DIVERGENCE_CODES["forward_kl"])
REVERSE_KL = tl.constexpr(contract.DIVERGENCE_CODES["reverse_kl"])
JSD = tl.constexpr(contract.DIVERGENCE_CODES["jsd"])
SKEW_FORWARD_KL = tl.constexpr(contract.DIVERGENCE_CODES["skew_forward_kl"])
SKEW_REVERSE_KL = tl.constexpr(contract.DIVERGENCE_CODES["skew_reverse_kl"])
TVD = tl.constexpr(contract.DIVERGENCE_CODES["tvd"])

NEG_START = tl.constexpr(contract.NEG_START)
N_STATS = tl.constexpr(contract.N_STATS)  # columns: contract.STATS_COLUMNS


@triton.jit
def _row_is_active(labels_ptr, row, ignore_index, HAS_LABELS: tl.constexpr):
    if HAS_LABELS:
        return tl.load(labels_ptr + row) != ignore_index
    else:
        return row >= 0


@triton.jit
def _load_scaled(row_ptr, cols, stride_col, mask, inv_temperature):
    x = tl.load(row_ptr + cols.to(tl.int64) * stride_col, mask=mask, other=float("-inf"))
    return x.to(tl.float32) * inv_temperature


@triton.jit
def _online_lse(m, z, x):
    m_new = tl.maximum(m, tl.max(x, axis=0))
    z_new = z * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
    return m_new, z_new


@triton.jit
def _log_add_exp(x, y):
    top = tl.maximum(x, y)
    safe = tl.where(top == float("-inf"), 0.0, top)
    return safe + tl.log(tl.exp(x - safe) + tl.exp(y - safe))


@triton.jit
def _mixture_log(lp, lq, log_param, log1m_param, DIVERGENCE: tl.constexpr):
    if DIVERGENCE == SKEW_REVERSE_KL:  # M = a·q + (1−a)·p
        return _log_add_exp(lq + log_param, lp + log1m_param)
    else:  # jsd and skew_forward_kl: M = param·p + (1−param)·q
        return _log_add_exp(lp + log_param, lq + log1m_param)


@triton.jit
def _q_p_over_m(lq, lp, lm):
    both = (lq > float("-inf")) & (lp > float("-inf"))
    return tl.where(both, tl.exp(lq + lp - lm), 0.0)


@triton.jit
def _store_stats(stats_ptr, row, active, max_s, log_sum_s, max_t, log_sum_t, aux):
    # Max and log-sum are kept apart: (x − max) − log_sum keeps the precision of ±1e4 logits that
    # x − (max + log_sum) would round away.
    base = stats_ptr + row * N_STATS
    tl.store(base + 0, tl.where(active, max_s, 0.0))
    tl.store(base + 1, tl.where(active, log_sum_s, 0.0))
    tl.store(base + 2, tl.where(active, max_t, 0.0))
    tl.store(base + 3, tl.where(active, log_sum_t, 0.0))
    tl.store(base + 4, tl.where(active, aux, 0.0))


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def kd_single_pass_forward_kernel(
    student_ptr,  # (N, V) fp32|fp16|bf16
    teacher_ptr,  # (N, V) fp32|fp16|bf16
    labels_ptr,  # (N,) int, read only if HAS_LABELS
    loss_ptr,  # (N,) fp32
    stats_ptr,  # (N, 5) fp32: max_s, log_sum_s, max_t, log_sum_t, aux
    V, inner, stride_s_outer, stride_s_inner, stride_s_col, stride_t_outer, stride_t_inner, stride_t_col,
    inv_temperature, ignore_index,
    REVERSE: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    active = _row_is_active(labels_ptr, row, ignore_index, HAS_LABELS)
    n_live = tl.where(active, V, 0)  # ignored rows read nothing
    s_row = student_ptr + row_offset(row, inner, stride_s_outer, stride_s_inner)
    t_row = teacher_ptr + row_offset(row, inner, stride_t_outer, stride_t_inner)

    # "a" is the distribution that weights the sum (teacher for KL(p‖q), student for KL(q‖p)).
    # acc = Σ exp(a − m_a)·((a − m_a) − (b − m_b)) stays shifted by the running maxima, so the
    # loss acc/z_a + log z_b − log z_a never subtracts two large log-sum-exps.
    m_a = NEG_START
    z_a = 0.0
    m_b = NEG_START
    z_b = 0.0
    acc = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_live
        s = _load_scaled(s_row, cols, stride_s_col, mask, inv_temperature)
        t = _load_scaled(t_row, cols, stride_t_col, mask, inv_temperature)
        if REVERSE:
            a = s
            b = t
        else:
            a = t
            b = s
        m_a_new = tl.maximum(m_a, tl.max(a, axis=0))
        m_b_new = tl.maximum(m_b, tl.max(b, axis=0))
        rescale = tl.exp(m_a - m_a_new)
        w = tl.exp(a - m_a_new)
        diff = (a - m_a_new) - (b - m_b_new)
        block_acc = tl.sum(tl.where(w > 0, w * diff, 0.0), axis=0)
        acc = rescale * (acc + ((m_a - m_a_new) - (m_b - m_b_new)) * z_a) + block_acc
        z_a = z_a * rescale + tl.sum(w, axis=0)
        z_b = z_b * tl.exp(m_b - m_b_new) + tl.sum(tl.exp(b - m_b_new), axis=0)
        m_a = m_a_new
        m_b = m_b_new

    loss = acc / z_a + tl.log(z_b) - tl.log(z_a)
    tl.store(loss_ptr + row, tl.where(active, loss, 0.0))
    if REVERSE:
        _store_stats(stats_ptr, row, active, m_a, tl.log(z_a), m_b, tl.log(z_b), loss)
    else:
        _store_stats(stats_ptr, row, active, m_b, tl.log(z_b), m_a, tl.log(z_a), loss)


@triton.jit
def kd_two_pass_forward_kernel(
    student_ptr,  # (N, V) fp32|fp16|bf16
    teacher_ptr,  # (N, V) fp32|fp16|bf16
    labels_ptr,  # (N,) int, read only if HAS_LABELS
    loss_ptr,  # (N,) fp32
    stats_ptr,  # (N, 5) fp32: max_s, log_sum_s, max_t, log_sum_t, aux
    V, inner, stride_s_outer, stride_s_inner, stride_s_col, stride_t_outer, stride_t_inner, stride_t_col,
    inv_temperature, ignore_index, param, log_param, log1m_param,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    active = _row_is_active(labels_ptr, row, ignore_index, HAS_LABELS)
    n_live = tl.where(active, V, 0)  # ignored rows read nothing
    s_row = student_ptr + row_offset(row, inner, stride_s_outer, stride_s_inner)
    t_row = teacher_ptr + row_offset(row, inner, stride_t_outer, stride_t_inner)

    m_s = NEG_START
    z_s = 0.0
    m_t = NEG_START
    z_t = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_live
        m_s, z_s = _online_lse(m_s, z_s, _load_scaled(s_row, cols, stride_s_col, mask, inv_temperature))
        m_t, z_t = _online_lse(m_t, z_t, _load_scaled(t_row, cols, stride_t_col, mask, inv_temperature))
    log_sum_s = tl.log(z_s)
    log_sum_t = tl.log(z_t)

    loss_acc = 0.0
    aux_acc = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_live
        lq = (_load_scaled(s_row, cols, stride_s_col, mask, inv_temperature) - m_s) - log_sum_s
        lp = (_load_scaled(t_row, cols, stride_t_col, mask, inv_temperature) - m_t) - log_sum_t
        q = tl.exp(lq)
        p = tl.exp(lp)
        if DIVERGENCE == TVD:
            loss_terms = 0.5 * tl.abs(p - q)
            aux_terms = 0.5 * q * _sign(q - p)
        else:
            lm = _mixture_log(lp, lq, log_param, log1m_param, DIVERGENCE)
            if DIVERGENCE == JSD:
                kl_q_m = tl.where(q > 0, q * (lq - lm), 0.0)
                loss_terms = param * tl.where(p > 0, p * (lp - lm), 0.0) + (1.0 - param) * kl_q_m
                aux_terms = kl_q_m
            elif DIVERGENCE == SKEW_FORWARD_KL:
                loss_terms = tl.where(p > 0, p * (lp - lm), 0.0)
                aux_terms = _q_p_over_m(lq, lp, lm)
            else:  # SKEW_REVERSE_KL
                loss_terms = tl.where(q > 0, q * (lq - lm), 0.0)
                aux_terms = loss_terms + (1.0 - param) * _q_p_over_m(lq, lp, lm)
        loss_acc += tl.sum(loss_terms, axis=0)
        aux_acc += tl.sum(aux_terms, axis=0)

    tl.store(loss_ptr + row, tl.where(active, loss_acc, 0.0))
    _store_stats(stats_ptr, row, active, m_s, log_sum_s, m_t, log_sum_t, aux_acc)


@triton.jit
def kd_backward_kernel(
    grad_student_ptr,  # (N, V) student dtype, written
    student_ptr,  # (N, V) fp32|fp16|bf16
    teacher_ptr,  # (N, V) fp32|fp16|bf16
    labels_ptr,  # (N,) int, read only if HAS_LABELS
    grad_loss_ptr,  # (N,) fp32
    stats_ptr,  # (N, 5) fp32 from the forward
    V, inner, stride_s_outer, stride_s_inner, stride_s_col, stride_t_outer, stride_t_inner, stride_t_col,
    inv_temperature, ignore_index, param, log_param, log1m_param,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    active = _row_is_active(labels_ptr, row, ignore_index, HAS_LABELS)
    n_live = tl.where(active, V, 0)  # ignored rows read nothing
    s_row = student_ptr + row_offset(row, inner, stride_s_outer, stride_s_inner)
    t_row = teacher_ptr + row_offset(row, inner, stride_t_outer, stride_t_inner)
    g_row = grad_student_ptr + row * V  # the gradient is allocated contiguous
    base = stats_ptr + row * N_STATS
    m_s = tl.load(base + 0)
    log_sum_s = tl.load(base + 1)
    m_t = tl.load(base + 2)
    log_sum_t = tl.load(base + 3)
    aux = tl.load(base + 4)
    # ∂L/∂student = ∂L/∂s / T, times the upstream gradient of this row's loss.
    scale = tl.load(grad_loss_ptr + row) * inv_temperature

    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        mask = cols < n_live
        lq = (_load_scaled(s_row, cols, stride_s_col, mask, inv_temperature) - m_s) - log_sum_s
        lp = (_load_scaled(t_row, cols, stride_t_col, mask, inv_temperature) - m_t) - log_sum_t
        q = tl.exp(lq)
        p = tl.exp(lp)
        if DIVERGENCE == FORWARD_KL:
            g = q - p
        elif DIVERGENCE == REVERSE_KL:
            g = tl.where(q > 0, q * (lq - lp - aux), 0.0)
        elif DIVERGENCE == TVD:
            g = q * (0.5 * _sign(q - p) - aux)
        else:
            lm = _mixture_log(lp, lq, log_param, log1m_param, DIVERGENCE)
            if DIVERGENCE == JSD:
                g = (1.0 - param) * tl.where(q > 0, q * (lq - lm - aux), 0.0)
            elif DIVERGENCE == SKEW_FORWARD_KL:
                g = (1.0 - param) * (q * aux - _q_p_over_m(lq, lp, lm))
            else:  # SKEW_REVERSE_KL
                g = tl.where(q > 0, q * (lq - lm - aux), 0.0) + (1.0 - param) * _q_p_over_m(lq, lp, lm)
        g = tl.where(active, g * scale, 0.0)
        tl.store(g_row + cols, g.to(grad_student_ptr.dtype.element_ty), mask=in_row)


def kd_rows_forward(student, teacher, labels, spec, ignore_index):
    """student, teacher: (N, V) or (B, T, V), fp32|fp16|bf16, one device; labels: (N,) int or None.

    Returns (loss (N,), stats (N, 5)) in fp32, zeros on ignored rows (stats: contract.STATS_COLUMNS).
    """
    n_rows, n_cols, inner = row_shape(student)
    loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    stats = torch.empty(n_rows, N_STATS, dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return loss, stats
    block_v, num_warps = launch_config(n_cols)
    common = dict(HAS_LABELS=labels is not None, BLOCK_V=block_v, num_warps=num_warps)
    labels_arg = labels if labels is not None else loss  # never read without HAS_LABELS
    args = (student, teacher, labels_arg, loss, stats, n_cols, inner, *row_layout(student),
            *row_layout(teacher), spec.inv_temperature, ignore_index)
    if spec.name in ("forward_kl", "reverse_kl"):
        kd_single_pass_forward_kernel[(n_rows,)](*args, REVERSE=spec.name == "reverse_kl", **common)
    else:
        kd_two_pass_forward_kernel[(n_rows,)](
            *args, spec.param, spec.log_param, spec.log1m_param,
            DIVERGENCE=contract.DIVERGENCE_CODES[spec.name], **common)
    return loss, stats


def kd_rows_backward(grad_loss, student, teacher, labels, stats, spec, ignore_index):
    """grad_loss: (N,) fp32; stats: (N, 5) fp32 from the forward.
    Returns ∂output/∂student: contiguous, the student's shape and dtype."""
    n_rows, n_cols, inner = row_shape(student)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    if n_rows == 0:
        return grad
    block_v, num_warps = launch_config(n_cols)
    grad_loss = grad_loss.to(torch.float32).contiguous()  # autograd often hands in an expanded scalar
    kd_backward_kernel[(n_rows,)](
        grad, student, teacher, labels if labels is not None else grad_loss, grad_loss, stats,
        n_cols, inner, *row_layout(student), *row_layout(teacher), spec.inv_temperature, ignore_index,
        spec.param, spec.log_param, spec.log1m_param,
        DIVERGENCE=contract.DIVERGENCE_CODES[spec.name], HAS_LABELS=labels is not None,
        BLOCK_V=block_v, num_warps=num_warps)
    return grad
