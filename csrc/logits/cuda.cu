// CUDA kernels of the logits family (kd_rows, kl_div_rows), mirroring the Triton kernels of
// fastkd/backends/triton/logits.py with the shared math of logits/divergence_math.h. One thread
// block per row; each thread keeps fp32 partial state and the block merges the states (warp
// shuffles, then one warp over shared memory). A thread reads its share of the row kUnroll packs
// per tensor at a time: one 16-byte load of the wider input dtype per pack when both rows are
// contiguous and aligned, else VEC coalesced scalar loads.
//   forward_kl / reverse_kl: one pass (ShiftedKlStateT), jsd / skew_* / tvd: two passes,
//   backward: one pass writing ∂L/∂student in the student's dtype. No host synchronisation.
#include <cuda_runtime.h>

#include <cstdint>

#include "fastkd/common/cuda_check.h"
#include "fastkd/common/cuda_rows.h"
#include "fastkd/common/dispatch.h"
#include "fastkd/logits/kd_rows.h"

namespace fastkd {
namespace {

using cuda::FloatPair;
using cuda::Pack;
using cuda::add_pair;
using cuda::block_reduce;
using cuda::is_aligned;
using cuda::kMaxThreads;
using cuda::load_pack;
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

// Resident blocks per SM a kernel is compiled for (cuda::kResidentBlocks: two, ≤ 64 registers).
// The per-element math of jsd and skew_* does not fit in 64 registers next to four packs in flight
// (ptxas spills): those kernels are compiled for one block (up to 128 registers), which still
// keeps 64 KiB in flight.
constexpr int min_resident_blocks(int divergence) {
  return divergence == kJsd || divergence == kSkewForwardKl || divergence == kSkewReverseKl ? 1
                                                                                             : cuda::kResidentBlocks;
}

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

__device__ void write_row_outputs(float* loss, float* stats, int64_t row, float row_loss, float max_s,
                                  float log_sum_s, float max_t, float log_sum_t, float aux) {
  loss[row] = row_loss;
  float* out = stats + row * kNumStats;
  out[kMaxS] = max_s;
  out[kLogSumS] = log_sum_s;
  out[kMaxT] = max_t;
  out[kLogSumT] = log_sum_t;
  out[kAux] = aux;
}

// ------------------------------------------------------------------------------------------
// Kernels. Grid: one block per row (N blocks). student, teacher: (N, V) or (B, T, V) strided
// (RowsView); loss: (N,) fp32; stats: (N, 5) fp32; grad: (N, V) contiguous, student dtype.
// ------------------------------------------------------------------------------------------

// forward_kl (REVERSE = false: the teacher weights the sum) or reverse_kl, one pass.
template <DType DS, DType DT, bool REVERSE>
__global__ void __launch_bounds__(kMaxThreads, cuda::kResidentBlocks)
    kl_forward_kernel(KdRowsArgs args, float* __restrict__ loss, float* __restrict__ stats) {
  constexpr int VEC = vec_width<DS, DT>();
  const int64_t row = blockIdx.x;
  if (!row_is_active(args, row)) {  // uniform over the block
    if (threadIdx.x == 0) write_row_outputs(loss, stats, row, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f);
    return;
  }
  ShiftedKlStateT<float> state;
  for_each_pack(row_pair<DS, DT>(args.student, args.teacher, args.n_cols, row), args.divergence.inv_temperature,
                [&](const float (&s)[VEC], const float (&t)[VEC], int64_t, int64_t, int) {
                  const float* a = REVERSE ? s : t;
                  const float* b = REVERSE ? t : s;
                  float m_a = state.a.m, m_b = state.b.m;
#pragma unroll
                  for (int j = 0; j < VEC; ++j) {
                    m_a = max_f(m_a, a[j]);
                    m_b = max_f(m_b, b[j]);
                  }
                  if (m_a != state.a.m || m_b != state.b.m) state.rescale(m_a, m_b);  // rare after the start
#pragma unroll
                  for (int j = 0; j < VEC; ++j) {
                    float w, e_b, term;
                    kl_element_terms(a[j], b[j], m_a, m_b, w, e_b, term);
                    state.a.z += w;
                    state.b.z += e_b;
                    state.acc += term;
                  }
                });
  state = block_reduce(state, ShiftedKlStateT<float>{},
                       [](ShiftedKlStateT<float>& into, const ShiftedKlStateT<float>& other) { into.merge(other); });
  if (threadIdx.x == 0) {
    const float row_loss = state.loss();
    // aux as in divergences.row_loss_and_aux: 0 for forward KL, the loss for reverse KL.
    if (REVERSE) {
      write_row_outputs(loss, stats, row, row_loss, state.a.m, state.a.log_sum(), state.b.m, state.b.log_sum(),
                        row_loss);
    } else {
      write_row_outputs(loss, stats, row, row_loss, state.b.m, state.b.log_sum(), state.a.m, state.a.log_sum(),
                        0.0f);
    }
  }
}

struct LsePair {
  LseStateT<float> s;
  LseStateT<float> t;
};

// jsd, skew_forward_kl, skew_reverse_kl, tvd: normalisers first, then the terms needing p and q.
template <DType DS, DType DT, int DIV>
__global__ void __launch_bounds__(kMaxThreads, min_resident_blocks(DIV))
    two_pass_forward_kernel(KdRowsArgs args, float* __restrict__ loss, float* __restrict__ stats) {
  constexpr int VEC = vec_width<DS, DT>();
  const int64_t row = blockIdx.x;
  if (!row_is_active(args, row)) {
    if (threadIdx.x == 0) write_row_outputs(loss, stats, row, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f);
    return;
  }
  const RowPair<DS, DT> rows = row_pair<DS, DT>(args.student, args.teacher, args.n_cols, row);
  const DivergenceParams k = args.divergence;
  LsePair lse;
  for_each_pack(rows, k.inv_temperature, [&](const float (&s)[VEC], const float (&t)[VEC], int64_t, int64_t, int) {
    float m_s = lse.s.m, m_t = lse.t.m;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      m_s = max_f(m_s, s[j]);
      m_t = max_f(m_t, t[j]);
    }
    if (m_s != lse.s.m) lse.s.rescale(m_s);
    if (m_t != lse.t.m) lse.t.rescale(m_t);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      lse.s.z += kd_exp(s[j] - m_s);
      lse.t.z += kd_exp(t[j] - m_t);
    }
  });
  lse = block_reduce(lse, LsePair{}, [](LsePair& into, const LsePair& other) {
    into.s.merge(other.s);
    into.t.merge(other.t);
  });
  __shared__ float row_stats[4];
  if (threadIdx.x == 0) {
    row_stats[0] = lse.s.m;
    row_stats[1] = lse.s.log_sum();
    row_stats[2] = lse.t.m;
    row_stats[3] = lse.t.log_sum();
  }
  __syncthreads();
  const float m_s = row_stats[0], log_sum_s = row_stats[1];
  const float m_t = row_stats[2], log_sum_t = row_stats[3];

