"""Pure-PyTorch implementation of the topk family: per row, the k largest log-probabilities of
softmax(hidden @ weight.T / T) over the whole vocabulary, and their ids, without the (N, V) logits.

The rows are processed in blocks of C rows × Vb vocabulary entries (Vb ≥ k). Each block's logits
come from one matmul; one log_softmax pass gives the block's log-sum-exp, and one top-k its k best
logits and ids, written into the next free slot of a (S, C, k) candidate buffer. When the slots
are full they are merged (one top-k over the S·k candidates of a row) into the first slot. Blocks
are disjoint in the vocabulary, so ids never repeat. At the end of the row block the candidates
are merged once more, the block log-sum-exps combined, and the log-probabilities are the kept
logits minus that. Memory beyond the (N, k) outputs: two (C, Vb) blocks and a candidate buffer
of about a quarter of a block's elements, independent of N and V.

Ranking by logits / T is ranking by logits (T > 0), so the ids do not depend on T. Among equal
logits, which id is kept is torch.topk's choice (unspecified); the values are the same either way.
"""

import math

import torch

from ..layout import compute_dtype
from .contract import PAD_ID

# Elements of one (C, Vb) logit block, per device type (fp32: 16 MiB on a CPU, 256 MiB on a GPU;
# the workspace holds two, the logits and their log_softmax), and the narrowest vocabulary block.
# Two costs pull apart: torch.topk costs more per element on short rows (2.4× at 4571 columns
# than at 32000), and a matmul with few rows runs below the GEMM's rate. Measured on the 2-core
# CPU (2026-12-06, N=2048, H=512, V=32000, k=64, loaded machine, medians of 3): 1024 × 8192
# blocks 2.74 s, 512 × 8192 3.00 s, 1024 × 4096 3.13 s, 2048 × 1024 5.5 s; eager 2.30 s, the
# GEMM alone 1.50 s. 512 × 8192 keeps the workspace at 32 MiB.
BLOCK_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 22}
VOCAB_BLOCK = {"cuda": 1 << 14, "cpu": 1 << 13}


