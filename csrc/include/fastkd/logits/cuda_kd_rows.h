// Building blocks of the CUDA kd_rows kernels of logits/cuda.cu and logits/dkd_cuda.cu (one thread
// block per row): the two rows of a block and how a thread walks its share of them, the stores of
// a gradient share, the row outputs, and the logit transforms (logits/transforms.h) applied to
// the packs as they are loaded. CUDA sources only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fastkd/common/cuda_rows.h"
#include "fastkd/logits/kd_rows.h"

namespace fastkd {
namespace kd_cuda {

using cuda::Pack;
using cuda::is_aligned;
using cuda::storage_t;
using cuda::unpack_scaled;

// Packs per tensor a thread loads before it uses any: the loads of one step are in flight
// together. Memory parallelism an SM needs (Little's law): bandwidth × latency / SMs =
// 3 TB/s × 1 µs / 132 ≈ 22 KiB (H100; more under load, when the latency grows). One 16-byte pack
// per tensor and thread (the kernels before) kept 512 threads × 16 B × 2 tensors = 16 KiB per
// block in flight, ~32 KiB per SM at two resident blocks: barely above the need, and below it
// whenever a warp is busy with its exps instead of loading. Four packs: 512 × 4 × 16 B × 2 =
// 64 KiB per block, so even one resident block keeps ≥ 64 KiB in flight per SM, two keep 128 KiB
// (with an fp32/16-bit pair the 16-bit row's packs are 8 bytes: 48 KiB per block). The raw packs
// cost 2 × 4 × 4 = 32 registers per thread.
constexpr int kUnroll = 4;

template <DType DS, DType DT>
constexpr int vec_width() {
  return cuda::vec_width<storage_t<DS>, storage_t<DT>>();
}

// The two rows of one block, and how they are read.
template <DType DS, DType DT>
struct RowPair {
  const storage_t<DS>* s;
  const storage_t<DT>* t;
  int64_t stride_s;
  int64_t stride_t;
  int64_t n_cols;
  bool vectorised;  // both contiguous and aligned to their pack size
};

template <DType DS, DType DT>
__device__ RowPair<DS, DT> row_pair(const RowsView& student, const RowsView& teacher, int64_t n_cols,
                                    int64_t row) {
  constexpr int VEC = vec_width<DS, DT>();
  RowPair<DS, DT> rows;
  rows.s = static_cast<const storage_t<DS>*>(student.data) + row_start(student, row);
  rows.t = static_cast<const storage_t<DT>*>(teacher.data) + row_start(teacher, row);
  rows.stride_s = student.stride_col;
  rows.stride_t = teacher.stride_col;
  rows.n_cols = n_cols;
  rows.vectorised = rows.stride_s == 1 && rows.stride_t == 1 && is_aligned<storage_t<DS>, VEC>(rows.s) &&
                    is_aligned<storage_t<DT>, VEC>(rows.t);
  return rows;
}

// Calls f(s, t, col, step, count) for this thread's share of the row: s[j], t[j] (scaled fp32)
// are columns col + j·step for j < count, and -inf beyond (they then add nothing).
template <DType DS, DType DT, class F>
__device__ __forceinline__ void for_each_pack(const RowPair<DS, DT>& rows, float scale, F&& f) {
  constexpr int VEC = vec_width<DS, DT>();
  using PackS = Pack<storage_t<DS>, VEC>;
  using PackT = Pack<storage_t<DT>, VEC>;
  float s[VEC];
  float t[VEC];
  if (rows.vectorised) {
    // Column offsets within a row fit int32 (row_launch checks V ≤ 2^30): fewer 64-bit registers.
    const int n_packs = static_cast<int>(rows.n_cols / VEC);
    const int stride = blockDim.x;
    const PackS* s_packs = reinterpret_cast<const PackS*>(rows.s);
    const PackT* t_packs = reinterpret_cast<const PackT*>(rows.t);
    int p = threadIdx.x;
    for (; p + (kUnroll - 1) * stride < n_packs; p += kUnroll * stride) {
      PackS raw_s[kUnroll];
      PackT raw_t[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // every load of the step before any use
        raw_s[u] = s_packs[p + u * stride];
        raw_t[u] = t_packs[p + u * stride];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        unpack_scaled<DS, VEC>(raw_s[u], scale, s);
        unpack_scaled<DT, VEC>(raw_t[u], scale, t);
        f(s, t, int64_t{p + u * stride} * VEC, int64_t{1}, VEC);
      }
    }
    for (; p < n_packs; p += stride) {  // fewer than kUnroll packs left for this thread
      unpack_scaled<DS, VEC>(s_packs[p], scale, s);
      unpack_scaled<DT, VEC>(t_packs[p], scale, t);
      f(s, t, int64_t{p} * VEC, int64_t{1}, VEC);
    }
    const int64_t col = int64_t{n_packs} * VEC + threadIdx.x;  // fewer than VEC columns remain
    if (col < rows.n_cols) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) s[j] = t[j] = -INFINITY;
      s[0] = Element<DS>::to_float(rows.s[col]) * scale;
      t[0] = Element<DT>::to_float(rows.t[col]) * scale;
      f(s, t, col, int64_t{1}, 1);
    }
    return;
  }
  const int64_t step = blockDim.x;
  for (int64_t base = 0; base < rows.n_cols; base += step * VEC) {
    const int64_t col = base + threadIdx.x;
    int count = 0;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t c = col + j * step;
      const bool valid = c < rows.n_cols;
      s[j] = valid ? Element<DS>::to_float(rows.s[c * rows.stride_s]) * scale : -INFINITY;
      t[j] = valid ? Element<DT>::to_float(rows.t[c * rows.stride_t]) * scale : -INFINITY;
      count += valid ? 1 : 0;
    }
    if (count > 0) f(s, t, col, step, count);
  }
}

