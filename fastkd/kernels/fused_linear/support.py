"""The fused linear loss against a top-k teacher renormalised over its support, without a hard
term: the loss reads the student's logits at the k ids of each row only, so they are formed as k
dot products per row, s_nj = h_n · W[x_nj] (+ b[x_nj]), instead of the (N, V) logit GEMM, and the
gradient lands on those k rows of the weight. O(N·k·H) work and memory instead of O(N·V·H):
with k = 64 of V = 128k that is 2000× fewer FLOPs than the dense teacher's four GEMMs.

A path of the block driver, not a backend: the renormalised divergence comes from the sparse_kd
kernels of the backend in the options (``support_loss``).
"""

import torch

from ..layout import clamped_ids, compute_dtype

# Elements of one gathered weight block (rows × k × H): 16 MiB in fp32 on a CPU, 256 MiB on a GPU.
GATHER_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 22}


def serves(teacher_family, options):
    """Whether this path computes the call: the sparse teacher renormalised, no cross-entropy
    (it needs every logit), no entropy (the same), no student scale or soft-cap (the block path
    applies them)."""
    spec = options.spec
    return (teacher_family == "sparse_kd" and options.missing_mass == "renormalize" and not options.with_hard
            and not options.with_entropy and spec.student_scale == 1.0 and spec.student_softcap == 0)


def run(student_hidden, student_weight, student_bias, indices, logprobs, labels, options, kernels, soft_scale,
        need, weight_dtype, bias_dtype):
    """As driver.run: student_hidden (N, H); student_weight (V, H) and student_bias (V,) or None,
    both already in the hidden states' dtype; indices, logprobs (N, k). Returns (soft_rows (N,),
    hard_rows (N,) zeros, None, grad_hidden, grad_weight, grad_bias)."""
    n_rows, hidden_size = student_hidden.shape
    vocab, top_k = student_weight.shape[0], indices.shape[1]
    want_grad = soft_scale is not None
    need_hidden, need_weight, need_bias = need if want_grad else (False, False, False)
    dtype = compute_dtype(student_hidden, logprobs)
    # Logits in fp32 (fp64) when asked for, as the block driver forms them; else in the GEMM dtype.
    logits_dtype = dtype if options.fp32_logits else student_hidden.dtype
    grad_hidden = torch.empty_like(student_hidden) if need_hidden else None
    grad_bias = torch.zeros(vocab, dtype=compute_dtype(student_weight), device=student_weight.device) \
        if need_bias else None
    budget = GATHER_ELEMENTS.get(student_hidden.device.type, GATHER_ELEMENTS["cpu"])
    rows = max(1, budget // max(top_k * hidden_size, 1))
    chunks = [(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]
    index = clamped_ids(indices, torch.ones_like(indices, dtype=torch.bool), vocab)[0]
    logits = torch.empty(n_rows, top_k, dtype=logits_dtype, device=student_hidden.device)
    for start, stop in chunks:
        weight_rows = _rows_of(student_weight, index[start:stop])
        logits[start:stop] = torch.bmm(weight_rows.to(logits_dtype),
                                       student_hidden[start:stop].to(logits_dtype)[:, :, None])[..., 0]
    if student_bias is not None:
        logits += student_bias[index].to(logits_dtype)
    # The divergence on all N rows at once: (N, k) is small, and on a loaded CPU each small op
    # costs its thread wake-ups (per-chunk calls were most of the time, docs/perf-notes.md).
    soft_rows, support_grad = kernels.support_loss(logits, indices, logprobs, vocab, labels, options.spec,
                                                   options.ignore_index, soft_scale)
    if not want_grad:
        return soft_rows, soft_rows.new_zeros(n_rows), None, None, None, None
    if need_hidden:  # rounded once to the GEMM operands' dtype, as the block driver does
        rounded = support_grad.to(student_hidden.dtype)
        for start, stop in chunks:
            weight_rows = _rows_of(student_weight, index[start:stop])
            grad_hidden[start:stop] = torch.bmm(rounded[start:stop, None, :], weight_rows)[:, 0]
    grad_weight = None
    if need_weight:
        grad_weight = _weight_grad(support_grad, index, student_hidden, vocab, weight_dtype, chunks,
                                   atomic=student_hidden.device.type == "cuda")
    if need_bias:
        grad_bias.index_add_(0, index.reshape(-1), support_grad.reshape(-1).to(grad_bias.dtype))
        grad_bias = grad_bias.to(bias_dtype)
    return soft_rows, soft_rows.new_zeros(n_rows), None, grad_hidden, grad_weight, grad_bias


def _rows_of(weight, index):
    """weight[index]: (R, k, H). As an embedding lookup, which copies whole rows (half the time of
    advanced indexing on the 2-core CPU)."""
    return torch.nn.functional.embedding(index, weight)


def _weight_grad(support_grad, index, hidden, vocab, weight_dtype, chunks, atomic):
    """Σ_n Σ_j g_nj·e_{x_nj} h_nᵀ: (V, H). On a GPU an atomic index_add_ of the (R·k, H) rows of
    each chunk; on a CPU, where index_add_ of many rows runs serially (0.2 s for 65k × 256 on the
    2-core machine), one sparse (V, N) × dense (N, H) product (BLAS-backed, duplicates summed)."""
    n_rows, top_k = support_grad.shape
    if atomic:
        grad_weight = torch.zeros(vocab, hidden.shape[1], dtype=weight_dtype, device=hidden.device)
        for start, stop in chunks:
            rows = support_grad[start:stop].to(weight_dtype)[:, :, None] * hidden[start:stop].to(weight_dtype)[:, None]
            grad_weight.index_add_(0, index[start:stop].reshape(-1), rows.reshape(-1, hidden.shape[1]))
        return grad_weight
    math_dtype = support_grad.dtype  # fp32 (fp64): the CPU sparse product's dtypes
    row_ids = torch.arange(n_rows, device=hidden.device).repeat_interleave(top_k)
    sparse = torch.sparse_coo_tensor(torch.stack([index.reshape(-1), row_ids]), support_grad.reshape(-1),
                                     (vocab, n_rows), check_invariants=False)  # ids clamped in range above
    return torch.sparse.mm(sparse, hidden.to(math_dtype)).to(weight_dtype)