def vocab_blocks(vocab, top_k, device):
    """Boundaries of the vocabulary blocks: as even as possible, none narrower than k (or the
    VOCAB_BLOCK of ``device``, when V allows), so every block fills one candidate slot."""
    width = min(vocab, max(top_k, VOCAB_BLOCK.get(device.type, VOCAB_BLOCK["cpu"])))
    count = max(1, vocab // width)
    return [vocab * i // count for i in range(count + 1)]


def _logits(hidden, weight, bias, out):
    """hidden @ weight.T (+ bias) into ``out``, through a temporary where ``out`` has another
    dtype (bf16 logits into fp32: the teacher's own logits are bf16)."""
    if out.dtype != hidden.dtype:
        return out.copy_(_logits(hidden, weight, bias, torch.empty(out.shape, dtype=hidden.dtype,
                                                                   device=out.device)))
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


def _merge(values, indices, offsets, filled, top_k):
    """Top-k over the first ``filled`` slots of (S, C, k) candidates, whose ids are relative to
    their slot's ``offsets`` (S,): ((C, k) values, (C, k) vocabulary ids)."""
    rows = values.shape[1]
    best, position = values[:filled].transpose(0, 1).reshape(rows, -1).topk(top_k, dim=-1)
    local = indices[:filled].transpose(0, 1).reshape(rows, -1).gather(1, position)
    return best, local + offsets[position // top_k]


def _offsets(starts, first, filled):
    """(filled,) first ids of the slots' blocks: 0 for slot 0, then blocks first, first + 1, …"""
    return torch.cat([starts[:1] * 0, starts[first:first + filled - 1]])


def linear_topk(hidden, weight, bias, labels, top_k, temperature, ignore_index):
    """hidden: (N, H); weight: (V, H); bias: (V,) or None; labels: (N,) int or None.

    Logits are formed by matmul in the hidden states' dtype (as the teacher's own lm_head would),
    then scaled by 1/T and reduced in the compute dtype (fp32; fp64 for fp64 hidden states).
    Returns (indices (N, k) int64, logprobs (N, k) in the compute dtype), each row in decreasing
    order of log-probability; rows whose label is ``ignore_index`` hold PAD_ID and -inf.
    """
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    device, dtype = hidden.device, compute_dtype(hidden)
    inv_temperature = 1.0 / temperature
    bounds = vocab_blocks(vocab, top_k, device)
    n_blocks, widest = len(bounds) - 1, max(b - a for a, b in zip(bounds, bounds[1:]))
    rows = max(1, min(n_rows, BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS["cpu"]) // widest))
    rows = -(-n_rows // -(-n_rows // rows)) if n_rows else 1  # even blocks: 2 × 1024 rows, not 2032 + 16
    # S slots: candidates of about a quarter of a block's elements (values and int64 ids: ¾ of its
    # bytes), and at least two (the running best and a new block).
    slots = min(n_blocks, max(2, widest // (4 * top_k)))
    # The blocks' first ids, made on the device (bounds' formula): no host-to-device copy.
    starts = torch.arange(n_blocks, device=device) * vocab // n_blocks
    indices = torch.empty(n_rows, top_k, dtype=torch.int64, device=device)
    values = torch.empty(n_rows, top_k, dtype=dtype, device=device)
    # One workspace for the whole call, each block a contiguous view of its front: allocating
    # per block lets the CPU heap fragment, and the resident peak then grows with N.
    logits_space = torch.empty(rows * widest, dtype=dtype, device=device)
    log_probs_space = torch.empty(rows * widest, dtype=dtype, device=device)
    all_slot_values = torch.empty(slots, rows, top_k, dtype=dtype, device=device)
    all_slot_indices = torch.empty(slots, rows, top_k, dtype=torch.int64, device=device)
    all_log_sums = torch.empty(n_blocks, rows, dtype=dtype, device=device)
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        block_hidden = hidden[start:stop]
        slot_values, slot_indices = all_slot_values[:, :stop - start], all_slot_indices[:, :stop - start]
        block_log_sums = all_log_sums[:, :stop - start]
        # Each slot's ids count from its block's first id, added once per merge rather than once
        # per block: slot 0 holds block 0, later the merged (vocabulary) ids, both from 0; slots
        # 1, 2, … hold blocks first, first + 1, ….
        filled, first = 0, 1
        for block, (v_start, v_stop) in enumerate(zip(bounds, bounds[1:])):
            if filled == slots:
                slot_values[0], slot_indices[0] = _merge(slot_values, slot_indices,
                                                         _offsets(starts, first, filled), filled, top_k)
                filled, first = 1, block
            block_weight = weight[v_start:v_stop]
            if block_weight.dtype != hidden.dtype:
                # An lm_head kept in another dtype (fp32 next to bf16 activations) is cast block by
                # block, as autocast would cast it for the matmul, never as a whole (V, H) copy.
                block_weight = block_weight.to(hidden.dtype)
            block_bias = None if bias is None else bias[v_start:v_stop].to(hidden.dtype)
            shape = (stop - start, v_stop - v_start)
            z = logits_space[:shape[0] * shape[1]].view(shape)
            _logits(block_hidden, block_weight, block_bias, z)
            if inv_temperature != 1.0:
                z.mul_(inv_temperature)
            torch.topk(z, top_k, dim=-1, out=(slot_values[filled], slot_indices[filled]))
            # One fused log_softmax pass gives the block's log-sum-exp (torch.logsumexp takes
            # several passes, 3-4× slower on a CPU): at the block's best entry lse = z − log_softmax.
            # The aten out= overload writes into the workspace (torch.log_softmax has no out=).
            log_probs = log_probs_space[:shape[0] * shape[1]].view(shape)
            torch.ops.aten._log_softmax.out(z, -1, False, out=log_probs)
            best_log_prob = log_probs.gather(1, slot_indices[filled, :, :1])
            block_log_sums[block] = slot_values[filled, :, 0] - best_log_prob[:, 0]
            filled += 1
        best, best_indices = _merge(slot_values, slot_indices, _offsets(starts, first, filled), filled, top_k)
        values[start:stop] = best - torch.logsumexp(block_log_sums, 0)[:, None]
        indices[start:stop] = best_indices
    if labels is not None:
        ignored = (labels == ignore_index)[:, None]
        indices = torch.where(ignored, PAD_ID, indices)
        values = torch.where(ignored, -math.inf, values)
    return indices, values
