"""Triton kernels of the batched log-domain Sinkhorn solver, with their launchers.

One program per problem runs all of that problem's iterations in a single launch and stops on
its own when its marginal error reaches tol (a device-side while loop: no host synchronisation,
no lock-step with the other problems). The math and the internal potentials f̃, g̃ are those of
sinkhorn/torch.py.

  * tile kernels (n, m ≤ 128): the cost tile is read once, scaled by 1/ε, and kept in registers
    for every iteration; a shared (n, m) cost is the same tile for every program, so B programs
    read one matrix (from L2), never B copies.
  * streamed kernels (larger problems): each half-iteration streams the cost through
    BLOCK_N × BLOCK_M tiles with an online log-sum-exp; the potentials live in global scratch
    vectors of the program's own problem (barriers order one pass's writes before the next
    pass's reads).
  * backward: the unrolled reverse pass re-runs the iterations backwards from the saved f̃, g̃
    of every iteration (tile kernel: ∂/∂cost accumulated in registers; streamed kernel: adjoint
    vectors only, ∂/∂cost from ``sinkhorn_cost_grad_kernel``, which also serves the envelope
    mode's ∂/∂cost = grad·P). A shared cost's gradient sums the problems inside one program per
    tile (tile-kernel path: fp32 atomics).
"""

import torch
import triton
import triton.language as tl

from ..triton_device import on_tensor_device
from .contract import allocate_outputs

# Running maxima start finite: exp(m_old − m_new) of two -inf would be NaN on empty prefixes.
NEG_START = tl.constexpr(-1e30)
MAX_TILE = 128  # n, m up to this keep the whole cost tile on chip
STREAM_BLOCK = 64


@triton.jit
def _lse(x, AXIS: tl.constexpr):
    # Log-sum-exp along AXIS; all -inf gives -inf, not NaN.
    top = tl.max(x, axis=AXIS)
    safe = tl.where(top == float("-inf"), 0.0, top)
    return tl.log(tl.sum(tl.exp(x - tl.expand_dims(safe, AXIS)), axis=AXIS)) + safe


@triton.jit
def _keeps_running(it, max_iter, err, tol, like):
    # The per-problem "go on" flag broadcast to `like`'s shape. Scalar flags are kept out of masks
    # and selects: Triton 3.9's interpreter stores scalar comparison results with the operands'
    # dtype and then rejects them there.
    zeros = tl.zeros(like.shape, dtype=tl.float32)
    err_v = zeros + err
    return ((zeros.to(tl.int32) + it) < max_iter) & ((err_v > tol) | (err_v != err_v))


@triton.jit
def _log_mass(x):
    return tl.where(x > 0, tl.log(tl.where(x > 0, x, 1.0)), float("-inf"))


