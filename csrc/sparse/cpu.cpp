// CPU kernels of the sparse_kd tail mode (fastkd/kernels/sparse/triton.py semantics): OpenMP over
// rows; inside a row the columns go in blocks of cpu::kBlock converted to scaled fp32, every element
// loop `omp simd` and written inside the FASTKD_ROW_CLONES row functions (docs/perf-notes.md,
// 2026-12-06 22:25: a helper called from a clone runs at the baseline ISA unless it is inlined).
// The support is marked by walking the row's sorted ids along with the blocks: k scalar writes per
// row into an L1 block, no (V,) mask.
//   forward: one read of the row (max and Σ exp of all columns and of those off the support);
//   backward: one read and one write. Extra memory: two blocks per thread.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "fastkd/common/cpu_rows.h"
#include "fastkd/common/dispatch.h"
#include "fastkd/sparse/sparse_rows.h"

namespace fastkd {
namespace {

using cpu::kBlock;
using cpu::LseState;
using cpu::row_pointer;
using cpu::storage_t;

// One row's statistics. Sums in double, as every CPU row kernel (common/cpu_rows.h).
template <DType D>
FASTKD_ROW_CLONES void tail_stats_row(const SparseTailArgs& args, int64_t row, float* stats) {
  alignas(64) float x[kBlock];
  alignas(64) float rest[kBlock];
  const storage_t<D>* s_row = row_pointer<D>(args.student, row);
  const int64_t stride = args.student.stride_col;
  const int32_t* ids = args.ids + row * args.top_k;
  const float inv_t = args.inv_temperature;
  LseState all, off;
  int64_t j = 0;
  for (int64_t col = 0; col < args.n_cols; col += kBlock) {
    const int64_t n = std::min(kBlock, args.n_cols - col);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] = Element<D>::to_float(s_row[(col + i) * stride]) * inv_t;
    float m_block = -INFINITY;
#pragma omp simd reduction(max : m_block)
    for (int64_t i = 0; i < n; ++i) {
      rest[i] = x[i];
      m_block = x[i] > m_block ? x[i] : m_block;
    }
    for (; j < args.top_k && ids[j] < col + n; ++j) rest[ids[j] - col] = -INFINITY;  // the support in this block
    float m_rest = -INFINITY;
#pragma omp simd reduction(max : m_rest)
    for (int64_t i = 0; i < n; ++i) m_rest = rest[i] > m_rest ? rest[i] : m_rest;
    all.rescale(max_f(all.m, m_block));
    off.rescale(max_f(off.m, m_rest));
    const float m_all = all.m, m_off = off.m;
    double z_all = 0.0, z_off = 0.0;
#pragma omp simd reduction(+ : z_all, z_off)
    for (int64_t i = 0; i < n; ++i) {
      z_all += kd_exp(x[i] - m_all);
      z_off += kd_exp(rest[i] - m_off);
    }
    all.z += z_all;
    off.z += z_off;
  }
  float* out = stats + row * kNumSparseStats;
  out[kSpMax] = all.m;
  out[kSpLogSum] = all.log_sum();
  out[kSpRestMax] = off.m;
  out[kSpRestLogSum] = off.log_sum();  // log 0 = -inf: nothing outside the support
}

template <DType D>
FASTKD_ROW_CLONES void tail_grad_row(const SparseTailArgs& args, int64_t row, const float* support_grads,
                                     const float* stats, const float* coefficients, int8_t mode, void* grad) {
  storage_t<D>* g_row = static_cast<storage_t<D>*>(grad) + row * args.n_cols;
  if (mode != kSpRowNormal) {  // ignored rows are never read: no NaN from their logits
    const float fill = mode == kSpRowNan ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
    std::fill(g_row, g_row + args.n_cols, Element<D>::from_float(fill));
    return;
  }
  alignas(64) float g[kBlock];
  const storage_t<D>* s_row = row_pointer<D>(args.student, row);
  const int64_t stride = args.student.stride_col;
  const int32_t* ids = args.ids + row * args.top_k;
  const float* sg = support_grads + row * args.top_k;
  const float inv_t = args.inv_temperature;
  const float row_max = stats[row * kNumSparseStats + kSpMax];
  const float log_sum = stats[row * kNumSparseStats + kSpLogSum];
  const float factor = coefficients[row * 3 + 0];
  const float shift = coefficients[row * 3 + 1];
  const float scale = coefficients[row * 3 + 2];
  int64_t j = 0;
  for (int64_t col = 0; col < args.n_cols; col += kBlock) {
    const int64_t n = std::min(kBlock, args.n_cols - col);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float x = Element<D>::to_float(s_row[(col + i) * stride]) * inv_t;
      const float log_q = (x - row_max) - log_sum;  // exact near the max, even for ±1e4 logits
      const float tail = (factor * kd_exp(log_q) - kd_exp(log_q + shift)) * scale;
      g[i] = x == -INFINITY ? 0.0f : tail;
    }
    // The support's columns: zeroed first, then every entry added, so repeated ids sum.
    int64_t stop = j;
    while (stop < args.top_k && ids[stop] < col + n) g[ids[stop++] - col] = 0.0f;
    for (; j < stop; ++j) g[ids[j] - col] += sg[j];
    storage_t<D>* o = g_row + col;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) o[i] = Element<D>::from_float(g[i]);
  }
}

}  // namespace

void sparse_tail_stats_cpu(const SparseTailArgs& args, const int8_t* active, float* stats, int n_threads) {
  check_sparse_tail_args(args);
  if (args.n_rows == 0) return;
  check_not_null(active, "active");
  check_not_null(stats, "stats");
  dispatch_dtype(args.student.dtype, [&](auto tag) {
    constexpr DType D = decltype(tag)::value;
    cpu::for_each_row(args.n_rows, n_threads, [&](int64_t row) {
      if (active[row] != 0) {
        tail_stats_row<D>(args, row, stats);
      } else {
        float* out = stats + row * kNumSparseStats;
        std::fill(out, out + kNumSparseStats, 0.0f);
      }
    });
  });
}

void sparse_tail_grad_cpu(const SparseTailArgs& args, const float* support_grads, const float* stats,
                          const float* coefficients, const int8_t* mode, void* grad, int n_threads) {
  check_sparse_tail_args(args);
  if (args.n_rows == 0) return;
  check_not_null(support_grads, "support_grads");
  check_not_null(stats, "stats");
  check_not_null(coefficients, "coefficients");
  check_not_null(mode, "mode");
  check_not_null(grad, "grad");
  dispatch_dtype(args.student.dtype, [&](auto tag) {
    constexpr DType D = decltype(tag)::value;
    cpu::for_each_row(args.n_rows, n_threads, [&](int64_t row) {
      tail_grad_row<D>(args, row, support_grads, stats, coefficients, mode[row], grad);
    });
  });
}

}  // namespace fastkd
