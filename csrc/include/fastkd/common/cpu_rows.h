// Building blocks of the CPU row kernels (host code only): rows in parallel over OpenMP threads;
// inside a row the columns go in blocks of kBlock, converted to fp32 into small buffers that stay
// in L1, and every element loop is an `omp simd` loop.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastkd/common/dtypes.h"
#include "fastkd/common/lse_state.h"
#include "fastkd/common/rows_view.h"
#include "fastkd/common/threads.h"

// On x86-64 with GCC ≥ 12 (x86-64-v3 clones) the per-row functions are also compiled for
// AVX2+FMA and chosen at load time (ifunc), so a wheel built for baseline x86-64 still runs 8
// lanes wide where it can.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && __GNUC__ >= 12
#define FASTKD_ROW_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTKD_ROW_CLONES
#endif

namespace fastkd {
namespace cpu {

// Columns per block: two fp32 blocks of 2 KiB each per row kernel stay in L1.
constexpr int64_t kBlock = 512;

// Sums run in double over fp32 terms: fp32 partial sums put ~1e-7 absolute error into log Σ exp,
// which is 1e-5 of a small divergence (nearly equal p and q); the exps dominate the time.
using LseState = LseStateT<double>;

template <DType D>
using storage_t = typename Element<D>::storage;

template <DType D>
const storage_t<D>* row_pointer(const RowsView& view, int64_t row) {
  return static_cast<const storage_t<D>*>(view.data) + row_start(view, row);
}

// buf[i] = row[(col + i)·stride] · scale for i < n, in fp32.
template <DType D>
inline void load_scaled(const storage_t<D>* row, int64_t col, int64_t n, int64_t stride, float scale, float* buf) {
  if (stride == 1) {
    const storage_t<D>* src = row + col;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = Element<D>::to_float(src[i]) * scale;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = Element<D>::to_float(row[(col + i) * stride]) * scale;
  }
}

inline float block_max(const float* x, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// Moves `state` to cover x[0, n) and adds Σ exp(x − m).
inline void lse_add_block(LseState& state, const float* x, int64_t n) {
  state.rescale(max_f(state.m, block_max(x, n)));
  const float m = state.m;
  double z = 0.0;
#pragma omp simd reduction(+ : z)
  for (int64_t i = 0; i < n; ++i) z += kd_exp(x[i] - m);
  state.z += z;
}

// body(row) for every row, rows split statically over the threads (common/threads.h), so the
// result of a row never depends on the thread count.
template <class Body>
void for_each_row(int64_t n_rows, int n_threads, Body body) {
  const int threads = resolve_threads(n_threads);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t row = 0; row < n_rows; ++row) body(row);
}

}  // namespace cpu
}  // namespace fastkd