@triton.jit
def sinkhorn_tile_forward_kernel(
    cost_ptr,  # (B, N, M), or (N, M) shared with stride_cost_b = 0; fp32|fp16|bf16
    a_ptr,  # (B, N) fp32
    b_ptr,  # (B, M) fp32
    value_ptr,  # (B,) fp32
    value_linear_ptr,  # (B,) fp32
    f_ptr,  # (B, N) fp32: f̃
    g_ptr,  # (B, M) fp32: g̃
    n_iter_ptr,  # (B,) int32
    err_ptr,  # (B,) fp32
    plan_ptr,  # (B, N, M) fp32, written if RETURN_PLAN
    f_hist_ptr,  # (B, max_iter, N) fp32, written if SAVE_HISTORY
    g_hist_ptr,  # (B, max_iter, M) fp32, written if SAVE_HISTORY
    N, M, stride_cost_b, stride_cost_n, stride_cost_m, stride_a_b, stride_a_n, stride_b_b, stride_b_m,
    eps, inv_eps, max_iter, tol,
    SAVE_HISTORY: tl.constexpr, RETURN_PLAN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    row_in = rows < N
    col_in = cols < M
    tile_in = row_in[:, None] & col_in[None, :]
    c = tl.load(cost_ptr + pid * stride_cost_b + rows[:, None] * stride_cost_n + cols[None, :] * stride_cost_m,
                mask=tile_in, other=0.0).to(tl.float32)
    cs = tl.where(tile_in, c * inv_eps, float("inf"))  # padding never carries mass
    a = tl.load(a_ptr + pid * stride_a_b + rows * stride_a_n, mask=row_in, other=0.0)
    b = tl.load(b_ptr + pid * stride_b_b + cols * stride_b_m, mask=col_in, other=0.0)
    la = _log_mass(a)
    lb = _log_mass(b)
    f_hist = f_hist_ptr + pid * max_iter * N
    g_hist = g_hist_ptr + pid * max_iter * M

    # POT's f = 0 start on the support of a; zero-mass rows are absent from the first step too.
    u = tl.where(a > 0, 0.0, float("-inf"))
    L = _lse(u[:, None] - cs, 0)
    v = tl.where(b > 0, lb - L, float("-inf"))
    R = tl.zeros([BLOCK_N], dtype=tl.float32)
    if SAVE_HISTORY:
        tl.store(g_hist + cols, -eps * L, mask=col_in)
    # Tensors from the start: an int argument equal to 1 is specialised to a constant.
    it = tl.program_id(0) * 0
    err = tol * 0.0 + float("inf")
    running = it < max_iter
    while running:
        R = _lse(v[None, :] - cs, 1)
        u = tl.where(a > 0, la - R, float("-inf"))
        if SAVE_HISTORY:
            tl.store(f_hist + it * N + rows, -eps * R, mask=row_in)
        it += 1
        # The next column step gives the current plan's column sums for free: b·exp(L_new − L).
        L_new = _lse(u[:, None] - cs, 0)
        col_sum = tl.where(b > 0, tl.exp(lb + L_new - L), 0.0)
        err = tl.sum(tl.abs(col_sum - b), axis=0)
        # A NaN error keeps running (the comparison is false), as POT does.
        running = (it < max_iter) & ((err > tol) | (err != err))
        go_on = _keeps_running(it, max_iter, err, tol, cols)
        L = tl.where(go_on, L_new, L)
        v = tl.where(b > 0, lb - L, float("-inf"))
        if SAVE_HISTORY:
            tl.store(g_hist + it * M + cols, -eps * L, mask=col_in & go_on)

    f_t = tl.where(row_in, -eps * R, 0.0)
    g_t = tl.where(col_in, -eps * L, 0.0)
    p = tl.exp(u[:, None] + v[None, :] - cs)
    c = tl.where(tile_in, cs * eps, 0.0)
    value_linear = tl.sum(tl.sum(p * c, axis=1), axis=0)
    value = tl.sum(tl.sum(p * (f_t[:, None] + g_t[None, :]), axis=1), axis=0)
    tl.store(f_ptr + pid * N + rows, f_t, mask=row_in)
    tl.store(g_ptr + pid * M + cols, g_t, mask=col_in)
    tl.store(n_iter_ptr + pid, it)
    tl.store(err_ptr + pid, err)
    tl.store(value_ptr + pid, value)
    tl.store(value_linear_ptr + pid, value_linear)
    if RETURN_PLAN:
        tl.store(plan_ptr + pid * N * M + rows[:, None] * M + cols[None, :], p, mask=tile_in)


@triton.jit
def _cost_tile(cost_base, rows, cols, tile_in, stride_cost_n, stride_cost_m):
    return tl.load(cost_base + rows[:, None].to(tl.int64) * stride_cost_n + cols[None, :] * stride_cost_m,
                   mask=tile_in, other=0.0).to(tl.float32)


@triton.jit
def _column_pass(cost_base, a_base, stride_a_n, b_base, stride_b_m, r_ptr, l_ptr, out_ptr,
                 N, M, stride_cost_n, stride_cost_m, inv_eps,
                 FIRST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    # out_j = lse_i(u_i − C_ij/ε) with u = log a − R (u = 0 on the support if FIRST). Returns the
    # L1 column error of the plan built on l_ptr's L: Σ_j |b_j·exp(out_j − L_j) − b_j|.
    err = 0.0
    for j0 in range(0, M, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        col_in = cols < M
        top = tl.full([BLOCK_M], NEG_START, tl.float32)
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        for i0 in range(0, N, BLOCK_N):
            rows = i0 + tl.arange(0, BLOCK_N)
            row_in = rows < N
            tile_in = row_in[:, None] & col_in[None, :]
            a = tl.load(a_base + rows * stride_a_n, mask=row_in, other=0.0)
            if FIRST:
                u = tl.where(a > 0, 0.0, float("-inf"))
            else:
                u = tl.where(a > 0, _log_mass(a) - tl.load(r_ptr + rows, mask=row_in, other=0.0), float("-inf"))
            c = _cost_tile(cost_base, rows, cols, tile_in, stride_cost_n, stride_cost_m)
            x = tl.where(tile_in, u[:, None] - c * inv_eps, float("-inf"))
            new_top = tl.maximum(top, tl.max(x, axis=0))
            total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top[None, :]), axis=0)
            top = new_top
        out = tl.log(total) + top
        tl.store(out_ptr + cols, out, mask=col_in)
        if not FIRST:
            b = tl.load(b_base + cols * stride_b_m, mask=col_in, other=0.0)
            L = tl.load(l_ptr + cols, mask=col_in, other=0.0)
            col_sum = tl.where(b > 0, tl.exp(_log_mass(b) + out - L), 0.0)
            err += tl.sum(tl.abs(col_sum - b), axis=0)
    return err


@triton.jit
def _row_pass(cost_base, b_base, stride_b_m, l_ptr, r_ptr, N, M, stride_cost_n, stride_cost_m, inv_eps,
              BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    # r_i = lse_j(v_j − C_ij/ε), v = log b − L.
    for i0 in range(0, N, BLOCK_N):
        rows = i0 + tl.arange(0, BLOCK_N)
        row_in = rows < N
        top = tl.full([BLOCK_N], NEG_START, tl.float32)
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j0 in range(0, M, BLOCK_M):
            cols = j0 + tl.arange(0, BLOCK_M)
            col_in = cols < M
            tile_in = row_in[:, None] & col_in[None, :]
            b = tl.load(b_base + cols * stride_b_m, mask=col_in, other=0.0)
            v = tl.where(b > 0, _log_mass(b) - tl.load(l_ptr + cols, mask=col_in, other=0.0), float("-inf"))
            c = _cost_tile(cost_base, rows, cols, tile_in, stride_cost_n, stride_cost_m)
            x = tl.where(tile_in, v[None, :] - c * inv_eps, float("-inf"))
            new_top = tl.maximum(top, tl.max(x, axis=1))
            total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top[:, None]), axis=1)
            top = new_top
        tl.store(r_ptr + rows, tl.log(total) + top, mask=row_in)


