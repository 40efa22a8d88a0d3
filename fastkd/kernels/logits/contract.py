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
# With ``standardize`` the forward also saves each side's row mean and sample std of the capped
# logits (logit_transforms.py), so the backward re-standardises without another reduction pass.
STANDARDIZE_COLUMNS = ("mean_s", "std_s", "mean_t", "std_t")
MEAN_S, STD_S, MEAN_T, STD_T = range(N_STATS, N_STATS + len(STANDARDIZE_COLUMNS))


def stats_columns(spec):
    """The statistics columns the kd_rows forward of ``spec`` (a DivergenceSpec) saves."""
    return STATS_COLUMNS + (STANDARDIZE_COLUMNS if spec.standardize else ())


def stats_width(spec):
    return len(stats_columns(spec))


# The (N, 9) columns of a standardising call, as fastkd._C's contract lists them.
STANDARDIZED_STATS_COLUMNS = STATS_COLUMNS + STANDARDIZE_COLUMNS
N_STANDARDIZED_STATS = len(STANDARDIZED_STATS_COLUMNS)


# Columns of the (N, 2) statistics of the hard-label cross-entropy rows.
CE_STATS_COLUMNS = ("max", "log_sum")
N_CE_STATS = len(CE_STATS_COLUMNS)

# Running maxima start finite: exp(m_old − m_new) of two -inf would be NaN on masked prefixes.
NEG_START = -1e30
