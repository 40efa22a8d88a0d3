"""Streamed kernels of the Triton Sinkhorn solver, with their launch helpers: problems larger than
one on-chip tile. One program per problem; each half-iteration streams the cost through
BLOCK_N × BLOCK_M tiles with an online log-sum-exp, and the potentials live in global scratch
vectors of the program's own problem (barriers order one pass's writes before the next pass's
reads). The unrolled backward keeps adjoint vectors only; ∂/∂cost comes from triton_cost_grad.py.
The math is sinkhorn/torch.py's."""

import torch
import triton
import triton.language as tl

from .triton_common import (NEG_START, divide_on_support, is_step, keeps_running, load_cost_tile, load_vector,
                            log_mass, matrix_offsets, on_support, sinkhorn_jit)


def stream_config(block):
    """num_warps for square BLOCK × BLOCK tiles: 16 fp32 elements per thread (64² at 8 warps uses
    ~240 registers on sm_80/sm_90 without spilling; tests/kernels/triton_aot.py)."""
    return max(1, block * block // 512)


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
            a = load_vector(a_base, rows, stride_a_n, row_in)
            if FIRST:
                u = on_support(a, 0.0, float("-inf"))
            else:
                u = on_support(a, log_mass(a) - tl.load(r_ptr + rows, mask=row_in, other=0.0), float("-inf"))
            c = load_cost_tile(cost_base, rows, cols, tile_in, stride_cost_n, stride_cost_m)
            x = tl.where(tile_in, u[:, None] - c * inv_eps, float("-inf"))
            new_top = tl.maximum(top, tl.max(x, axis=0))
            total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top[None, :]), axis=0)
            top = new_top
        out = tl.log(total) + top
        tl.store(out_ptr + cols, out, mask=col_in)
        if not FIRST:
            b = load_vector(b_base, cols, stride_b_m, col_in)
            L = tl.load(l_ptr + cols, mask=col_in, other=0.0)
            col_sum = on_support(b, tl.exp(log_mass(b) + out - L), 0.0)
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
            b = load_vector(b_base, cols, stride_b_m, col_in)
            v = on_support(b, log_mass(b) - tl.load(l_ptr + cols, mask=col_in, other=0.0), float("-inf"))
            c = load_cost_tile(cost_base, rows, cols, tile_in, stride_cost_n, stride_cost_m)
            x = tl.where(tile_in, v[None, :] - c * inv_eps, float("-inf"))
            new_top = tl.maximum(top, tl.max(x, axis=1))
            total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top[:, None]), axis=1)
            top = new_top
        tl.store(r_ptr + rows, tl.log(total) + top, mask=row_in)