__device__ __forceinline__ bool row_is_active(const KdRowsArgs& args, int64_t row) {
  return args.labels == nullptr || args.labels[row] != args.ignore_index;
}

// The forward's outputs of one row: its loss and the first kNumStats columns of its stats row of
// `width` columns (stats_width: kNumStats, or kNumStatsStandardized with standardize).
__device__ __forceinline__ void write_row_outputs(float* loss, float* stats, int64_t row, float row_loss,
                                                  float max_s, float log_sum_s, float max_t, float log_sum_t,
                                                  float aux, int64_t width = kNumStats) {
  loss[row] = row_loss;
  float* out = stats + row * width;
  out[kMaxS] = max_s;
  out[kLogSumS] = log_sum_s;
  out[kMaxT] = max_t;
  out[kLogSumT] = log_sum_t;
  out[kAux] = aux;
}


// Stores count values of a thread's share: one vector store when the pack is contiguous and
// aligned, else element by element.
template <DType D, int VEC>
__device__ __forceinline__ void store_share(storage_t<D>* __restrict__ row, const float (&g)[VEC], int64_t col,
                                            int64_t step, int count) {
  if (step == 1 && count == VEC && is_aligned<storage_t<D>, VEC>(row + col)) {
    Pack<storage_t<D>, VEC> pack;
#pragma unroll
    for (int j = 0; j < VEC; ++j) pack.v[j] = Element<D>::from_float(g[j]);
    *reinterpret_cast<Pack<storage_t<D>, VEC>*>(row + col) = pack;
    return;
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    if (j < count) row[col + j * step] = Element<D>::from_float(g[j]);
  }
}


// for_each_pack over the transformed logits: f(s, t, x, col, step, count) with s, t the two sides'
// logits after their transforms and / T (TR = false: x / T, as for_each_pack) and x the student's
// raw logits (TR only; the chain rule needs them). Padding (-inf) stays -inf through the transforms.
template <DType DS, DType DT, bool TR, class F>
__device__ __forceinline__ void for_each_transformed(const RowPair<DS, DT>& rows, float inv_t, const RowTransform& tr_s,
                                                     const RowTransform& tr_t, F&& f) {
  constexpr int VEC = vec_width<DS, DT>();
  if constexpr (TR) {
    for_each_pack(rows, 1.0f, [&](const float (&x)[VEC], const float (&y)[VEC], int64_t col, int64_t step, int count) {
      float s[VEC];
      float t[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        s[j] = apply_transform(x[j], tr_s);
        t[j] = apply_transform(y[j], tr_t);
      }
      f(s, t, x, col, step, count);
    });
  } else {
    for_each_pack(rows, inv_t, [&](const float (&s)[VEC], const float (&t)[VEC], int64_t col, int64_t step,
                                   int count) { f(s, t, s, col, step, count); });
  }
}

// Running count, mean and centred sum of squares (Welford per element, Chan's merge across
// threads): the standardisation's moments without E[y²] − E[y]²'s cancellation at ±1e4.
struct Moments {
  float count = 0.0f;
  float mean = 0.0f;
  float m2 = 0.0f;

