// CPU kernels of the cross-entropy family (hard-label rows at temperature 1, the semantics of
// fastkd/backends/triton/cross_entropy.py): OpenMP over rows; inside a row the columns go in
// blocks of cpu::kBlock converted to fp32 (common/cpu_rows.h), every element loop `omp simd`.
//   forward: one pass (streamed max and Σ exp, summed in double), then the label's logit;
//   backward: one pass adding into the caller's gradient block. Extra memory: one block per thread.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "fastkd/common/cpu_rows.h"
#include "fastkd/common/dispatch.h"
#include "fastkd/cross_entropy/ce_rows.h"

namespace fastkd {
namespace {

using cpu::kBlock;
using cpu::LseState;
using cpu::load_scaled;
using cpu::lse_add_block;
using cpu::row_pointer;
using cpu::storage_t;

bool label_in_range(int64_t label, int64_t n_cols) { return label >= 0 && label < n_cols; }

void write_ce_row(float* loss, float* stats, int64_t row, float row_loss, float row_max, float log_sum) {
  loss[row] = row_loss;
  stats[row * kNumCeStats + kCeMax] = row_max;
  stats[row * kNumCeStats + kCeLogSum] = log_sum;
}

// logits row: (V,) contiguous. An active row only.
template <DType D>
FASTKD_ROW_CLONES void ce_forward_row(const CeRowsArgs& args, int64_t row, int64_t label, float* loss,
                                      float* stats) {
  alignas(64) float x[kBlock];
  const storage_t<D>* x_row = row_pointer<D>(args.logits, row);
  LseState lse;
  for (int64_t col = 0; col < args.n_cols; col += kBlock) {
    const int64_t n = std::min(kBlock, args.n_cols - col);
    load_scaled<D>(x_row, col, n, 1, 1.0f, x);
    lse_add_block(lse, x, n);
  }
  const float log_sum = lse.log_sum();
  const float row_loss = label_in_range(label, args.n_cols)
                             ? (lse.m - Element<D>::to_float(x_row[label])) + log_sum
                             : std::numeric_limits<float>::quiet_NaN();
  write_ce_row(loss, stats, row, row_loss, lse.m, log_sum);
}

// logits row: (V,) contiguous; out row: (V,) contiguous, updated in place. An active row only.
template <DType DX, DType DO>
FASTKD_ROW_CLONES void ce_backward_row(const CeRowsArgs& args, int64_t row, int64_t label, const float* grad_loss,
                                       const float* stats, const GradRows& out) {
  storage_t<DO>* o_row = static_cast<storage_t<DO>*>(out.data) + row * out.stride_row;
  if (!label_in_range(label, args.n_cols)) {  // the forward's loss is NaN: so is every gradient entry
    const storage_t<DO> nan = Element<DO>::from_float(std::numeric_limits<float>::quiet_NaN());
    std::fill(o_row, o_row + args.n_cols, nan);
    return;
  }
  alignas(64) float x[kBlock];
  const storage_t<DX>* x_row = row_pointer<DX>(args.logits, row);
  const float row_max = stats[row * kNumCeStats + kCeMax];
  const float log_sum = stats[row * kNumCeStats + kCeLogSum];
  const float scale = grad_loss[row];
  for (int64_t col = 0; col < args.n_cols; col += kBlock) {
    const int64_t n = std::min(kBlock, args.n_cols - col);
    load_scaled<DX>(x_row, col, n, 1, 1.0f, x);
    storage_t<DO>* o = o_row + col;
    const int64_t label_in_block = label - col;  // compared with i: the one-hot column, if in this block
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float g = kd_exp((x[i] - row_max) - log_sum) - (i == label_in_block ? 1.0f : 0.0f);
      o[i] = Element<DO>::from_float(Element<DO>::to_float(o[i]) + scale * g);  // one rounding, as Triton
    }
  }
}

}  // namespace

void ce_rows_forward_cpu(const CeRowsArgs& args, float* loss, float* stats, int n_threads) {
  check_ce_rows_args(args);
  if (args.n_rows == 0) return;
  check_not_null(loss, "loss");
  check_not_null(stats, "stats");
  dispatch_dtype(args.logits.dtype, [&](auto x_tag) {
    constexpr DType DX = decltype(x_tag)::value;
    cpu::for_each_row(args.n_rows, n_threads, [&](int64_t row) {
      const int64_t label = args.labels[row];
      if (label == args.ignore_index) {
        write_ce_row(loss, stats, row, 0.0f, 0.0f, 0.0f);
      } else {
        ce_forward_row<DX>(args, row, label, loss, stats);
      }
    });
  });
}

void ce_rows_backward_cpu(const CeRowsArgs& args, const float* grad_loss, const float* stats, const GradRows& out,
                          int n_threads) {
  check_ce_rows_args(args);
  if (args.n_rows == 0) return;
  check_not_null(grad_loss, "grad_loss");
  check_not_null(stats, "stats");
  check_grad_rows(out);
  dispatch_dtype(args.logits.dtype, [&](auto x_tag) {
    dispatch_dtype(out.dtype, [&](auto o_tag) {
      constexpr DType DX = decltype(x_tag)::value;
      constexpr DType DO = decltype(o_tag)::value;
      cpu::for_each_row(args.n_rows, n_threads, [&](int64_t row) {
        const int64_t label = args.labels[row];
        if (label != args.ignore_index) ce_backward_row<DX, DO>(args, row, label, grad_loss, stats, out);
      });
    });
  });
}

}  // namespace fastkd
