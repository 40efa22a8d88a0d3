"""The contract of the sparse_kd family (divergences against a top-k teacher): its options and the
definition of the tail bucket (see sparse/torch.py for the formulas).

An entry of the teacher is absent when its log-prob is -inf: the public functions turn masked and
padding entries (``teacher_mask`` False, id == ``pad_id``) into -inf log-probs before the kernels
run, so the kernels read one rule. Absent entries' ids are never read as token ids (any value is
harmless); a row with no present entry is an ignored row (loss 0, gradient 0).
"""

MISSING_MASS = ("renormalize", "tail")
SPARSE_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
# Leftover teacher mass below this (top-k mass rounding to ≥ 1) is treated as this much, so that
# reverse KL stays finite: the student's own leftover is then compared against ~0.
TAIL_FLOOR = 1e-12
# The id that marks an absent entry by default: topk_cache's PAD_ID (ids are ≥ 0 otherwise).
DEFAULT_PAD_ID = -1

# The tail mode's kernels (sparse/triton.py, csrc/sparse/cpu.cpp; exported by fastkd._C.contract()):
# columns of their (N, 4) fp32 per-row statistics, max and log Σ exp(s − max) of the scaled row and
# of its columns off the support, and the id that sorts absent entries past every column.
STATS_COLUMNS = ("max", "log_sum", "rest_max", "rest_log_sum")
N_STATS = len(STATS_COLUMNS)
ID_SENTINEL = 2 ** 31 - 1
# What the gradient pass writes in a row, by the row's mode byte: the gradient, zeros (an ignored
# row, never read) or NaN (a present id outside [0, V)).
ROW_MODES = {"normal": 0, "zero": 1, "nan": 2}
