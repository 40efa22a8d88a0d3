"""The cost-gradient kernel of the Triton Sinkhorn solver, with its launch helpers: ∂/∂cost of the
envelope mode (grad·P) and of the streamed unrolled mode (from the adjoint histories of
triton_streamed.py), for a batched or a shared cost.

Work is one (chunk of problems, cost tile) pair: a batched cost has one problem per chunk and
writes its own gradient; a shared cost splits the batch into chunks whose partial sums (C, n, m)
one reduction adds up, so a batch of small problems runs on many programs, not one. The grid is
one-dimensional (CUDA allows 2³¹ − 1 programs there, 65535 in y and z) and programs loop over the
work items beyond it."""

import torch
import triton
import triton.language as tl

from .triton_common import load_cost_tile, load_vector, log_mass, matrix_offsets, on_support, sinkhorn_jit


# Square tiles and their warps, eight fp32 elements per thread: the kernel holds ~150 registers
# there, and 64² spills on sm_80 at 8 warps and on sm_90 at 16 (tests/kernels/triton_aot.py).
COST_GRAD_WARPS = {16: 1, 32: 4}


def cost_grad_config(n, m, max_block):
    """(BLOCK, num_warps): square power-of-two tiles of at most ``max_block`` and max(COST_GRAD_WARPS)."""
    block = min(max_block, max(COST_GRAD_WARPS), max(min(COST_GRAD_WARPS), triton.next_power_of_2(max(n, m))))
    return block, COST_GRAD_WARPS.get(block, 1)


