// CUDA kernels of the kd_rows and kl_div_rows ops, mirroring the Triton kernels of
// fastkd/backends/triton/logits.py with the shared math of fastkd/kd_math.h. One thread block per
// row; each thread takes VEC columns at a time (one 16-byte load of the wider input dtype when
// both rows are contiguous and aligned, else VEC coalesced scalar loads), keeps fp32 partial
// state, and the block merges the states (warp shuffles, then one warp over shared memory).
//   forward_kl / reverse_kl: one pass (ShiftedKlStateT), jsd / skew_* / tvd: two passes,
//   backward: one pass writing ∂L/∂student in the student's dtype. No host synchronisation.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "fastkd/cuda_check.h"
#include "fastkd/dispatch.h"
#include "fastkd/kd_rows.h"

namespace fastkd {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kWarp = 32;

template <DType D>
using storage_t = typename Element<D>::storage;

// Columns per thread and step: 16 bytes of the wider of the two input dtypes.
template <DType DS, DType DT>
constexpr int vec_width() {
  return 16 / (sizeof(storage_t<DS>) > sizeof(storage_t<DT>) ? sizeof(storage_t<DS>) : sizeof(storage_t<DT>));
}

template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <class T, int N>
__device__ __forceinline__ bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N) == 0;
}

template <DType D, int VEC>
__device__ __forceinline__ void load_pack(const storage_t<D>* __restrict__ row, int64_t col, float scale,
                                          float (&out)[VEC]) {
  const Pack<storage_t<D>, VEC> pack = *reinterpret_cast<const Pack<storage_t<D>, VEC>*>(row + col);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = Element<D>::to_float(pack.v[j]) * scale;
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
__device__ RowPair<DS, DT> row_pair(const KdRowsArgs& args, int64_t row) {
  constexpr int VEC = vec_width<DS, DT>();
  RowPair<DS, DT> rows;
  rows.s = static_cast<const storage_t<DS>*>(args.student.data) + row_start(args.student, row);
  rows.t = static_cast<const storage_t<DT>*>(args.teacher.data) + row_start(args.teacher, row);
  rows.stride_s = args.student.stride_col;
  rows.stride_t = args.teacher.stride_col;
  rows.n_cols = args.n_cols;
  rows.vectorised = rows.stride_s == 1 && rows.stride_t == 1 && is_aligned<storage_t<DS>, VEC>(rows.s) &&
                    is_aligned<storage_t<DT>, VEC>(rows.t);
  return rows;
}

// Calls f(s, t, col, step, count) for this thread's share of the row: s[j], t[j] (scaled fp32)
// are columns col + j·step for j < count, and -inf beyond (they then add nothing).
template <DType DS, DType DT, class F>
__device__ __forceinline__ void for_each_pack(const RowPair<DS, DT>& rows, float scale, F&& f) {
  constexpr int VEC = vec_width<DS, DT>();
  float s[VEC];
  float t[VEC];
  if (rows.vectorised) {
    const int64_t n_packs = rows.n_cols / VEC;
    for (int64_t p = threadIdx.x; p < n_packs; p += blockDim.x) {
      load_pack<DS, VEC>(rows.s, p * VEC, scale, s);
      load_pack<DT, VEC>(rows.t, p * VEC, scale, t);
      f(s, t, p * VEC, int64_t{1}, VEC);
    }
    const int64_t col = n_packs * VEC + threadIdx.x;  // fewer than VEC columns remain
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

// Warp shuffle of a struct of 32-bit words.
template <class T>
__device__ __forceinline__ T shuffle_down(const T& value, int offset) {
  static_assert(sizeof(T) % 4 == 0, "shuffle_down needs 32-bit words");
  T out;
  const unsigned* src = reinterpret_cast<const unsigned*>(&value);
  unsigned* dst = reinterpret_cast<unsigned*>(&out);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(T) / 4); ++i) dst[i] = __shfl_down_sync(0xffffffffu, src[i], offset);
  return out;
}

// Merges every thread's value into thread 0's (blockDim.x a multiple of 32). `identity` changes
// nothing when merged. Ends with a barrier, so the block may call it again.
template <class T, class Merge>
__device__ T block_reduce(T value, const T& identity, Merge merge) {
  __shared__ alignas(16) unsigned char raw[kMaxThreads / kWarp * sizeof(T)];  // no constructor: raw bytes
  T* partial = reinterpret_cast<T*>(raw);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) merge(value, shuffle_down(value, offset));
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < static_cast<int>(blockDim.x / kWarp) ? partial[lane] : identity;
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) merge(value, shuffle_down(value, offset));
  }
  __syncthreads();
  return value;
}