@sinkhorn_jit
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
    plan_ptr,  # (B, N, M) fp32, written if return_plan
    f_hist_ptr,  # (B, max_iter, N) fp32, written if save_history
    g_hist_ptr,  # (B, max_iter, M) fp32, written if save_history
    r_scratch_ptr,  # (B, N) fp32: R = −f̃/ε
    l_scratch_ptr,  # (B, M) fp32: L = −g̃/ε, the accepted one
    l_new_scratch_ptr,  # (B, M) fp32: L of the column step under test
    N: tl.int32, M: tl.int32, stride_cost_b: tl.int64, stride_cost_n: tl.int64, stride_cost_m: tl.int64,
    stride_a_b: tl.int64, stride_a_n: tl.int64, stride_b_b: tl.int64, stride_b_m: tl.int64,
    eps: tl.float32, inv_eps: tl.float32, max_iter: tl.int32, tol: tl.float32,
    save_history: tl.int32, return_plan: tl.int32,  # runtime flags: they gate stores only
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
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
    if save_history:
        for j0 in range(0, M, BLOCK_M):
            cols = j0 + tl.arange(0, BLOCK_M)
            tl.store(g_hist + cols, -eps * tl.load(l_ptr + cols, mask=cols < M), mask=cols < M)
    # Tensors from the start (an int argument equal to 1 may be a constant); int64, so it·N is too.
    it = pid * 0
    err = tol * 0.0 + float("inf")
    running = it < max_iter
    while running:
        _row_pass(cost_base, b_base, stride_b_m, l_ptr, r_ptr, N, M, stride_cost_n, stride_cost_m, inv_eps,
                  BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M)
        tl.debug_barrier()
        if save_history:
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
            keep = (cols < M) & keeps_running(it, max_iter, err, tol, cols)
            L_new = tl.load(l_new_ptr + cols, mask=cols < M)
            tl.store(l_ptr + cols, L_new, mask=keep)
            if save_history:
                tl.store(g_hist + it * M + cols, -eps * L_new, mask=keep)
        tl.debug_barrier()

    value_linear = 0.0
    value = 0.0
    for i0 in range(0, N, BLOCK_N):
        rows = i0 + tl.arange(0, BLOCK_N)
        row_in = rows < N
        a = load_vector(a_base, rows, stride_a_n, row_in)
        R = tl.load(r_ptr + rows, mask=row_in, other=0.0)
        u = on_support(a, log_mass(a) - R, float("-inf"))
        f_t = -eps * R
        tl.store(f_ptr + pid * N + rows, f_t, mask=row_in)
        for j0 in range(0, M, BLOCK_M):
            cols = j0 + tl.arange(0, BLOCK_M)
            col_in = cols < M
            tile_in = row_in[:, None] & col_in[None, :]
            b = load_vector(b_base, cols, stride_b_m, col_in)
            L = tl.load(l_ptr + cols, mask=col_in, other=0.0)
            v = on_support(b, log_mass(b) - L, float("-inf"))
            c = load_cost_tile(cost_base, rows, cols, tile_in, stride_cost_n, stride_cost_m)
            p = tl.where(tile_in, tl.exp(u[:, None] + v[None, :] - c * inv_eps), 0.0)
            value_linear += tl.sum(tl.sum(p * c, axis=1), axis=0)
            value += tl.sum(tl.sum(p * (f_t[:, None] - eps * L[None, :]), axis=1), axis=0)
            if return_plan:
                tl.store(plan_ptr + pid * N * M + matrix_offsets(rows, cols, M), p, mask=tile_in)
    for j0 in range(0, M, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        tl.store(g_ptr + pid * M + cols, -eps * tl.load(l_ptr + cols, mask=cols < M), mask=cols < M)
    tl.store(n_iter_ptr + pid, it.to(tl.int32))
    tl.store(err_ptr + pid, err)
    tl.store(value_ptr + pid, value)
    tl.store(value_linear_ptr + pid, value_linear)


@sinkhorn_jit
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
    f_bar_hist_ptr,  # (B, max_iter, N) fp32, written if store_adjoints (for the cost gradient)
    g_bar_hist_ptr,  # (B, max_iter, M) fp32, written if store_adjoints
    N: tl.int32, M: tl.int32, stride_cost_b: tl.int64, stride_cost_n: tl.int64, stride_cost_m: tl.int64,
    stride_a_b: tl.int64, stride_a_n: tl.int64, stride_b_b: tl.int64, stride_b_m: tl.int64,
    eps: tl.float32, inv_eps: tl.float32, max_iter: tl.int32,
    store_adjoints: tl.int32,  # runtime flag: it gates stores only
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cost_base = cost_ptr + pid * stride_cost_b
    a_base = a_ptr + pid * stride_a_b
    b_base = b_ptr + pid * stride_b_b
    T = tl.load(n_iter_ptr + pid).to(tl.int64)
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
        a = load_vector(a_base, rows, stride_a_n, row_in)
        f_t = tl.load(f_last + rows, mask=row_in, other=0.0)
        u = on_support(a, log_mass(a) + f_t * inv_eps, float("-inf"))
        q_rows = tl.zeros([BLOCK_N], dtype=tl.float32)
        p_rows = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j0 in range(0, M, BLOCK_M):
            cols = j0 + tl.arange(0, BLOCK_M)
            col_in = cols < M
            tile_in = row_in[:, None] & col_in[None, :]
            b = load_vector(b_base, cols, stride_b_m, col_in)
            g_t = tl.load(g_last + cols, mask=col_in, other=0.0)
            v = on_support(b, log_mass(b) + g_t * inv_eps, float("-inf"))
            c = load_cost_tile(cost_base, rows, cols, tile_in, stride_cost_n, stride_cost_m)
            p = tl.where(tile_in, tl.exp(u[:, None] + v[None, :] - c * inv_eps), 0.0)
            q = p * (w_l * c + w_v * (f_t[:, None] + g_t[None, :])) * inv_eps
            q_rows += tl.sum(q, axis=1)
            p_rows += tl.sum(p, axis=1)
        tl.store(f_bar_base + rows, q_rows + w_v * p_rows, mask=row_in)
        tl.store(la_bar_ptr + rows, eps * q_rows, mask=row_in)
    for j0 in range(0, M, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        col_in = cols < M
        b = load_vector(b_base, cols, stride_b_m, col_in)
        g_t = tl.load(g_last + cols, mask=col_in, other=0.0)
        v = on_support(b, log_mass(b) + g_t * inv_eps, float("-inf"))
        q_cols = tl.zeros([BLOCK_M], dtype=tl.float32)
        p_cols = tl.zeros([BLOCK_M], dtype=tl.float32)
        for i0 in range(0, N, BLOCK_N):
            rows = i0 + tl.arange(0, BLOCK_N)
            row_in = rows < N
            tile_in = row_in[:, None] & col_in[None, :]
            a = load_vector(a_base, rows, stride_a_n, row_in)
            f_t = tl.load(f_last + rows, mask=row_in, other=0.0)
            u = on_support(a, log_mass(a) + f_t * inv_eps, float("-inf"))
            c = load_cost_tile(cost_base, rows, cols, tile_in, stride_cost_n, stride_cost_m)
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
            b = load_vector(b_base, cols, stride_b_m, col_in)
            g_t = tl.load(g_t_ptr + cols, mask=col_in, other=0.0)
            v_t = on_support(b, log_mass(b) + g_t * inv_eps, float("-inf"))
            x_cols = tl.zeros([BLOCK_M], dtype=tl.float32)
            for i0 in range(0, N, BLOCK_N):
                rows = i0 + tl.arange(0, BLOCK_N)
                row_in = rows < N
                tile_in = row_in[:, None] & col_in[None, :]
                f_t = tl.load(f_t_ptr + rows, mask=row_in, other=0.0)
                f_bar = tl.load(f_bar_base + rows, mask=row_in, other=0.0)
                c = load_cost_tile(cost_base, rows, cols, tile_in, stride_cost_n, stride_cost_m)
                pi = tl.where(tile_in, tl.exp(v_t[None, :] + f_t[:, None] * inv_eps - c * inv_eps), 0.0)
                x_cols += tl.sum(f_bar[:, None] * pi, axis=0)
            g_out = tl.load(g_out_base + cols, mask=col_in & is_step(k, cols, 0), other=0.0)
            tl.store(g_bar_base + cols, g_out - x_cols, mask=col_in)
            lb_bar = tl.load(lb_bar_ptr + cols, mask=col_in, other=0.0)
            tl.debug_barrier()
            tl.store(lb_bar_ptr + cols, lb_bar - eps * x_cols, mask=col_in)
            if store_adjoints:
                tl.store(g_bar_hist + t * M + cols, g_out - x_cols, mask=col_in)
        if store_adjoints:
            for i0 in range(0, N, BLOCK_N):
                rows = i0 + tl.arange(0, BLOCK_N)
                tl.store(f_bar_hist + t * N + rows, tl.load(f_bar_base + rows, mask=rows < N), mask=rows < N)
        tl.debug_barrier()
        # Column step t (reverse): f̄_{t−1,i} = −Σ_j ḡ_j·σ_ij; log a's adjoint from t > 0 only.
        for i0 in range(0, N, BLOCK_N):
            rows = i0 + tl.arange(0, BLOCK_N)
            row_in = rows < N
            a = load_vector(a_base, rows, stride_a_n, row_in)
            not_first = ~is_step(t, rows, 0)
            f_prev = tl.load(f_t_ptr - N + rows, mask=row_in & not_first, other=0.0)
            u_prev = on_support(a, tl.where(not_first, log_mass(a) + f_prev * inv_eps, 0.0), float("-inf"))
            y_rows = tl.zeros([BLOCK_N], dtype=tl.float32)
            for j0 in range(0, M, BLOCK_M):
                cols = j0 + tl.arange(0, BLOCK_M)
                col_in = cols < M
                tile_in = row_in[:, None] & col_in[None, :]
                g_t = tl.load(g_t_ptr + cols, mask=col_in, other=0.0)
                g_bar = tl.load(g_bar_base + cols, mask=col_in, other=0.0)
                c = load_cost_tile(cost_base, rows, cols, tile_in, stride_cost_n, stride_cost_m)
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
        a = load_vector(a_base, rows, stride_a_n, row_in)
        la_bar = tl.load(la_bar_ptr + rows, mask=row_in, other=0.0)
        tl.debug_barrier()
        tl.store(la_bar_ptr + rows, divide_on_support(la_bar, a), mask=row_in)
    for j0 in range(0, M, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        col_in = cols < M
        b = load_vector(b_base, cols, stride_b_m, col_in)
        lb_bar = tl.load(lb_bar_ptr + cols, mask=col_in, other=0.0)
        tl.debug_barrier()
        tl.store(lb_bar_ptr + cols, divide_on_support(lb_bar, b), mask=col_in)


def _scratch(n_problems, size, device):
    return torch.empty(n_problems, size, dtype=torch.float32, device=device)


def launch_streamed_forward(cost, a, b, outputs, layout, eps, max_iter, tol, save_history, return_plan, block):
    """As triton_tile.launch_tile_forward, with square ``block`` × ``block`` cost tiles streamed from memory."""
    n_problems, n = a.shape
    m = b.shape[1]
    scratch = (_scratch(n_problems, size, a.device) for size in (n, m, m))
    sinkhorn_streamed_forward_kernel[(n_problems,)](
        cost, a, b, *outputs, *scratch, n, m, *layout, eps, 1.0 / eps, max_iter, tol, int(save_history),
        int(return_plan), BLOCK_N=block, BLOCK_M=block, num_warps=stream_config(block))


def launch_streamed_unrolled_backward(grad_a, grad_b, cost, a, b, n_iter, f_hist, g_hist, w_v, w_l, layout, eps,
                                      block, adjoints):
    """Writes ∂/∂a (B, n) and ∂/∂b (B, m); ``adjoints`` = (f̄ history (B, max_iter, n), ḡ history
    (B, max_iter, m)) to fill for triton_cost_grad.py, or None."""
    n_problems, n = a.shape
    m = b.shape[1]
    device = a.device
    scratch = (_scratch(n_problems, size, device) for size in (n, m, m))
    sinkhorn_streamed_unrolled_backward_kernel[(n_problems,)](
        grad_a, grad_b, cost, a, b, n_iter, f_hist, g_hist, w_v, w_l, *scratch,
        *(adjoints if adjoints is not None else (grad_a, grad_b)),
        n, m, *layout, eps, 1.0 / eps, f_hist.shape[1], int(adjoints is not None),
        BLOCK_N=block, BLOCK_M=block, num_warps=stream_config(block))