def cost_grad_work(n_problems, n_tiles, shared, parallel_programs):
    """(problems per chunk, chunks) of a launch. A batched cost: one problem per chunk. A shared cost:
    enough chunks that chunks × tiles reaches ``parallel_programs`` (the partial sums take at most
    that many cost tiles of memory), then chunks as even as the batch allows."""
    if not shared:
        return 1, n_problems
    chunks = max(1, min(n_problems, parallel_programs // n_tiles))
    per_chunk = triton.cdiv(n_problems, chunks)
    return per_chunk, triton.cdiv(n_problems, per_chunk)


def cost_grad_grid(n_work, max_programs):
    """The launch grid for ``n_work`` (chunk, tile) items: one dimension, at most ``max_programs``
    programs (≤ 2³¹ − 1, CUDA's limit in x), each looping over the items a grid apart."""
    return (max(1, min(n_work, max_programs)),)


@sinkhorn_jit
def sinkhorn_cost_grad_kernel(
    grad_cost_ptr,  # (chunks, N, M) fp32: Σ over each chunk's problems
    cost_ptr,  # (B, N, M), or (N, M) shared with stride_cost_b = 0; fp32|fp16|bf16
    a_ptr,  # (B, N) fp32
    b_ptr,  # (B, M) fp32
    f_ptr,  # (B, N) fp32: final f̃
    g_ptr,  # (B, M) fp32: final g̃
    coef_p_ptr,  # (B,) fp32: α
    coef_c_ptr,  # (B,) fp32: β
    coef_fg_ptr,  # (B,) fp32: γ
    n_iter_ptr,  # (B,) int32, read if has_history
    f_hist_ptr,  # (B, max_iter, N) fp32, read if has_history
    g_hist_ptr,  # (B, max_iter, M) fp32
    f_bar_hist_ptr,  # (B, max_iter, N) fp32
    g_bar_hist_ptr,  # (B, max_iter, M) fp32
    n_problems: tl.int32, per_chunk: tl.int32, n_work: tl.int64, N: tl.int32, M: tl.int32,
    stride_cost_b: tl.int64, stride_cost_n: tl.int64, stride_cost_m: tl.int64, stride_a_b: tl.int64,
    stride_a_n: tl.int64, stride_b_b: tl.int64, stride_b_m: tl.int64, inv_eps: tl.float32, max_iter: tl.int32,
    has_history: tl.int32,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # ∂/∂C_ij = Σ_problems α·P + P·(β·C + γ·(f̃_i + g̃_j)) + Σ_t (f̄_t,i·π_t,ij + ḡ_t,j·σ_t,ij).
    n_col_tiles = tl.cdiv(M, BLOCK_M)
    n_tiles = tl.cdiv(N, BLOCK_N).to(tl.int64) * n_col_tiles
    for work in range(tl.program_id(0).to(tl.int64), n_work, tl.num_programs(0)):
        chunk = work // n_tiles
        tile = work % n_tiles
        rows = ((tile // n_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int32)
        cols = ((tile % n_col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int32)
        row_in = rows < N
        col_in = cols < M
        tile_in = row_in[:, None] & col_in[None, :]
        first = chunk * per_chunk
        last = tl.minimum(first + per_chunk, n_problems)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for pid in range(first, last):
            c = load_cost_tile(cost_ptr + pid * stride_cost_b, rows, cols, tile_in, stride_cost_n, stride_cost_m)
            cs = c * inv_eps
            a = load_vector(a_ptr + pid * stride_a_b, rows, stride_a_n, row_in)
            b = load_vector(b_ptr + pid * stride_b_b, cols, stride_b_m, col_in)
            la = log_mass(a)
            lb = log_mass(b)
            f_t = tl.load(f_ptr + pid * N + rows, mask=row_in, other=0.0)
            g_t = tl.load(g_ptr + pid * M + cols, mask=col_in, other=0.0)
            u = on_support(a, la + f_t * inv_eps, float("-inf"))
            v = on_support(b, lb + g_t * inv_eps, float("-inf"))
            p = tl.where(tile_in, tl.exp(u[:, None] + v[None, :] - cs), 0.0)
            acc += p * (tl.load(coef_p_ptr + pid) + tl.load(coef_c_ptr + pid) * c
                        + tl.load(coef_fg_ptr + pid) * (f_t[:, None] + g_t[None, :]))
            T = tl.load(n_iter_ptr + pid).to(tl.int64) * has_history
            f_hist = f_hist_ptr + pid * max_iter * N
            g_hist = g_hist_ptr + pid * max_iter * M
            f_bar_hist = f_bar_hist_ptr + pid * max_iter * N
            g_bar_hist = g_bar_hist_ptr + pid * max_iter * M
            u_prev = on_support(a, 0.0, float("-inf"))
            for t in range(0, T):
                f_t = tl.load(f_hist + t * N + rows, mask=row_in, other=0.0)
                g_t = tl.load(g_hist + t * M + cols, mask=col_in, other=0.0)
                f_bar = tl.load(f_bar_hist + t * N + rows, mask=row_in, other=0.0)
                g_bar = tl.load(g_bar_hist + t * M + cols, mask=col_in, other=0.0)
                v_t = on_support(b, lb + g_t * inv_eps, float("-inf"))
                pi = tl.where(tile_in, tl.exp(v_t[None, :] + f_t[:, None] * inv_eps - cs), 0.0)
                acc += f_bar[:, None] * pi
                sigma = tl.where(tile_in, tl.exp(u_prev[:, None] + g_t[None, :] * inv_eps - cs), 0.0)
                acc += g_bar[None, :] * sigma
                u_prev = on_support(a, la + f_t * inv_eps, float("-inf"))
        tl.store(grad_cost_ptr + chunk * N * M + matrix_offsets(rows, cols, M), acc, mask=tile_in)


def launch_cost_grad(cost, a, b, f, g, coef_p, coef_c, coef_fg, n_iter, eps, layout, history, max_block,
                     parallel_programs, max_programs):
    """∂/∂cost, fp32, in cost's shape: (n, m) for a shared cost, (B, n, m) for a batched one.
    coef_*: (B,) α, β, γ; ``history`` = (f̃ hist, g̃ hist, f̄ hist, ḡ hist), each (B, max_iter, ·),
    or None for the envelope term alone."""
    n_problems, n = a.shape
    m = b.shape[1]
    shared = cost.dim() == 2
    block, num_warps = cost_grad_config(n, m, max_block)
    n_tiles = triton.cdiv(n, block) * triton.cdiv(m, block)
    per_chunk, chunks = cost_grad_work(n_problems, n_tiles, shared, parallel_programs)
    out = torch.empty(chunks, n, m, dtype=torch.float32, device=cost.device)
    max_iter = 0 if history is None else history[0].shape[1]
    hist = history if history is not None else (f, g, f, g)  # never read without has_history
    coefs = (x.float().contiguous() for x in (coef_p, coef_c, coef_fg))
    n_work = chunks * n_tiles
    sinkhorn_cost_grad_kernel[cost_grad_grid(n_work, max_programs)](
        out, cost, a, b, f, g, *coefs, n_iter, *hist, n_problems, per_chunk, n_work, n, m, *layout,
        1.0 / eps, max_iter, int(history is not None), BLOCK_N=block, BLOCK_M=block, num_warps=num_warps)
    if not shared:
        return out
    return out[0] if chunks == 1 else out.sum(0)
