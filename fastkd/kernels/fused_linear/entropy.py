"""The student's entropy per row of a logit block of the fused linear losses (what TRL's
DistillationTrainer logs), read from the block while it is in memory: no extra GEMM.

    z = transform(x) / T,   H = −Σ_v q_v log q_v  with q = softmax(z)
      = L − Σ_v q_v a_v     with a = z − max(z), L = log Σ_v exp(a_v)

Both terms are ≥ 0 (a ≤ 0), so the sum never cancels; masked entries (x = −inf) have q = 0 and
add nothing.
"""

import torch

from ... import logit_transforms
from ..layout import compute_dtype, row_chunks

# Elements of one (rows × V) temporary (about four are alive): 4 MiB fp32 on a CPU, 64 MiB on a GPU
# (a 2k × 128k GPU block in 16 chunks, not 256 small launches).
CHUNK_ELEMENTS = {"cuda": 1 << 24, "cpu": 1 << 20}


def entropy_rows(student_logits, labels, options):
    """student_logits: (C, V) one block; labels: (C,) int or None. Returns (C,) in the compute dtype,
    0 on rows whose label is options.ignore_index."""
    spec = options.spec
    n_rows, n_cols = student_logits.shape
    dtype = compute_dtype(student_logits)
    out = torch.empty(n_rows, dtype=dtype, device=student_logits.device)
    budget = CHUNK_ELEMENTS.get(student_logits.device.type, CHUNK_ELEMENTS["cpu"])
    for start, stop in row_chunks(n_rows, n_cols, budget):
        z = logit_transforms.forward(student_logits[start:stop].to(dtype), spec.student_scale, spec.student_softcap,
                                     spec.standardize, spec.standardize_eps)
        z = z * spec.inv_temperature
        shifted = z - z.amax(-1, keepdim=True)
        log_sum = torch.logsumexp(shifted, -1)
        prob = torch.exp(shifted - log_sum[:, None])
        # q·a is 0·(−inf) = NaN on masked entries: they hold no probability.
        out[start:stop] = log_sum - torch.where(prob > 0, prob * shifted, 0.0).sum(-1)
    if labels is not None:
        out = torch.where(labels != options.ignore_index, out, 0.0)
    return out
