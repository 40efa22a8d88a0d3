"""Pure-PyTorch implementation of the topk family: per row, the k largest log-probabilities of
softmax(hidden @ weight.T / T) over the whole vocabulary, and their ids, without the (N, V) logits.

The rows are processed in blocks of C rows × Vb vocabulary entries. Each block's logits come from
one matmul; the block then updates, per row, a running log-sum-exp (logaddexp of the block's) and
a running top-k (the block's own top-k merged with the running one by one top-k over the ≤ 2k
candidates; blocks are disjoint in the vocabulary, so ids never repeat). The log-probabilities are
the kept logits minus the final log-sum-exp. Memory beyond the (N, k) outputs: a few (C, Vb) and
(C, 2k) blocks, independent of N and V.

Ranking by logits / T is ranking by logits (T > 0), so the ids do not depend on T. Among equal
logits, which id is kept is torch.topk's choice (unspecified); the values are the same either way.
"""

import math

import torch

from ..layout import compute_dtype
from .contract import PAD_ID

# Elements of one (C, Vb) logit block, per device type (fp32: 8 MiB on a CPU, 1 GiB on a GPU),
# and the widest vocabulary block: a few blocks per row keep the merges cheap while each matmul
# stays large enough to run at the GEMM rate.
BLOCK_ELEMENTS = {"cuda": 1 << 28, "cpu": 1 << 21}
VOCAB_BLOCK = {"cuda": 1 << 15, "cpu": 1 << 13}


def block_shape(n_rows, vocab, device):
    """(rows C, vocabulary Vb) of one block for ``device``."""
    budget = BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS["cpu"])
    cols = min(vocab, VOCAB_BLOCK.get(device.type, VOCAB_BLOCK["cpu"]))
    return max(1, min(n_rows, budget // cols)), cols


def _logits(hidden, weight, bias):
    return torch.matmul(hidden, weight.t()) if bias is None else torch.addmm(bias, hidden, weight.t())


def linear_topk(hidden, weight, bias, labels, top_k, temperature, ignore_index):
    """hidden: (N, H); weight: (V, H); bias: (V,) or None; labels: (N,) int or None.

    Logits are formed by matmul in the hidden states' dtype (as the teacher's own lm_head would),
    then scaled by 1/T and reduced in the compute dtype (fp32; fp64 for fp64 hidden states).
    Returns (indices (N, k) int64, logprobs (N, k) in the compute dtype), each row in decreasing
    order of log-probability; rows whose label is ``ignore_index`` hold PAD_ID and -inf.
    """
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden)
    inv_temperature = 1.0 / temperature
    indices = torch.empty(n_rows, top_k, dtype=torch.int64, device=hidden.device)
    values = torch.empty(n_rows, top_k, dtype=dtype, device=hidden.device)
    rows, cols = block_shape(n_rows, vocab, hidden.device)
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        block_hidden = hidden[start:stop]
        best_values = best_indices = log_sum = None
        for v_start in range(0, vocab, cols):
            v_stop = min(v_start + cols, vocab)
            block_weight = weight[v_start:v_stop]
            if block_weight.dtype != hidden.dtype:
                # An lm_head kept in another dtype (fp32 next to bf16 activations) is cast block by
                # block, as autocast would cast it for the matmul, never as a whole (V, H) copy.
                block_weight = block_weight.to(hidden.dtype)
            block_bias = None if bias is None else bias[v_start:v_stop].to(hidden.dtype)
            z = _logits(block_hidden, block_weight, block_bias).to(dtype)
            if inv_temperature != 1.0:
                z.mul_(inv_temperature)
            block_log_sum = torch.logsumexp(z, -1)
            log_sum = block_log_sum if log_sum is None else torch.logaddexp(log_sum, block_log_sum)
            block_values, block_indices = z.topk(min(top_k, v_stop - v_start), dim=-1)
            block_indices += v_start
            if best_values is None:
                best_values, best_indices = block_values, block_indices
                continue
            candidates = torch.cat([best_values, block_values], 1)
            candidate_indices = torch.cat([best_indices, block_indices], 1)
            best_values, position = candidates.topk(min(top_k, candidates.shape[1]), dim=-1)
            best_indices = candidate_indices.gather(1, position)
        values[start:stop] = best_values - log_sum[:, None]
        indices[start:stop] = best_indices
    if labels is not None:
        ignored = (labels == ignore_index)[:, None]
        indices = torch.where(ignored, PAD_ID, indices)
        values = torch.where(ignored, -math.inf, values)
    return indices, values
