// The logit transforms (logits/transforms.h) in the CPU kd_rows kernels of logits/cpu.cpp and
// logits/dkd_cpu.cpp: block loads that apply them, the standardisation's moments pass and the
// backward's chain rule. Every function here is always_inline: GCC does not inline a plain
// function into the x86-64-v3 clones of FASTKD_ROW_CLONES, and a loop left outside runs at
// baseline ISA (docs/perf-notes.md, 2026-12-06).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fastkd/common/cpu_rows.h"
#include "fastkd/logits/kd_rows.h"

#if defined(__GNUC__)
#define FASTKD_CPU_INLINE inline __attribute__((always_inline))
#else
#define FASTKD_CPU_INLINE inline
#endif

namespace fastkd {
namespace cpu {

// buf[i] = (cap(scale·x) − shift)·mul of x = row[(col + i)·stride], i < n, in fp32.
template <DType D>
FASTKD_CPU_INLINE void load_transformed(const storage_t<D>* row, int64_t col, int64_t n, int64_t stride,
                                        const RowTransform& tr, float* buf) {
  if (tr.softcap > 0.0f) {  // two loops: the plain scale stays free of the tanh
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = apply_transform(Element<D>::to_float(row[(col + i) * stride]), tr);
  } else {
    // (x·scale − shift)·mul, not x·(scale·mul) − shift·mul: a row near ±1e4 with a small std
    // would lose its digits to the cancellation of two large products.
    const float scale = tr.scale, shift = tr.shift, mul = tr.mul;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = (Element<D>::to_float(row[(col + i) * stride]) * scale - shift) * mul;
  }
}

// The block a kernel works on: x / T (TR = false: the plain path, unchanged) or the transformed logits / T.
template <DType D, bool TR>
FASTKD_CPU_INLINE void load_side(const storage_t<D>* row, int64_t col, int64_t n, int64_t stride, float inv_t,
                                 const RowTransform& tr, float* buf) {
  if constexpr (TR) {
    load_transformed<D>(row, col, n, stride, tr, buf);
  } else {
    load_scaled<D>(row, col, n, stride, inv_t, buf);
  }
}

// buf[i] = d cap(scale·x)/dx at the block's x.
template <DType D>
FASTKD_CPU_INLINE void load_derivative(const storage_t<D>* row, int64_t col, int64_t n, int64_t stride,
                                       const RowTransform& tr, float* buf) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) buf[i] = scale_and_cap_derivative(Element<D>::to_float(row[(col + i) * stride]), tr);
}

// Mean and sample std (divisor V − 1; 0 for V = 1) of cap(scale·x) over a row: per block its
// mean and centred sum of squares (two passes over the block, in L1), merged across blocks by
// Chan's formula in double, so rows far from 0 (±1e4) lose nothing to E[y²] − E[y]².
template <DType D>
FASTKD_CPU_INLINE void row_moments(const storage_t<D>* row, int64_t n_cols, int64_t stride, const SideTransform& side,
                                   float* buf, float& mean_out, float& std_out) {
  const RowTransform tr = row_transform(side, 0.0f, 1.0f);
  double count = 0.0, mean = 0.0, m2 = 0.0;
  for (int64_t col = 0; col < n_cols; col += kBlock) {
    const int64_t n = std::min(kBlock, n_cols - col);
    load_transformed<D>(row, col, n, stride, tr, buf);
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += buf[i];
    const double block_mean = sum / static_cast<double>(n);
    double block_m2 = 0.0;
#pragma omp simd reduction(+ : block_m2)
    for (int64_t i = 0; i < n; ++i) {
      const double d = buf[i] - block_mean;
      block_m2 += d * d;
    }
    const double total = count + static_cast<double>(n);
    const double delta = block_mean - mean;
    mean += delta * static_cast<double>(n) / total;
    m2 += block_m2 + delta * delta * count * static_cast<double>(n) / total;
    count = total;
  }
  mean_out = static_cast<float>(mean);
  std_out = static_cast<float>(std::sqrt(m2 / static_cast<double>(std::max<int64_t>(n_cols - 1, 1))));
}

// A side's per-element map for the forward: its moments first under standardize (buf: scratch).
template <DType D>
FASTKD_CPU_INLINE RowTransform forward_transform(const LogitTransforms& all, const SideTransform& side,
                                                 const storage_t<D>* row, int64_t n_cols, int64_t stride, float inv_t,
                                                 float* buf, float& mean, float& std) {
  mean = 0.0f;
  std = 0.0f;
  if (!all.standardize) return row_transform(side, 0.0f, inv_t);
  row_moments<D>(row, n_cols, stride, side, buf, mean, std);
  return row_transform(side, mean, inv_t / (std + all.eps));
}

// The same from the saved mean and std (backward).
FASTKD_CPU_INLINE RowTransform saved_transform(const LogitTransforms& all, const SideTransform& side, float mean,
                                               float std, float inv_t) {
  return all.standardize ? row_transform(side, mean, inv_t / (std + all.eps)) : row_transform(side, 0.0f, inv_t);
}

// The backward's last pass under standardize: grad[j] = standardize_chain(G_j, z_j)·dy/dx, G the
// row's ∂L/∂z (scratch, fp32), z re-derived from x with the saved mean and std.
template <DType D>
FASTKD_CPU_INLINE void write_standardized_grad(const storage_t<D>* s_row, int64_t n_cols, int64_t stride,
                                               RowTransform tr, const StandardizeGrad& k, const float* g_z,
                                               storage_t<D>* g_row) {
  alignas(64) float z[kBlock];
  alignas(64) float d[kBlock];
  tr.mul = k.r;  // z, not z / T
  for (int64_t col = 0; col < n_cols; col += kBlock) {
    const int64_t n = std::min(kBlock, n_cols - col);
    load_transformed<D>(s_row, col, n, stride, tr, z);
    load_derivative<D>(s_row, col, n, stride, tr, d);
    const float* g = g_z + col;
    storage_t<D>* out = g_row + col;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = Element<D>::from_float(standardize_chain(g[i], z[i], k) * d[i]);
  }
}

// A thread's fp32 row of ∂L/∂z for the standardised backward: O(threads·V), never O(N·V).
inline float* row_scratch(int64_t n_cols) {
  thread_local std::vector<float> scratch;
  if (static_cast<int64_t>(scratch.size()) < n_cols) scratch.resize(static_cast<size_t>(n_cols));
  return scratch.data();
}

}  // namespace cpu
}  // namespace fastkd
