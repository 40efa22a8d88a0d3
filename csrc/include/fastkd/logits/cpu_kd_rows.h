// Shared by the kd_rows CPU kernels of logits/cpu.cpp and logits/dkd_cpu.cpp (host code only).
// Not the element loops: GCC does not inline a plain function into the x86-64-v3 clones of
// FASTKD_ROW_CLONES, so a loop moved here runs at baseline ISA (forward KL took 1.9× as long).
#pragma once

#include <cstdint>

#include "fastkd/common/cpu_rows.h"
#include "fastkd/logits/kd_rows.h"

namespace fastkd {
namespace cpu {

// The forward's outputs of one row: its loss and its first kNumStats saved statistics (rows of
// `width` columns: kNumStats, or kNumStatsStandardized with standardize).
inline void write_row_outputs(float* loss, float* stats, int64_t row, float row_loss, float max_s, float log_sum_s,
                              float max_t, float log_sum_t, float aux, int64_t width = kNumStats) {
  loss[row] = row_loss;
  float* out = stats + row * width;
  out[kMaxS] = max_s;
  out[kLogSumS] = log_sum_s;
  out[kMaxT] = max_t;
  out[kLogSumT] = log_sum_t;
  out[kAux] = aux;
}

// The standardised rows' extra columns: each side's mean and std.
inline void write_standardized_stats(float* stats, int64_t row, float mean_s, float std_s, float mean_t,
                                     float std_t) {
  float* out = stats + row * kNumStatsStandardized;
  out[kMeanS] = mean_s;
  out[kStdS] = std_s;
  out[kMeanT] = mean_t;
  out[kStdT] = std_t;
}

}  // namespace cpu
}  // namespace fastkd