  FloatPair sums{0.0f, 0.0f};  // loss, aux
  for_each_pack(rows, k.inv_temperature, [&](const float (&s)[VEC], const float (&t)[VEC], int64_t, int64_t, int) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float loss_term, aux_term;
      two_pass_terms<DIV>(log_prob(s[j], m_s, log_sum_s), log_prob(t[j], m_t, log_sum_t), k, loss_term, aux_term);
      sums.first += loss_term;
      sums.second += aux_term;
    }
  });
  sums = block_reduce(sums, FloatPair{0.0f, 0.0f}, add_pair);
  if (threadIdx.x == 0) write_row_outputs(loss, stats, row, sums.first, m_s, log_sum_s, m_t, log_sum_t, sums.second);
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

template <DType DS, DType DT, int DIV>
__global__ void __launch_bounds__(kMaxThreads, min_resident_blocks(DIV))
    backward_kernel(KdRowsArgs args, const float* __restrict__ grad_loss, const float* __restrict__ stats,
                    storage_t<DS>* __restrict__ grad) {
  constexpr int VEC = vec_width<DS, DT>();
  const int64_t row = blockIdx.x;
  storage_t<DS>* g_row = grad + row * args.n_cols;
  if (!row_is_active(args, row)) {
    for (int64_t col = threadIdx.x; col < args.n_cols; col += blockDim.x) g_row[col] = Element<DS>::from_float(0.0f);
    return;
  }
  const DivergenceParams k = args.divergence;
  const float* row_stats = stats + row * kNumStats;
  const float m_s = row_stats[kMaxS], log_sum_s = row_stats[kLogSumS];
  const float m_t = row_stats[kMaxT], log_sum_t = row_stats[kLogSumT];
  const float aux = row_stats[kAux];
  // ∂L/∂student = ∂L/∂s / T, times the upstream gradient of this row's loss.
  const float scale = grad_loss[row] * k.inv_temperature;
  for_each_pack(row_pair<DS, DT>(args.student, args.teacher, args.n_cols, row), k.inv_temperature,
                [&](const float (&s)[VEC], const float (&t)[VEC], int64_t col, int64_t step, int count) {
                  float g[VEC];
#pragma unroll
                  for (int j = 0; j < VEC; ++j) {
                    g[j] = grad_scaled_student<DIV>(log_prob(s[j], m_s, log_sum_s), log_prob(t[j], m_t, log_sum_t),
                                                    aux, k) *
                           scale;
                  }
                  store_share<DS, VEC>(g_row, g, col, step, count);
                });
}