struct FloatPair {
  float first;
  float second;
};

__device__ __forceinline__ void add_pair(FloatPair& into, const FloatPair& other) {
  into.first += other.first;
  into.second += other.second;
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
__global__ void __launch_bounds__(kMaxThreads)
    kl_forward_kernel(KdRowsArgs args, float* __restrict__ loss, float* __restrict__ stats) {
  constexpr int VEC = vec_width<DS, DT>();
  const int64_t row = blockIdx.x;
  if (!row_is_active(args, row)) {  // uniform over the block
    if (threadIdx.x == 0) write_row_outputs(loss, stats, row, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f);
    return;
  }
  ShiftedKlStateT<float> state;
  for_each_pack(row_pair<DS, DT>(args, row), args.params.inv_temperature,
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
__global__ void __launch_bounds__(kMaxThreads)
    two_pass_forward_kernel(KdRowsArgs args, float* __restrict__ loss, float* __restrict__ stats) {
  constexpr int VEC = vec_width<DS, DT>();
  const int64_t row = blockIdx.x;
  if (!row_is_active(args, row)) {
    if (threadIdx.x == 0) write_row_outputs(loss, stats, row, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f);
    return;
  }
  const RowPair<DS, DT> rows = row_pair<DS, DT>(args, row);
  const DivergenceParams k = args.params;
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
__global__ void __launch_bounds__(kMaxThreads)
    backward_kernel(KdRowsArgs args, const float* __restrict__ grad_loss, const float* __restrict__ stats,
                    storage_t<DS>* __restrict__ grad) {
  constexpr int VEC = vec_width<DS, DT>();
  const int64_t row = blockIdx.x;
  storage_t<DS>* g_row = grad + row * args.n_cols;
  if (!row_is_active(args, row)) {
    for (int64_t col = threadIdx.x; col < args.n_cols; col += blockDim.x) g_row[col] = Element<DS>::from_float(0.0f);
    return;
  }
  const DivergenceParams k = args.params;
  const float* row_stats = stats + row * kNumStats;
  const float m_s = row_stats[kMaxS], log_sum_s = row_stats[kLogSumS];
  const float m_t = row_stats[kMaxT], log_sum_t = row_stats[kLogSumT];
  const float aux = row_stats[kAux];
  // ∂L/∂student = ∂L/∂s / T, times the upstream gradient of this row's loss.
  const float scale = grad_loss[row] * k.inv_temperature;
  for_each_pack(row_pair<DS, DT>(args, row), k.inv_temperature,
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

// kl_div_rows: the student view holds the input, the teacher view the target.
template <DType DI, DType DT>
__global__ void __launch_bounds__(kMaxThreads)
    kl_div_forward_kernel(KdRowsArgs args, bool log_target, float* __restrict__ out) {
  constexpr int VEC = vec_width<DI, DT>();
  const int64_t row = blockIdx.x;
  FloatPair total{0.0f, 0.0f};
  for_each_pack(row_pair<DI, DT>(args, row), 1.0f,
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
__global__ void __launch_bounds__(kMaxThreads)
    kl_div_backward_kernel(KdRowsArgs args, bool log_target, const float* __restrict__ grad_rows,
                           storage_t<DI>* __restrict__ grad) {
  constexpr int VEC = vec_width<DI, DT>();
  const int64_t row = blockIdx.x;
  const float scale = -grad_rows[row];
  storage_t<DI>* g_row = grad + row * args.n_cols;
  for_each_pack(row_pair<DI, DT>(args, row), 1.0f,
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

struct Launch {
  dim3 grid;
  dim3 block;
  cudaStream_t stream;
};

// Threads per row: about four packs per thread per row, 64 to 512, a multiple of the warp size.
Launch launch_config(const KdRowsArgs& args, uintptr_t stream) {
  if (args.n_rows > 0x7FFFFFFF) throw_invalid("n_rows", " exceeds the CUDA grid limit (2^31 - 1 rows)");
  const int64_t packs = (args.n_cols + 7) / 8;
  int threads = 64;
  while (threads < kMaxThreads && threads * 4 < packs) threads *= 2;
  return {dim3(static_cast<unsigned>(args.n_rows)), dim3(threads), reinterpret_cast<cudaStream_t>(stream)};
}

void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

}  // namespace

void kd_rows_forward_cuda(const KdRowsArgs& args, float* loss, float* stats, int device, uintptr_t stream) {
  check_kd_rows_args(args, true);
  if (args.n_rows == 0) return;
  const Launch cfg = launch_config(args, stream);
  DeviceGuard guard(device);
  dispatch_dtype(args.student.dtype, [&](auto s_tag) {
    dispatch_dtype(args.teacher.dtype, [&](auto t_tag) {
      dispatch_divergence(args.divergence, [&](auto div_tag) {
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
  check_launch("the kd_rows forward kernel launch");
}

void kd_rows_backward_cuda(const KdRowsArgs& args, const float* grad_loss, const float* stats, void* grad,
                           int device, uintptr_t stream) {
  check_kd_rows_args(args, true);
  if (args.n_rows == 0) return;
  const Launch cfg = launch_config(args, stream);
  DeviceGuard guard(device);
  dispatch_dtype(args.student.dtype, [&](auto s_tag) {
    dispatch_dtype(args.teacher.dtype, [&](auto t_tag) {
      dispatch_divergence(args.divergence, [&](auto div_tag) {
        constexpr DType DS = decltype(s_tag)::value;
        constexpr DType DT = decltype(t_tag)::value;
        constexpr int DIV = decltype(div_tag)::value;
        backward_kernel<DS, DT, DIV><<<cfg.grid, cfg.block, 0, cfg.stream>>>(
            args, grad_loss, stats, static_cast<storage_t<DS>*>(grad));
      });
    });
  });
  check_launch("the kd_rows backward kernel launch");
}

void kl_div_rows_forward_cuda(const KdRowsArgs& args, bool log_target, float* out, int device, uintptr_t stream) {
  check_kd_rows_args(args, false);
  if (args.n_rows == 0) return;
  const Launch cfg = launch_config(args, stream);
  DeviceGuard guard(device);
  dispatch_dtype(args.student.dtype, [&](auto i_tag) {
    dispatch_dtype(args.teacher.dtype, [&](auto t_tag) {
      constexpr DType DI = decltype(i_tag)::value;
      constexpr DType DT = decltype(t_tag)::value;
      kl_div_forward_kernel<DI, DT><<<cfg.grid, cfg.block, 0, cfg.stream>>>(args, log_target, out);
    });
  });
  check_launch("the kl_div_rows forward kernel launch");
}

void kl_div_rows_backward_cuda(const KdRowsArgs& args, bool log_target, const float* grad_rows, void* grad,
                               int device, uintptr_t stream) {
  check_kd_rows_args(args, false);
  if (args.n_rows == 0) return;
  const Launch cfg = launch_config(args, stream);
  DeviceGuard guard(device);
  dispatch_dtype(args.student.dtype, [&](auto i_tag) {
    dispatch_dtype(args.teacher.dtype, [&](auto t_tag) {
      constexpr DType DI = decltype(i_tag)::value;
      constexpr DType DT = decltype(t_tag)::value;
      kl_div_backward_kernel<DI, DT><<<cfg.grid, cfg.block, 0, cfg.stream>>>(
          args, log_target, grad_rows, static_cast<storage_t<DI>*>(grad));
    });
  });
  check_launch("the kl_div_rows backward kernel launch");
}

}  // namespace fastkd