@triton.jit
def sinkhorn_streamed_forward_kernel(
    cost_ptr,  # (B, N, M), or (N, M) shared with stride_cost_b = 0; fp32|fp16|bf16
    a_ptr,  # (B, N) fp32
    b_ptr,  # (B, M) fp32
    value_ptr,  # (B,) fp32
    value_linear_ptr,  # (B,) fp32
    f_ptr,  # (B, N) fp32: f̃
    g_ptr,  # (B, M) fp32: g̃
    n_iter_ptr,  # (B,) int32
    err_ptr,  # (B,) fp32
    plan_ptr,  # (B, N, M) fp32, written if RETURN_PLAN
    f_hist_ptr,  # (B, max_iter, N) fp32, written if SAVE_HISTORY
    g_hist_ptr,  # (B, max_iter, M) fp32, written if SAVE_HISTORY
    r_scratch_ptr,  # (B, N) fp32: R = −f̃/ε
    l_scratch_ptr,  # (B, M) fp32: L = −g̃/ε, the accepted one
    l_new_scratch_ptr,  # (B, M) fp32: L of the column step under test
    N, M, stride_cost_b, stride_cost_n, stride_cost_m, stride_a_b, stride_a_n, stride_b_b, stride_b_m,
    eps, inv_eps, max_iter, tol,
    SAVE_HISTORY: tl.constexpr, RETURN_PLAN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cost_base = cost_ptr + pid * stride_cost_b
    a_base = a_ptr + pid * stride_a_b
    b_base = b_ptr + pid * stride_b_b
    r_ptr = r_scratch_ptr + pid * N
    l_ptr = l_scratch_ptr + pid * M
    l_new_ptr = l_new_scratch_ptr + pid * M
    f_hist = f_hist_ptr + pid * max_iter * N
    g_hist = g_hist_ptr + pid * max_iter * M

    _column_pass(cost_base, a_base, stride_a_n, b_base, stride_b_m, r_ptr, l_ptr, l_ptr, N, M,
                 stride_cost_n, stride_cost_m, inv_eps, FIRST=True, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M)
    tl.debug_barrier()
    if SAVE_HISTORY:
        for j0 in range(0, M, BLOCK_M):
            cols = j0 + tl.arange(0, BLOCK_M)
            tl.store(g_hist + cols, -eps * tl.load(l_ptr + cols, mask=cols < M), mask=cols < M)
    # Tensors from the start: an int argument equal to 1 is specialised to a constant.
    it = tl.program_id(0) * 0
    err = tol * 0.0 + float("inf")
    running = it < max_iter
    while running:
        _row_pass(cost_base, b_base, stride_b_m, l_ptr, r_ptr, N, M, stride_cost_n, stride_cost_m, inv_eps,
                  BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M)
        tl.debug_barrier()
        if SAVE_HISTORY:
            for i0 in range(0, N, BLOCK_N):
                rows = i0 + tl.arange(0, BLOCK_N)
                tl.store(f_hist + it * N + rows, -eps * tl.load(r_ptr + rows, mask=rows < N), mask=rows < N)
        it += 1
        err = _column_pass(cost_base, a_base, stride_a_n, b_base, stride_b_m, r_ptr, l_ptr, l_new_ptr, N, M,
                           stride_cost_n, stride_cost_m, inv_eps, FIRST=False, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M)
        running = (it < max_iter) & ((err > tol) | (err != err))
        tl.debug_barrier()
        for j0 in range(0, M, BLOCK_M):
            cols = j0 + tl.arange(0, BLOCK_M)
            keep = (cols < M) & _keeps_running(it, max_iter, err, tol, cols)
            L_new = tl.load(l_new_ptr + cols, mask=cols < M)
            tl.store(l_ptr + cols, L_new, mask=keep)
            if SAVE_HISTORY:
                tl.store(g_hist + it * M + cols, -eps * L_new, mask=keep)
        tl.debug_barrier()

    value_linear = 0.0
    value = 0.0
    for i0 in range(0, N, BLOCK_N):
        rows = i0 + tl.arange(0, BLOCK_N)
        row_in = rows < N
        a = tl.load(a_base + rows * stride_a_n, mask=row_in, other=0.0)
        R = tl.load(r_ptr + rows, mask=row_in, other=0.0)
        u = tl.where(a > 0, _log_mass(a) - R, float("-inf"))
        f_t = -eps * R
        tl.store(f_ptr + pid * N + rows, f_t, mask=row_in)
        for j0 in range(0, M, BLOCK_M):
            cols = j0 + tl.arange(0, BLOCK_M)
            col_in = cols < M
            tile_in = row_in[:, None] & col_in[None, :]
            b = tl.load(b_base + cols * stride_b_m, mask=col_in, other=0.0)
            L = tl.load(l_ptr + cols, mask=col_in, other=0.0)
            v = tl.where(b > 0, _log_mass(b) - L, float("-inf"))
            c = _cost_tile(cost_base, rows, cols, tile_in, stride_cost_n, stride_cost_m)
            p = tl.where(tile_in, tl.exp(u[:, None] + v[None, :] - c * inv_eps), 0.0)
            value_linear += tl.sum(tl.sum(p * c, axis=1), axis=0)
            value += tl.sum(tl.sum(p * (f_t[:, None] - eps * L[None, :]), axis=1), axis=0)
            if RETURN_PLAN:
                tl.store(plan_ptr + pid * N * M + rows[:, None].to(tl.int64) * M + cols[None, :], p, mask=tile_in)
    for j0 in range(0, M, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        tl.store(g_ptr + pid * M + cols, -eps * tl.load(l_ptr + cols, mask=cols < M), mask=cols < M)
    tl.store(n_iter_ptr + pid, it)
    tl.store(err_ptr + pid, err)
    tl.store(value_ptr + pid, value)
    tl.store(value_linear_ptr + pid, value_linear)


@triton.jit
def sinkhorn_tile_unrolled_backward_kernel(
    grad_cost_ptr,  # (B, N, M) fp32, or (N, M) fp32 accumulated atomically if SHARED; if COST_GRAD
    grad_a_ptr,  # (B, N) fp32
    grad_b_ptr,  # (B, M) fp32
    cost_ptr,  # (B, N, M), or (N, M) shared; fp32|fp16|bf16
    a_ptr,  # (B, N) fp32
    b_ptr,  # (B, M) fp32
    n_iter_ptr,  # (B,) int32
    f_hist_ptr,  # (B, max_iter, N) fp32
    g_hist_ptr,  # (B, max_iter, M) fp32
    grad_value_ptr,  # (B,) fp32
    grad_value_linear_ptr,  # (B,) fp32
    N, M, stride_cost_b, stride_cost_n, stride_cost_m, stride_a_b, stride_a_n, stride_b_b, stride_b_m,
    eps, inv_eps, max_iter,
    COST_GRAD: tl.constexpr, SHARED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    row_in = rows < N
    col_in = cols < M
    tile_in = row_in[:, None] & col_in[None, :]
    c = tl.load(cost_ptr + pid * stride_cost_b + rows[:, None] * stride_cost_n + cols[None, :] * stride_cost_m,
                mask=tile_in, other=0.0).to(tl.float32)
    cs = tl.where(tile_in, c * inv_eps, float("inf"))
    a = tl.load(a_ptr + pid * stride_a_b + rows * stride_a_n, mask=row_in, other=0.0)
    b = tl.load(b_ptr + pid * stride_b_b + cols * stride_b_m, mask=col_in, other=0.0)
    la = _log_mass(a)
    lb = _log_mass(b)
    T = tl.load(n_iter_ptr + pid)
    f_hist = f_hist_ptr + pid * max_iter * N
    g_hist = g_hist_ptr + pid * max_iter * M
    w_v = tl.load(grad_value_ptr + pid)
    w_l = tl.load(grad_value_linear_ptr + pid)

    # Outputs: value_linear = Σ P·C, value = Σ P·(f̃ ⊕ g̃), P = exp(u ⊕ v − C/ε).
    f_t = tl.load(f_hist + (T - 1) * N + rows, mask=row_in, other=0.0)
    g_t = tl.load(g_hist + (T - 1) * M + cols, mask=col_in, other=0.0)
    u = tl.where(a > 0, la + f_t * inv_eps, float("-inf"))
    v = tl.where(b > 0, lb + g_t * inv_eps, float("-inf"))
    p = tl.exp(u[:, None] + v[None, :] - cs)
    q = p * (w_l * c + w_v * (f_t[:, None] + g_t[None, :])) * inv_eps
    q_rows = tl.sum(q, axis=1)
    q_cols = tl.sum(q, axis=0)
    f_bar = q_rows + w_v * tl.sum(p, axis=1)
    g_out = q_cols + w_v * tl.sum(p, axis=0)
    la_bar = eps * q_rows
    lb_bar = eps * q_cols
    if COST_GRAD:
        c_bar = w_l * p - q
    u0 = tl.where(a > 0, 0.0, float("-inf"))
    for k in range(0, T):
        t = T - 1 - k
        f_t = tl.load(f_hist + t * N + rows, mask=row_in, other=0.0)
        g_t = tl.load(g_hist + t * M + cols, mask=col_in, other=0.0)
        # Row step t, f̃_t = −ε·lse_j(log b_j + (g̃_t,j − C_ij)/ε): π is its row-normalised kernel.
        v_t = tl.where(b > 0, lb + g_t * inv_eps, float("-inf"))
        pi = tl.exp(v_t[None, :] + f_t[:, None] * inv_eps - cs)
        x = f_bar[:, None] * pi
        x_cols = tl.sum(x, axis=0)
        g_bar = tl.where(cols * 0 + k == 0, g_out, 0.0) - x_cols
        lb_bar -= eps * x_cols
        # Column step t, g̃_t = −ε·lse_i(u_{t−1,i} − C_ij/ε); at t = 0, u is the fixed start u0.
        not_first = rows * 0 + t > 0
        f_prev = tl.load(f_hist + (t - 1) * N + rows, mask=row_in & not_first, other=0.0)
        u_prev = tl.where(not_first, tl.where(a > 0, la + f_prev * inv_eps, float("-inf")), u0)
        sigma = tl.exp(u_prev[:, None] + g_t[None, :] * inv_eps - cs)
        y = g_bar[None, :] * sigma
        y_rows = tl.sum(y, axis=1)
        la_bar -= tl.where(not_first, eps * y_rows, 0.0)
        f_bar = -y_rows
        if COST_GRAD:
            c_bar += x + y

    tl.store(grad_a_ptr + pid * N + rows, tl.where(a > 0, la_bar / tl.where(a > 0, a, 1.0), 0.0), mask=row_in)
    tl.store(grad_b_ptr + pid * M + cols, tl.where(b > 0, lb_bar / tl.where(b > 0, b, 1.0), 0.0), mask=col_in)
    if COST_GRAD:
        offsets = rows[:, None] * M + cols[None, :]
        if SHARED:
            tl.atomic_add(grad_cost_ptr + offsets, c_bar, mask=tile_in)
        else:
            tl.store(grad_cost_ptr + pid * N * M + offsets, c_bar, mask=tile_in)


@triton.jit
def sinkhorn_streamed_unrolled_backward_kernel(
    grad_a_ptr,  # (B, N) fp32: ∂/∂log a while running, ∂/∂a at the end
    grad_b_ptr,  # (B, M) fp32: likewise for b
    cost_ptr,  # (B, N, M), or (N, M) shared; fp32|fp16|bf16
    a_ptr,  # (B, N) fp32
    b_ptr,  # (B, M) fp32
    n_iter_ptr,  # (B,) int32
    f_hist_ptr,  # (B, max_iter, N) fp32
    g_hist_ptr,  # (B, max_iter, M) fp32
    grad_value_ptr,  # (B,) fp32
    grad_value_linear_ptr,  # (B,) fp32
    f_bar_ptr,  # (B, N) fp32 scratch: adjoint of f̃_t
    g_bar_ptr,  # (B, M) fp32 scratch: adjoint of g̃_t
    g_out_ptr,  # (B, M) fp32 scratch: adjoint of the final g̃ from the outputs
    f_bar_hist_ptr,  # (B, max_iter, N) fp32, written if STORE_ADJOINTS (for the cost gradient)
    g_bar_hist_ptr,  # (B, max_iter, M) fp32, written if STORE_ADJOINTS
    N, M, stride_cost_b, stride_cost_n, stride_cost_m, stride_a_b, stride_a_n, stride_b_b, stride_b_m,
    eps, inv_eps, max_iter,
    STORE_ADJOINTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cost_base = cost_ptr + pid * stride_cost_b
    a_base = a_ptr + pid * stride_a_b
    b_base = b_ptr + pid * stride_b_b
    T = tl.load(n_iter_ptr + pid)
    f_hist = f_hist_ptr + pid * max_iter * N
    g_hist = g_hist_ptr + pid * max_iter * M
    f_bar_hist = f_bar_hist_ptr + pid * max_iter * N
    g_bar_hist = g_bar_hist_ptr + pid * max_iter * M
    la_bar_ptr = grad_a_ptr + pid * N
    lb_bar_ptr = grad_b_ptr + pid * M
    f_bar_base = f_bar_ptr + pid * N
    g_bar_base = g_bar_ptr + pid * M
    g_out_base = g_out_ptr + pid * M
    w_v = tl.load(grad_value_ptr + pid)
    w_l = tl.load(grad_value_linear_ptr + pid)
    f_last = f_hist + (T - 1) * N
    g_last = g_hist + (T - 1) * M

    # Outputs → adjoints of the final f̃ (row sums) and g̃ (column sums), and of log a, log b.
    for i0 in range(0, N, BLOCK_N):
        rows = i0 + tl.arange(0, BLOCK_N)
        row_in = rows < N
        a = tl.load(a_base + rows * stride_a_n, mask=row_in, other=0.0)
        f_t = tl.load(f_last + rows, mask=row_in, other=0.0)
        u = tl.where(a > 0, _log_mass(a) + f_t * inv_eps, float("-inf"))
        q_rows = tl.zeros([BLOCK_N], dtype=tl.float32)
        p_rows = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j0 in range(0, M, BLOCK_M):
            cols = j0 + tl.arange(0, BLOCK_M)
            col_in = cols < M
            tile_in = row_in[:, None] & col_in[None, :]
            b = tl.load(b_base + cols * stride_b_m, mask=col_in, other=0.0)
            g_t = tl.load(g_last + cols, mask=col_in, other=0.0)
            v = tl.where(b > 0, _log_mass(b) + g_t * inv_eps, float("-inf"))
            c = _cost_tile(cost_base, rows, cols, tile_in, stride_cost_n, stride_cost_m)
            p = tl.where(tile_in, tl.exp(u[:, None] + v[None, :] - c * inv_eps), 0.0)
            q = p * (w_l * c + w_v * (f_t[:, None] + g_t[None, :])) * inv_eps
            q_rows += tl.sum(q, axis=1)
            p_rows += tl.sum(p, axis=1)
        tl.store(f_bar_base + rows, q_rows + w_v * p_rows, mask=row_in)
        tl.store(la_bar_ptr + rows, eps * q_rows, mask=row_in)
    for j0 in range(0, M, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        col_in = cols < M
        b = tl.load(b_base + cols * stride_b_m, mask=col_in, other=0.0)
        g_t = tl.load(g_last + cols, mask=col_in, other=0.0)
        v = tl.where(b > 0, _log_mass(b) + g_t * inv_eps, float("-inf"))
        q_cols = tl.zeros([BLOCK_M], dtype=tl.float32)
        p_cols = tl.zeros([BLOCK_M], dtype=tl.float32)
        for i0 in range(0, N, BLOCK_N):
            rows = i0 + tl.arange(0, BLOCK_N)
            row_in = rows < N
            tile_in = row_in[:, None] & col_in[None, :]
            a = tl.load(a_base + rows * stride_a_n, mask=row_in, other=0.0)
            f_t = tl.load(f_last + rows, mask=row_in, other=0.0)
            u = tl.where(a > 0, _log_mass(a) + f_t * inv_eps, float("-inf"))
            c = _cost_tile(cost_base, rows, cols, tile_in, stride_cost_n, stride_cost_m)
            p = tl.where(tile_in, tl.exp(u[:, None] + v[None, :] - c * inv_eps), 0.0)
            q = p * (w_l * c + w_v * (f_t[:, None] + g_t[None, :])) * inv_eps
            q_cols += tl.sum(q, axis=0)
            p_cols += tl.sum(p, axis=0)
        tl.store(g_out_base + cols, q_cols + w_v * p_cols, mask=col_in)
        tl.store(lb_bar_ptr + cols, eps * q_cols, mask=col_in)
    tl.debug_barrier()

    for k in range(0, T):
        t = T - 1 - k
        f_t_ptr = f_hist + t * N
        g_t_ptr = g_hist + t * M
        # Row step t (reverse): ḡ_j = [ḡ_out_j at the last step] − Σ_i f̄_i·π_ij.
        for j0 in range(0, M, BLOCK_M):
            cols = j0 + tl.arange(0, BLOCK_M)
            col_in = cols < M
            b = tl.load(b_base + cols * stride_b_m, mask=col_in, other=0.0)
            g_t = tl.load(g_t_ptr + cols, mask=col_in, other=0.0)
            v_t = tl.where(b > 0, _log_mass(b) + g_t * inv_eps, float("-inf"))
            x_cols = tl.zeros([BLOCK_M], dtype=tl.float32)
            for i0 in range(0, N, BLOCK_N):
                rows = i0 + tl.arange(0, BLOCK_N)
                row_in = rows < N
                tile_in = row_in[:, None] & col_in[None, :]
                f_t = tl.load(f_t_ptr + rows, mask=row_in, other=0.0)
                f_bar = tl.load(f_bar_base + rows, mask=row_in, other=0.0)
                c = _cost_tile(cost_base, rows, cols, tile_in, stride_cost_n, stride_cost_m)
                pi = tl.where(tile_in, tl.exp(v_t[None, :] + f_t[:, None] * inv_eps - c * inv_eps), 0.0)
                x_cols += tl.sum(f_bar[:, None] * pi, axis=0)
            g_out = tl.load(g_out_base + cols, mask=col_in & (cols * 0 + k == 0), other=0.0)
            tl.store(g_bar_base + cols, g_out - x_cols, mask=col_in)
            lb_bar = tl.load(lb_bar_ptr + cols, mask=col_in, other=0.0)
            tl.debug_barrier()
            tl.store(lb_bar_ptr + cols, lb_bar - eps * x_cols, mask=col_in)
            if STORE_ADJOINTS:
                tl.store(g_bar_hist + t * M + cols, g_out - x_cols, mask=col_in)
        if STORE_ADJOINTS:
            for i0 in range(0, N, BLOCK_N):
                rows = i0 + tl.arange(0, BLOCK_N)
                tl.store(f_bar_hist + t * N + rows, tl.load(f_bar_base + rows, mask=rows < N), mask=rows < N)
        tl.debug_barrier()
        # Column step t (reverse): f̄_{t−1,i} = −Σ_j ḡ_j·σ_ij; log a's adjoint from t > 0 only.
        for i0 in range(0, N, BLOCK_N):
            rows = i0 + tl.arange(0, BLOCK_N)
            row_in = rows < N
            a = tl.load(a_base + rows * stride_a_n, mask=row_in, other=0.0)
            not_first = rows * 0 + t > 0
            f_prev = tl.load(f_t_ptr - N + rows, mask=row_in & not_first, other=0.0)
            u_prev = tl.where(a > 0, tl.where(not_first, _log_mass(a) + f_prev * inv_eps, 0.0), float("-inf"))
            y_rows = tl.zeros([BLOCK_N], dtype=tl.float32)
            for j0 in range(0, M, BLOCK_M):
                cols = j0 + tl.arange(0, BLOCK_M)
                col_in = cols < M
                tile_in = row_in[:, None] & col_in[None, :]
                g_t = tl.load(g_t_ptr + cols, mask=col_in, other=0.0)
                g_bar = tl.load(g_bar_base + cols, mask=col_in, other=0.0)
                c = _cost_tile(cost_base, rows, cols, tile_in, stride_cost_n, stride_cost_m)
                sigma = tl.where(tile_in, tl.exp(u_prev[:, None] + g_t[None, :] * inv_eps - c * inv_eps), 0.0)
                y_rows += tl.sum(g_bar[None, :] * sigma, axis=1)
            la_bar = tl.load(la_bar_ptr + rows, mask=row_in, other=0.0)
            tl.debug_barrier()
            tl.store(f_bar_base + rows, -y_rows, mask=row_in)
            tl.store(la_bar_ptr + rows, la_bar - tl.where(not_first, eps * y_rows, 0.0), mask=row_in)
        tl.debug_barrier()

    # ∂/∂a = ∂/∂log a / a on the support, 0 off it.
    for i0 in range(0, N, BLOCK_N):
        rows = i0 + tl.arange(0, BLOCK_N)
        row_in = rows < N
        a = tl.load(a_base + rows * stride_a_n, mask=row_in, other=0.0)
        la_bar = tl.load(la_bar_ptr + rows, mask=row_in, other=0.0)
        tl.debug_barrier()
        tl.store(la_bar_ptr + rows, tl.where(a > 0, la_bar / tl.where(a > 0, a, 1.0), 0.0), mask=row_in)
    for j0 in range(0, M, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        col_in = cols < M
        b = tl.load(b_base + cols * stride_b_m, mask=col_in, other=0.0)
        lb_bar = tl.load(lb_bar_ptr + cols, mask=col_in, other=0.0)
        tl.debug_barrier()
        tl.store(lb_bar_ptr + cols, tl.where(b > 0, lb_bar / tl.where(b > 0, b, 1.0), 0.0), mask=col_in)


@triton.jit
def sinkhorn_cost_grad_kernel(
    grad_cost_ptr,  # (B, N, M) fp32, or (N, M) fp32 summed over the problems if SHARED
    cost_ptr,  # (B, N, M), or (N, M) shared; fp32|fp16|bf16
    a_ptr,  # (B, N) fp32
    b_ptr,  # (B, M) fp32
    f_ptr,  # (B, N) fp32: final f̃
    g_ptr,  # (B, M) fp32: final g̃
    coef_p_ptr,  # (B,) fp32: α
    coef_c_ptr,  # (B,) fp32: β
    coef_fg_ptr,  # (B,) fp32: γ
    n_iter_ptr,  # (B,) int32, read if HAS_HISTORY
    f_hist_ptr,  # (B, max_iter, N) fp32, read if HAS_HISTORY
    g_hist_ptr,  # (B, max_iter, M) fp32
    f_bar_hist_ptr,  # (B, max_iter, N) fp32
    g_bar_hist_ptr,  # (B, max_iter, M) fp32
    n_problems, N, M, stride_cost_b, stride_cost_n, stride_cost_m, stride_a_b, stride_a_n, stride_b_b,
    stride_b_m, inv_eps, max_iter,
    SHARED: tl.constexpr, HAS_HISTORY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # ∂/∂C_ij = Σ_problems α·P + P·(β·C + γ·(f̃_i + g̃_j)) + Σ_t (f̄_t,i·π_t,ij + ḡ_t,j·σ_t,ij).
    n_col_tiles = tl.cdiv(M, BLOCK_M)
    tile = tl.program_id(0)
    rows = (tile // n_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (tile % n_col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < N
    col_in = cols < M
    tile_in = row_in[:, None] & col_in[None, :]
    if SHARED:
        first = 0
        last = n_problems
        out = grad_cost_ptr
    else:
        first = tl.program_id(1)
        last = first + 1
        out = grad_cost_ptr + first.to(tl.int64) * N * M
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for problem in range(first, last):
        pid = tl.cast(problem, tl.int64)
        c = _cost_tile(cost_ptr + pid * stride_cost_b, rows, cols, tile_in, stride_cost_n, stride_cost_m)
        cs = c * inv_eps
        a = tl.load(a_ptr + pid * stride_a_b + rows * stride_a_n, mask=row_in, other=0.0)
        b = tl.load(b_ptr + pid * stride_b_b + cols * stride_b_m, mask=col_in, other=0.0)
        la = _log_mass(a)
        lb = _log_mass(b)
        f_t = tl.load(f_ptr + pid * N + rows, mask=row_in, other=0.0)
        g_t = tl.load(g_ptr + pid * M + cols, mask=col_in, other=0.0)
        u = tl.where(a > 0, la + f_t * inv_eps, float("-inf"))
        v = tl.where(b > 0, lb + g_t * inv_eps, float("-inf"))
        p = tl.where(tile_in, tl.exp(u[:, None] + v[None, :] - cs), 0.0)
        acc += p * (tl.load(coef_p_ptr + pid) + tl.load(coef_c_ptr + pid) * c
                    + tl.load(coef_fg_ptr + pid) * (f_t[:, None] + g_t[None, :]))
        if HAS_HISTORY:
            T = tl.load(n_iter_ptr + pid)
            f_hist = f_hist_ptr + pid * max_iter * N
            g_hist = g_hist_ptr + pid * max_iter * M
            f_bar_hist = f_bar_hist_ptr + pid * max_iter * N
            g_bar_hist = g_bar_hist_ptr + pid * max_iter * M
            u_prev = tl.where(a > 0, 0.0, float("-inf"))
            for t in range(0, T):
                f_t = tl.load(f_hist + t * N + rows, mask=row_in, other=0.0)
                g_t = tl.load(g_hist + t * M + cols, mask=col_in, other=0.0)
                f_bar = tl.load(f_bar_hist + t * N + rows, mask=row_in, other=0.0)
                g_bar = tl.load(g_bar_hist + t * M + cols, mask=col_in, other=0.0)
                v_t = tl.where(b > 0, lb + g_t * inv_eps, float("-inf"))
                pi = tl.where(tile_in, tl.exp(v_t[None, :] + f_t[:, None] * inv_eps - cs), 0.0)
                sigma = tl.where(tile_in, tl.exp(u_prev[:, None] + g_t[None, :] * inv_eps - cs), 0.0)
                acc += f_bar[:, None] * pi + g_bar[None, :] * sigma
                u_prev = tl.where(a > 0, la + f_t * inv_eps, float("-inf"))
    tl.store(out + rows[:, None].to(tl.int64) * M + cols[None, :], acc, mask=tile_in)


# --- launchers ---------------------------------------------------------------------------------

def _layout(cost, a, b):
    stride_cost_b = 0 if cost.dim() == 2 else cost.stride(0)
    return (stride_cost_b, cost.stride(-2), cost.stride(-1), a.stride(0), a.stride(1), b.stride(0), b.stride(1))


def _fits_on_chip(n, m):
    return n <= MAX_TILE and m <= MAX_TILE


def _tile_config(n, m):
    block_n, block_m = triton.next_power_of_2(n), triton.next_power_of_2(m)
    # About 16 fp32 elements per thread and tile-sized tensor (ptxas for sm_90: 64×64 at 8 warps
    # fits in registers; 128×128 at 16 warps hits the 128-register cap and spills a few hundred bytes).
    num_warps = max(1, min(16, block_n * block_m // 512))
    return block_n, block_m, num_warps


def _stream_config(n, m):
    block_n, block_m = min(STREAM_BLOCK, triton.next_power_of_2(n)), min(STREAM_BLOCK, triton.next_power_of_2(m))
    return block_n, block_m, max(1, min(8, block_n * block_m // 512))


@on_tensor_device
def sinkhorn_forward(cost, a, b, eps, max_iter, tol, save_history, return_plan):
    """cost: (n, m) shared or (B, n, m), fp32|fp16|bf16; a: (B, n), b: (B, m) fp32 (stride-0 views
    allowed). Returns SinkhornOutputs (contract.py), in fp32."""
    device = cost.device
    n_problems, n = a.shape
    m = b.shape[1]
    a, b = a.float(), b.float()

    outputs = allocate_outputs(n_problems, n, m, max_iter, save_history, return_plan, device, zero_history=False)
    if n_problems == 0:
        return outputs
    scalars = (eps, 1.0 / eps, max_iter, tol)
    if _fits_on_chip(n, m):
        block_n, block_m, num_warps = _tile_config(n, m)
        sinkhorn_tile_forward_kernel[(n_problems,)](
            cost, a, b, *outputs, n, m, *_layout(cost, a, b), *scalars,
            SAVE_HISTORY=save_history, RETURN_PLAN=return_plan, BLOCK_N=block_n, BLOCK_M=block_m,
            num_warps=num_warps)
    else:
        block_n, block_m, num_warps = _stream_config(n, m)
        sinkhorn_streamed_forward_kernel[(n_problems,)](
            cost, a, b, *outputs, *(torch.empty(n_problems, size, dtype=torch.float32, device=device)
                                    for size in (n, m, m)),  # the streamed kernel's scratch
            n, m, *_layout(cost, a, b), *scalars,
            SAVE_HISTORY=save_history, RETURN_PLAN=return_plan, BLOCK_N=block_n, BLOCK_M=block_m,
            num_warps=num_warps)
    return outputs


def _cost_grad(cost, a, b, f, g, coef_p, coef_c, coef_fg, eps, history):
    """Launches sinkhorn_cost_grad_kernel; ``history`` = (n_iter, f_hist, g_hist, f̄ hist, ḡ hist) or None."""
    n_problems, n = a.shape
    m = b.shape[1]
    shared = cost.dim() == 2
    grad_cost = torch.zeros(cost.shape if shared else (n_problems, n, m), dtype=torch.float32, device=cost.device)
    block_n, block_m, num_warps = _stream_config(n, m)
    n_tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    grid = (n_tiles,) if shared else (n_tiles, n_problems)
    max_iter = 0 if history is None else history[1].shape[1]
    hist = history if history is not None else (f, f, g, f, g)  # never read without HAS_HISTORY
    sinkhorn_cost_grad_kernel[grid](
        grad_cost, cost, a, b, f, g, coef_p.float().contiguous(), coef_c.float().contiguous(),
        coef_fg.float().contiguous(), *hist, n_problems, n, m, *_layout(cost, a, b), 1.0 / eps, max_iter,
        SHARED=shared, HAS_HISTORY=history is not None, BLOCK_N=block_n, BLOCK_M=block_m, num_warps=num_warps)
    return grad_cost


@on_tensor_device
def sinkhorn_backward(grad_value, grad_value_linear, cost, a, b, f, g, n_iter, f_hist, g_hist, eps, mode,
                      needs_cost, needs_a, needs_b):
    """As sinkhorn/torch.py's sinkhorn_backward; fp32 results."""
    device = cost.device
    n_problems, n = a.shape
    m = b.shape[1]
    a, b = a.float(), b.float()
    empty = torch.empty(0, dtype=torch.float32, device=device)
    w_v = grad_value.float().contiguous()
    w_l = grad_value_linear.float().contiguous()
    if mode == "envelope":
        grad_a = w_v[:, None] * (f - f.mean(1, keepdim=True)) if needs_a else empty
        grad_b = w_v[:, None] * (g - g.mean(1, keepdim=True)) if needs_b else empty
        grad_cost = empty
        if needs_cost:
            zeros = torch.zeros_like(w_v)
            grad_cost = _cost_grad(cost, a, b, f, g, w_v, zeros, zeros, eps, None)
        return grad_cost, grad_a, grad_b

    grad_a = torch.empty(n_problems, n, dtype=torch.float32, device=device)
    grad_b = torch.empty(n_problems, m, dtype=torch.float32, device=device)
    layout = _layout(cost, a, b)
    if _fits_on_chip(n, m):
        shared = cost.dim() == 2
        grad_cost = empty
        if needs_cost:
            grad_cost = torch.zeros(cost.shape if shared else (n_problems, n, m), dtype=torch.float32, device=device)
        block_n, block_m, num_warps = _tile_config(n, m)
        sinkhorn_tile_unrolled_backward_kernel[(n_problems,)](
            grad_cost if needs_cost else grad_a, grad_a, grad_b, cost, a, b, n_iter, f_hist, g_hist, w_v, w_l,
            n, m, *layout, eps, 1.0 / eps, f_hist.shape[1],
            COST_GRAD=needs_cost, SHARED=shared, BLOCK_N=block_n, BLOCK_M=block_m, num_warps=num_warps)
    else:
        max_iter = f_hist.shape[1]
        adjoints = (torch.empty(n_problems, max_iter, n, dtype=torch.float32, device=device),
                    torch.empty(n_problems, max_iter, m, dtype=torch.float32, device=device)) if needs_cost \
            else (grad_a, grad_b)
        block_n, block_m, num_warps = _stream_config(n, m)
        sinkhorn_streamed_unrolled_backward_kernel[(n_problems,)](
            grad_a, grad_b, cost, a, b, n_iter, f_hist, g_hist, w_v, w_l,
            torch.empty(n_problems, n, dtype=torch.float32, device=device),
            torch.empty(n_problems, m, dtype=torch.float32, device=device),
            torch.empty(n_problems, m, dtype=torch.float32, device=device), *adjoints,
            n, m, *layout, eps, 1.0 / eps, max_iter,
            STORE_ADJOINTS=needs_cost, BLOCK_N=block_n, BLOCK_M=block_m, num_warps=num_warps)
        grad_cost = empty
        if needs_cost:
            grad_cost = _cost_grad(cost, a, b, f, g, w_l, -w_l / eps, -w_v / eps, eps,
                                   (n_iter, f_hist, g_hist, *adjoints))
    return grad_cost, grad_a if needs_a else empty, grad_b if needs_b else empty
