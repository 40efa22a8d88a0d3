"""Tile kernels of the Triton Sinkhorn solver, with their launch helpers: problems whose whole
(n, m) cost fits on chip. One program per problem reads its cost tile once, scales it by 1/ε and
keeps it in registers for every iteration; a shared (n, m) cost is the same tile for every program,
so B programs read one matrix (from L2), never B copies. The math is sinkhorn/torch.py's."""

import triton
import triton.language as tl

from .triton_common import (divide_on_support, is_step, keeps_running, load_cost_tile, load_vector, log_mass,
                            log_sum_exp, matrix_offsets, on_support, sinkhorn_jit)

# Square power-of-two tiles and their warps: three shapes (× cost dtypes) is a variant set the
# ahead-of-time spill check compiles in full; a very rectangular problem pays for the padding. Eight
# fp32 elements per thread and tile-sized tensor, four at 16²: ptxas (sm_90) spills 16² at 1 warp,
# 64² at 8 warps, and 128² at any count (tests/kernels/triton_aot.py).
TILE_WARPS = {16: 2, 32: 4, 64: 16}


def tile_config(n, m):
    """(BLOCK, num_warps) for an n × m problem, n, m ≤ max(TILE_WARPS)."""
    block = max(min(TILE_WARPS), triton.next_power_of_2(max(n, m)))
    if block not in TILE_WARPS:
        raise ValueError(f"a {n} × {m} problem does not fit one {max(TILE_WARPS)}² tile")
    return block, TILE_WARPS[block]


@sinkhorn_jit
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
    plan_ptr,  # (B, N, M) fp32, written if return_plan
    f_hist_ptr,  # (B, max_iter, N) fp32, written if save_history
    g_hist_ptr,  # (B, max_iter, M) fp32, written if save_history
    N: tl.int32, M: tl.int32, stride_cost_b: tl.int64, stride_cost_n: tl.int64, stride_cost_m: tl.int64,
    stride_a_b: tl.int64, stride_a_n: tl.int64, stride_b_b: tl.int64, stride_b_m: tl.int64,
    eps: tl.float32, inv_eps: tl.float32, max_iter: tl.int32, tol: tl.float32,
    save_history: tl.int32, return_plan: tl.int32,  # runtime flags: they gate stores only
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    row_in = rows < N
    col_in = cols < M
    tile_in = row_in[:, None] & col_in[None, :]
    c = load_cost_tile(cost_ptr + pid * stride_cost_b, rows, cols, tile_in, stride_cost_n, stride_cost_m)
    cs = tl.where(tile_in, c * inv_eps, float("inf"))  # padding never carries mass
    a = load_vector(a_ptr + pid * stride_a_b, rows, stride_a_n, row_in)
    b = load_vector(b_ptr + pid * stride_b_b, cols, stride_b_m, col_in)
    la = log_mass(a)
    lb = log_mass(b)
    f_hist = f_hist_ptr + pid * max_iter * N
    g_hist = g_hist_ptr + pid * max_iter * M

    # POT's f = 0 start on the support of a; zero-mass rows are absent from the first step too.
    u = on_support(a, 0.0, float("-inf"))
    L = log_sum_exp(u[:, None] - cs, 0)
    v = on_support(b, lb - L, float("-inf"))
    R = tl.zeros([BLOCK_N], dtype=tl.float32)
    if save_history:
        tl.store(g_hist + cols, -eps * L, mask=col_in)
    # Tensors from the start (an int argument equal to 1 may be a constant); int64, so it·N is too.
    it = pid * 0
    err = tol * 0.0 + float("inf")
    running = it < max_iter
    while running:
        R = log_sum_exp(v[None, :] - cs, 1)
        u = on_support(a, la - R, float("-inf"))
        if save_history:
            tl.store(f_hist + it * N + rows, -eps * R, mask=row_in)
        it += 1
        # The next column step gives the current plan's column sums for free: b·exp(L_new − L).
        L_new = log_sum_exp(u[:, None] - cs, 0)
        col_sum = on_support(b, tl.exp(lb + L_new - L), 0.0)
        err = tl.sum(tl.abs(col_sum - b), axis=0)
        # A NaN error keeps running (the comparison is false), as POT does.
        running = (it < max_iter) & ((err > tol) | (err != err))
        go_on = keeps_running(it, max_iter, err, tol, cols)
        L = tl.where(go_on, L_new, L)
        v = on_support(b, lb - L, float("-inf"))
        if save_history:
            tl.store(g_hist + it * M + cols, -eps * L, mask=col_in & go_on)

    f_t = tl.where(row_in, -eps * R, 0.0)
    g_t = tl.where(col_in, -eps * L, 0.0)
    p = tl.exp(u[:, None] + v[None, :] - cs)
    c = tl.where(tile_in, cs * eps, 0.0)
    value_linear = tl.sum(tl.sum(p * c, axis=1), axis=0)
    value = tl.sum(tl.sum(p * (f_t[:, None] + g_t[None, :]), axis=1), axis=0)
    tl.store(f_ptr + pid * N + rows, f_t, mask=row_in)
    tl.store(g_ptr + pid * M + cols, g_t, mask=col_in)
    tl.store(n_iter_ptr + pid, it.to(tl.int32))
    tl.store(err_ptr + pid, err)
    tl.store(value_ptr + pid, value)
    tl.store(value_linear_ptr + pid, value_linear)
    if return_plan:
        tl.store(plan_ptr + pid * N * M + matrix_offsets(rows, cols, M), p, mask=tile_in)