// kl_div_rows. Grid: one block per row. input, target: (N, V) or (B, T, V) strided (RowsView);
// out: (N,) fp32; grad: (N, V) contiguous, input dtype.
template <DType DI, DType DT>
__global__ void __launch_bounds__(kMaxThreads, cuda::kResidentBlocks) kl_div_forward_kernel(KlDivRowsArgs args, float* __restrict__ out) {
  constexpr int VEC = vec_width<DI, DT>();
  const int64_t row = blockIdx.x;
  const bool log_target = args.log_target;
  FloatPair total{0.0f, 0.0f};
  for_each_pack(row_pair<DI, DT>(args.input, args.target, args.n_cols, row), 1.0f,
                [&](const float (&x)[VEC], const float (&y)[VEC], int64_t, int64_t, int count) {
#pragma unroll
                  for (int j = 0; j < VEC; ++j) {
                    if (j < count) total.first += kl_div_term(x[j], y[j], log_target);
                  }
                });
  total = block_reduce(total, FloatPair{0.0f, 0.0f}, add_pair);
  if (threadIdx.x == 0) out[row] = total.first;
}

template <DType DI, DType DT>
__global__ void __launch_bounds__(kMaxThreads, cuda::kResidentBlocks)
    kl_div_backward_kernel(KlDivRowsArgs args, const float* __restrict__ grad_rows, storage_t<DI>* __restrict__ grad) {
  constexpr int VEC = vec_width<DI, DT>();
  const int64_t row = blockIdx.x;
  const bool log_target = args.log_target;
  const float scale = -grad_rows[row];
  storage_t<DI>* g_row = grad + row * args.n_cols;
  for_each_pack(row_pair<DI, DT>(args.input, args.target, args.n_cols, row), 1.0f,
                [&](const float (&)[VEC], const float (&y)[VEC], int64_t col, int64_t step, int count) {
                  float g[VEC];
#pragma unroll
                  for (int j = 0; j < VEC; ++j) g[j] = kl_div_target_prob(y[j], log_target) * scale;
                  store_share<DI, VEC>(g_row, g, col, step, count);
                });
}

// ------------------------------------------------------------------------------------------
// Launchers.
// ------------------------------------------------------------------------------------------

cuda::RowLaunch launch_shape(int64_t n_rows, int64_t n_cols, const RowsView& a, const RowsView& b,
                             uintptr_t stream) {
  return cuda::row_launch(n_rows, n_cols, cuda::pack_width(a.dtype, b.dtype), kUnroll, stream);
}

}  // namespace

