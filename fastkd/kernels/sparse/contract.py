"""The contract of the sparse_kd family (divergences against a top-k teacher): its options and the
definition of the tail bucket (see sparse/torch.py for the formulas)."""

MISSING_MASS = ("renormalize", "tail")
SPARSE_DIVERGENCES = ("forward_kl", "reverse_kl")
# Leftover teacher mass below this (top-k mass rounding to ≥ 1) is treated as this much, so that
# reverse KL stays finite: the student's own leftover is then compared against ~0.
TAIL_FLOOR = 1e-12
