// Entry points of the sparse_kd family's tail mode (divergence against a top-k teacher plus one
// bucket for the rest of the vocabulary): the two passes over the student's (N, V) logits, with
// the semantics of fastkd/kernels/sparse/triton.py. CPU only: csrc/sparse/cpu.cpp; bound in
// csrc/bindings/sparse.cpp for fastkd/kernels/sparse/native.py. The (N, k) bucket math around
// them is the Python side's (fastkd/kernels/sparse/buckets.py).
#pragma once

#include <cstdint>

#include "fastkd/common/contract.h"
#include "fastkd/common/errors.h"
#include "fastkd/common/rows_view.h"

namespace fastkd {

// Sorted ids of absent entries: past every column, so no block's walk reaches them.
constexpr int32_t kSparseIdSentinel = 2147483647;

// Columns of the (N, 4) fp32 statistics: max and log Σ exp(s − max) of the scaled row s, and the
// same over the columns off the support (log 0 = -inf when nothing is outside it).
enum SparseStatsColumn : int { kSpMax = 0, kSpLogSum = 1, kSpRestMax = 2, kSpRestLogSum = 3, kNumSparseStats = 4 };

inline constexpr NamedCode kSparseStatsColumns[] = {
    {"max", kSpMax}, {"log_sum", kSpLogSum}, {"rest_max", kSpRestMax}, {"rest_log_sum", kSpRestLogSum}};
static_assert(sizeof(kSparseStatsColumns) / sizeof(NamedCode) == kNumSparseStats &&
                  is_column_table(kSparseStatsColumns),
              "kSparseStatsColumns must name each of the kNumSparseStats columns once");

// Gradient rows (the mode byte per row): normal, all zeros (ignored), all NaN (a bad id).
enum SparseRowMode : int8_t { kSpRowNormal = 0, kSpRowZero = 1, kSpRowNan = 2 };

inline constexpr NamedCode kSparseRowModes[] = {{"normal", kSpRowNormal}, {"zero", kSpRowZero}, {"nan", kSpRowNan}};

// student: (N, V) fp32|fp16|bf16 rows (any RowsView layout); ids: (N, k) int32, each row sorted
// ascending, kSparseIdSentinel at absent entries, present ids in [0, V); active: (N,) int8, rows
// that count (the forward reads nothing of the others).
struct SparseTailArgs {
  int64_t n_rows;
  int64_t n_cols;
  int64_t top_k;
  RowsView student;
  const int32_t* ids;
  float inv_temperature;
};

// Forward: stats (N, 4) fp32 (SparseStatsColumn) of s = student · inv_temperature; inactive rows
// are not read (their statistics are meaningless).
// Backward: grad (N, V) contiguous in the student's dtype: at the sorted ids' columns the sum of
// their support_grads (N, k) fp32 (repeated ids add up); elsewhere
// scale·(factor·q_i − exp(log q_i + shift)), q from the statistics, coefficients (N, 3) fp32 =
// (factor, shift, scale), 0 where q_i = 0; mode (N,) int8 (SparseRowMode) overrides whole rows.
void sparse_tail_stats_cpu(const SparseTailArgs& args, const int8_t* active, float* stats, int n_threads);
void sparse_tail_grad_cpu(const SparseTailArgs& args, const float* support_grads, const float* stats,
                          const float* coefficients, const int8_t* mode, void* grad, int n_threads);

inline void check_sparse_tail_args(const SparseTailArgs& args) {
  if (args.n_rows < 0 || args.n_cols < 1 || args.top_k < 1) {
    throw_invalid("n_rows/n_cols/top_k", " must be >= 0, >= 1 and >= 1");
  }
  if (args.n_rows == 0) return;
  check_not_null(args.student.data, "student");
  check_not_null(args.ids, "ids");
}

}  // namespace fastkd