void kd_rows_forward_cuda(const KdRowsArgs& args, float* loss, float* stats, int device, uintptr_t stream) {
  check_kd_rows_args(args);
  if (args.n_rows == 0) return;
  check_not_null(loss, "loss");
  check_not_null(stats, "stats");
  const cuda::RowLaunch cfg = launch_shape(args.n_rows, args.n_cols, args.student, args.teacher, stream);
  DeviceGuard guard(device);
  dispatch_dtype(args.student.dtype, [&](auto s_tag) {
    dispatch_dtype(args.teacher.dtype, [&](auto t_tag) {
      dispatch_divergence(args.divergence.code, [&](auto div_tag) {
        constexpr DType DS = decltype(s_tag)::value;
        constexpr DType DT = decltype(t_tag)::value;
        constexpr int DIV = decltype(div_tag)::value;
        if constexpr (DIV == kForwardKl || DIV == kReverseKl) {
          kl_forward_kernel<DS, DT, DIV == kReverseKl><<<cfg.grid, cfg.block, 0, cfg.stream>>>(args, loss, stats);
        } else {
          two_pass_forward_kernel<DS, DT, DIV><<<cfg.grid, cfg.block, 0, cfg.stream>>>(args, loss, stats);
        }
      });
    });
  });
  cuda::check_launch("the kd_rows forward kernel launch");
}

void kd_rows_backward_cuda(const KdRowsArgs& args, const float* grad_loss, const float* stats, void* grad,
                           int device, uintptr_t stream) {
  check_kd_rows_args(args);
  if (args.n_rows == 0) return;
  check_not_null(grad_loss, "grad_loss");
  check_not_null(stats, "stats");
  check_not_null(grad, "grad");
  const cuda::RowLaunch cfg = launch_shape(args.n_rows, args.n_cols, args.student, args.teacher, stream);
  DeviceGuard guard(device);
  dispatch_dtype(args.student.dtype, [&](auto s_tag) {
    dispatch_dtype(args.teacher.dtype, [&](auto t_tag) {
      dispatch_divergence(args.divergence.code, [&](auto div_tag) {
        constexpr DType DS = decltype(s_tag)::value;
        constexpr DType DT = decltype(t_tag)::value;
        constexpr int DIV = decltype(div_tag)::value;
        backward_kernel<DS, DT, DIV><<<cfg.grid, cfg.block, 0, cfg.stream>>>(
            args, grad_loss, stats, static_cast<storage_t<DS>*>(grad));
      });
    });
  });
  cuda::check_launch("the kd_rows backward kernel launch");
}

void kl_div_rows_forward_cuda(const KlDivRowsArgs& args, float* out, int device, uintptr_t stream) {
  check_kl_div_rows_args(args);
  if (args.n_rows == 0) return;
  check_not_null(out, "out");
  const cuda::RowLaunch cfg = launch_shape(args.n_rows, args.n_cols, args.input, args.target, stream);
  DeviceGuard guard(device);
  dispatch_dtype(args.input.dtype, [&](auto i_tag) {
    dispatch_dtype(args.target.dtype, [&](auto t_tag) {
      constexpr DType DI = decltype(i_tag)::value;
      constexpr DType DT = decltype(t_tag)::value;
      kl_div_forward_kernel<DI, DT><<<cfg.grid, cfg.block, 0, cfg.stream>>>(args, out);
    });
  });
  cuda::check_launch("the kl_div_rows forward kernel launch");
}

void kl_div_rows_backward_cuda(const KlDivRowsArgs& args, const float* grad_rows, void* grad, int device,
                               uintptr_t stream) {
  check_kl_div_rows_args(args);
  if (args.n_rows == 0) return;
  check_not_null(grad_rows, "grad_rows");
  check_not_null(grad, "grad");
  const cuda::RowLaunch cfg = launch_shape(args.n_rows, args.n_cols, args.input, args.target, stream);
  DeviceGuard guard(device);
  dispatch_dtype(args.input.dtype, [&](auto i_tag) {
    dispatch_dtype(args.target.dtype, [&](auto t_tag) {
      constexpr DType DI = decltype(i_tag)::value;
      constexpr DType DT = decltype(t_tag)::value;
      kl_div_backward_kernel<DI, DT><<<cfg.grid, cfg.block, 0, cfg.stream>>>(
          args, grad_rows, static_cast<storage_t<DI>*>(grad));
    });
  });
  cuda::check_launch("the kl_div_rows backward kernel launch");
}

}  // namespace fastkd