  __device__ __forceinline__ void add(float y) {
    count += 1.0f;
    const float delta = y - mean;
    mean += delta / count;
    m2 += delta * (y - mean);
  }
  __device__ __forceinline__ void merge(const Moments& other) {
    const float total = count + other.count;
    if (total == 0.0f) return;
    const float delta = other.mean - mean;
    const float share = other.count / total;
    mean += delta * share;
    m2 += other.m2 + delta * delta * count * share;
    count = total;
  }
};

struct MomentsPair {
  Moments s;
  Moments t;
};

// The sides' transforms for the forward; under standardize the row's moments first (one pass,
// every thread of the block gets them through shared memory). mean_std: mean_s, std_s, mean_t, std_t.
template <DType DS, DType DT>
__device__ void forward_transforms(const RowPair<DS, DT>& rows, const LogitTransforms& all, float inv_t,
                                   RowTransform& tr_s, RowTransform& tr_t, float (&mean_std)[4]) {
  constexpr int VEC = vec_width<DS, DT>();
  mean_std[0] = mean_std[1] = mean_std[2] = mean_std[3] = 0.0f;
  if (!all.standardize) {
    tr_s = row_transform(all.student, 0.0f, inv_t);
    tr_t = row_transform(all.teacher, 0.0f, inv_t);
    return;
  }
  const RowTransform cap_s = row_transform(all.student, 0.0f, 1.0f);
  const RowTransform cap_t = row_transform(all.teacher, 0.0f, 1.0f);
  MomentsPair moments;
  for_each_pack(rows, 1.0f, [&](const float (&x)[VEC], const float (&y)[VEC], int64_t, int64_t, int count) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (j < count) {
        moments.s.add(scale_and_cap(x[j], cap_s));
        moments.t.add(scale_and_cap(y[j], cap_t));
      }
    }
  });
  moments = cuda::block_reduce(moments, MomentsPair{}, [](MomentsPair& into, const MomentsPair& other) {
    into.s.merge(other.s);
    into.t.merge(other.t);
  });
  __shared__ float shared[4];
  if (threadIdx.x == 0) {
    const float divisor = static_cast<float>(rows.n_cols > 1 ? rows.n_cols - 1 : 1);
    shared[0] = moments.s.mean;
    shared[1] = sqrtf(moments.s.m2 / divisor);
    shared[2] = moments.t.mean;
    shared[3] = sqrtf(moments.t.m2 / divisor);
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i) mean_std[i] = shared[i];
  tr_s = row_transform(all.student, mean_std[0], inv_t / (mean_std[1] + all.eps));
  tr_t = row_transform(all.teacher, mean_std[2], inv_t / (mean_std[3] + all.eps));
}

// The same from a row's saved stats (backward).
__device__ __forceinline__ void saved_transforms(const LogitTransforms& all, const float* row_stats, float inv_t,
                                                 RowTransform& tr_s, RowTransform& tr_t) {
  if (all.standardize) {
    tr_s = row_transform(all.student, row_stats[kMeanS], inv_t / (row_stats[kStdS] + all.eps));
    tr_t = row_transform(all.teacher, row_stats[kMeanT], inv_t / (row_stats[kStdT] + all.eps));
  } else {
    tr_s = row_transform(all.student, 0.0f, inv_t);
    tr_t = row_transform(all.teacher, 0.0f, inv_t);
  }
}

// Thread 0's write of a row's outputs, with the moments under standardize.
template <bool TR>
__device__ __forceinline__ void write_kd_row(const KdRowsArgs& args, float* loss, float* stats, int64_t row,
                                             float row_loss, float max_s, float log_sum_s, float max_t,
                                             float log_sum_t, float aux, const float (&mean_std)[4]) {
  if constexpr (TR) {
    write_row_outputs(loss, stats, row, row_loss, max_s, log_sum_s, max_t, log_sum_t, aux, stats_width(args));
    if (args.transforms.standardize) {
      float* out = stats + row * kNumStatsStandardized;
      out[kMeanS] = mean_std[0];
      out[kStdS] = mean_std[1];
      out[kMeanT] = mean_std[2];
      out[kStdT] = mean_std[3];
    }
  } else {
    write_row_outputs(loss, stats, row, row_loss, max_s, log_sum_s, max_t, log_sum_t, aux);
  }
}

}  // namespace kd_cuda
}  // namespace fastkd