@sinkhorn_jit
def sinkhorn_tile_unrolled_backward_kernel(
    grad_cost_ptr,  # (B, N, M) fp32, or (N, M) fp32 with stride_grad_b = 0; zeros on entry; if cost_grad
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
    N: tl.int32, M: tl.int32, stride_cost_b: tl.int64, stride_cost_n: tl.int64, stride_cost_m: tl.int64,
    stride_a_b: tl.int64, stride_a_n: tl.int64, stride_b_b: tl.int64, stride_b_m: tl.int64,
    stride_grad_b: tl.int64, eps: tl.float32, inv_eps: tl.float32, max_iter: tl.int32,
    cost_grad: tl.int32,  # runtime flag: it gates the store only
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    row_in = rows < N
    col_in = cols < M
    tile_in = row_in[:, None] & col_in[None, :]
    c = load_cost_tile(cost_ptr + pid * stride_cost_b, rows, cols, tile_in, stride_cost_n, stride_cost_m)
    cs = tl.where(tile_in, c * inv_eps, float("inf"))
    a = load_vector(a_ptr + pid * stride_a_b, rows, stride_a_n, row_in)
    b = load_vector(b_ptr + pid * stride_b_b, cols, stride_b_m, col_in)
    la = log_mass(a)
    lb = log_mass(b)
    T = tl.load(n_iter_ptr + pid).to(tl.int64)
    f_hist = f_hist_ptr + pid * max_iter * N
    g_hist = g_hist_ptr + pid * max_iter * M
    w_v = tl.load(grad_value_ptr + pid)
    w_l = tl.load(grad_value_linear_ptr + pid)

    # Outputs: value_linear = Σ P·C, value = Σ P·(f̃ ⊕ g̃), P = exp(u ⊕ v − C/ε).
    f_t = tl.load(f_hist + (T - 1) * N + rows, mask=row_in, other=0.0)
    g_t = tl.load(g_hist + (T - 1) * M + cols, mask=col_in, other=0.0)
    u = on_support(a, la + f_t * inv_eps, float("-inf"))
    v = on_support(b, lb + g_t * inv_eps, float("-inf"))
    p = tl.exp(u[:, None] + v[None, :] - cs)
    q = p * (w_l * c + w_v * (f_t[:, None] + g_t[None, :])) * inv_eps
    q_rows = tl.sum(q, axis=1)
    q_cols = tl.sum(q, axis=0)
    f_bar = q_rows + w_v * tl.sum(p, axis=1)
    g_out = q_cols + w_v * tl.sum(p, axis=0)
    la_bar = eps * q_rows
    lb_bar = eps * q_cols
    # Accumulated whether or not it is stored: a branch per iteration would not save registers.
    c_bar = w_l * p - q
    for k in range(0, T):
        t = T - 1 - k
        f_t = tl.load(f_hist + t * N + rows, mask=row_in, other=0.0)
        g_t = tl.load(g_hist + t * M + cols, mask=col_in, other=0.0)
        # Row step t, f̃_t = −ε·lse_j(log b_j + (g̃_t,j − C_ij)/ε): π is its row-normalised kernel.
        v_t = on_support(b, lb + g_t * inv_eps, float("-inf"))
        x = f_bar[:, None] * tl.exp(v_t[None, :] + f_t[:, None] * inv_eps - cs)
        x_cols = tl.sum(x, axis=0)
        c_bar += x
        g_bar = tl.where(is_step(k, cols, 0), g_out, 0.0) - x_cols
        lb_bar -= eps * x_cols
        # Column step t, g̃_t = −ε·lse_i(u_{t−1,i} − C_ij/ε); at t = 0, u is the fixed start
        # (0 on the support; recomputed, not kept: 64² at 16 warps sits at sm_90's 128 registers).
        not_first = ~is_step(t, rows, 0)
        f_prev = tl.load(f_hist + (t - 1) * N + rows, mask=row_in & not_first, other=0.0)
        u_prev = on_support(a, tl.where(not_first, la + f_prev * inv_eps, 0.0), float("-inf"))
        y = g_bar[None, :] * tl.exp(u_prev[:, None] + g_t[None, :] * inv_eps - cs)
        y_rows = tl.sum(y, axis=1)
        c_bar += y
        la_bar -= tl.where(not_first, eps * y_rows, 0.0)
        f_bar = -y_rows

    tl.store(grad_a_ptr + pid * N + rows, divide_on_support(la_bar, a), mask=row_in)
    tl.store(grad_b_ptr + pid * M + cols, divide_on_support(lb_bar, b), mask=col_in)
    if cost_grad:
        # A shared cost sums the problems (stride_grad_b = 0). Relaxed ordering: nothing reads the
        # sum before the kernel ends; a per-problem gradient adds once to zero, which is exact.
        tl.atomic_add(grad_cost_ptr + pid * stride_grad_b + matrix_offsets(rows, cols, M), c_bar, mask=tile_in,
                      sem="relaxed")


def launch_tile_forward(cost, a, b, outputs, layout, eps, max_iter, tol, save_history, return_plan):
    """Fills ``outputs`` (SinkhornOutputs, contract.py) for cost (n, m) or (B, n, m), a (B, n), b (B, m) fp32.
    ``layout``: the strides (cost b, n, m; a b, n; b b, m) in elements, stride_cost_b 0 for a shared cost."""
    n_problems, n = a.shape
    m = b.shape[1]
    block, num_warps = tile_config(n, m)
    sinkhorn_tile_forward_kernel[(n_problems,)](
        cost, a, b, *outputs, n, m, *layout, eps, 1.0 / eps, max_iter, tol, int(save_history), int(return_plan),
        BLOCK_N=block, BLOCK_M=block, num_warps=num_warps)


def launch_tile_unrolled_backward(grad_cost, grad_a, grad_b, cost, a, b, n_iter, f_hist, g_hist, w_v, w_l, layout,
                                  eps):
    """Writes ∂/∂a, ∂/∂b (B, n), (B, m) and, if ``grad_cost`` is not None, adds ∂/∂cost into it
    (zeros on entry; (n, m) summed over the problems for a shared cost, else (B, n, m))."""
    n_problems, n = a.shape
    m = b.shape[1]
    block, num_warps = tile_config(n, m)
    needs_cost = grad_cost is not None
    stride_grad_b = n * m if needs_cost and grad_cost.dim() == 3 else 0
    sinkhorn_tile_unrolled_backward_kernel[(n_problems,)](
        grad_cost if needs_cost else grad_a, grad_a, grad_b, cost, a, b, n_iter, f_hist, g_hist, w_v, w_l,
        n, m, *layout, stride_grad_b, eps, 1.0 / eps, f_hist.shape[1], int(needs_cost),
        BLOCK_N=block, BLOCK_M=block, num_warps=num_warps)
