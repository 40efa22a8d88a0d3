"""The contract of the logits families (kd_rows, kl_div, ce) that every backend keeps.

The C++ side holds the same numbers (csrc/include/fastkd/logits/); the registry compares them
with ``fastkd._C.contract()`` at import and reports a drifted build as unavailable.
"""

# Kernel codes of the divergences (Triton constexprs, C++ enum values).
DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "skew_forward_kl": 3, "skew_reverse_kl": 4,
                    "tvd": 5}

# Columns of the (N, 5) per-row statistics the kd_rows forward saves for its backward: the max and
# log-sum-exp offset of student / T and of teacher / T (kept apart: (x − max) − log_sum keeps the
# precision of ±1e4 logits that x − (max + log_sum) would round away), and the gradient's
# per-row constant ``aux`` (fastkd/divergences.py). Ignored rows store zeros.
STATS_COLUMNS = ("max_s", "log_sum_s", "max_t", "log_sum_t", "aux")
MAX_S, LOG_SUM_S, MAX_T, LOG_SUM_T, AUX = range(len(STATS_COLUMNS))
N_STATS = len(STATS_COLUMNS)

# With standardize=True the rows are (N, 9): the five above, then the mean and sample std of each
# side's scaled and soft-capped logits (logit_transforms.py), saved by kernels whose backward redoes
# the standardised logits from them (native); backends that recompute them (torch) store zeros there.
STANDARDIZED_STATS_COLUMNS = STATS_COLUMNS + ("mean_s", "std_s", "mean_t", "std_t")
MEAN_S, STD_S, MEAN_T, STD_T = range(N_STATS, len(STANDARDIZED_STATS_COLUMNS))
N_STANDARDIZED_STATS = len(STANDARDIZED_STATS_COLUMNS)


def n_stats(spec):
    """Columns of a call's kd_rows statistics: 9 when its spec standardises the logits, else 5."""
    return N_STANDARDIZED_STATS if spec.standardize else N_STATS

# Columns of the (N, 2) statistics of the hard-label cross-entropy rows.
CE_STATS_COLUMNS = ("max", "log_sum")
N_CE_STATS = len(CE_STATS_COLUMNS)

# Running maxima start finite: exp(m_old − m_new) of two -inf would be NaN on masked prefixes.
NEG_START = -1e30
