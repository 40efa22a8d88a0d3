// The cross-entropy family's side of the Python ↔ C++ contract: the columns of its (N, 2) per-row
// statistics (exported by fastkd._C.contract()["ce_stats_columns"]).
#pragma once

#include "fastkd/common/contract.h"

namespace fastkd {

// Max of the logit row and the log-sum-exp offset log Σ exp(x − max).
enum CeStatsColumn : int { kCeMax = 0, kCeLogSum = 1, kNumCeStats = 2 };

inline constexpr NamedCode kCeStatsColumns[] = {{"max", kCeMax}, {"log_sum", kCeLogSum}};
static_assert(sizeof(kCeStatsColumns) / sizeof(NamedCode) == kNumCeStats && is_column_table(kCeStatsColumns),
              "kCeStatsColumns must name each of the kNumCeStats columns once");

}  // namespace fastkd
