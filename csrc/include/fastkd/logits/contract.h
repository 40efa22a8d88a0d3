// The logits family's side of the Python ↔ C++ contract: divergence codes and the columns of the
// (N, 5) per-row statistics (N, 9 with standardize). Python's side: fastkd/backends/native.py (checked at import by
// check_contract against fastkd._C.contract(), which exports the tables below).
#pragma once

#include "fastkd/common/contract.h"

namespace fastkd {

enum Divergence : int {
  kForwardKl = 0,
  kReverseKl = 1,
  kJsd = 2,
  kSkewForwardKl = 3,
  kSkewReverseKl = 4,
  kTvd = 5,
};

inline constexpr NamedCode kDivergenceCodes[] = {
    {"forward_kl", kForwardKl},         {"reverse_kl", kReverseKl},           {"jsd", kJsd},
    {"skew_forward_kl", kSkewForwardKl}, {"skew_reverse_kl", kSkewReverseKl}, {"tvd", kTvd},
};

// Columns of the (N, 5) fp32 per-row statistics: max and log-sum-exp offset of student / T and of
// teacher / T, and the gradient constant aux (divergences.row_loss_and_aux).
enum StatsColumn : int { kMaxS = 0, kLogSumS = 1, kMaxT = 2, kLogSumT = 3, kAux = 4, kNumStats = 5 };

inline constexpr NamedCode kStatsColumns[] = {
    {"max_s", kMaxS}, {"log_sum_s", kLogSumS}, {"max_t", kMaxT}, {"log_sum_t", kLogSumT}, {"aux", kAux},
};
static_assert(sizeof(kStatsColumns) / sizeof(NamedCode) == kNumStats && is_column_table(kStatsColumns),
              "kStatsColumns must name each of the kNumStats columns once");

// With standardize the rows are (N, 9): the five above, then the mean and sample std of each side's
// scaled and soft-capped logits (logit_transforms.py), which the backward needs to redo z.
enum StandardizedStatsColumn : int { kMeanS = 5, kStdS = 6, kMeanT = 7, kStdT = 8, kNumStatsStandardized = 9 };

inline constexpr NamedCode kStandardizedStatsColumns[] = {
    {"max_s", kMaxS},   {"log_sum_s", kLogSumS}, {"max_t", kMaxT}, {"log_sum_t", kLogSumT}, {"aux", kAux},
    {"mean_s", kMeanS}, {"std_s", kStdS},        {"mean_t", kMeanT}, {"std_t", kStdT},
};
static_assert(sizeof(kStandardizedStatsColumns) / sizeof(NamedCode) == kNumStatsStandardized &&
                  is_column_table(kStandardizedStatsColumns),
              "kStandardizedStatsColumns must name each of the kNumStatsStandardized columns once");

}  // namespace fastkd
