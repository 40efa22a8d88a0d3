// CUDA kernels of the logits family (kd_rows, kl_div_rows), mirroring the Triton kernels of
// fastkd/backends/triton/logits.py with the shared math of logits/divergence_math.h. One thread
// block per row; each thread keeps fp32 partial state and the block merges the states (warp
// shuffles, then one warp over shared memory). A thread reads its share of the row kUnroll packs
// per tensor at a time (logits/cuda_kd_rows.h): one 16-byte load of the wider input dtype per pack
// when both rows are contiguous and aligned, else VEC coalesced scalar loads.
//   forward_kl / reverse_kl: one pass (ShiftedKlStateT), jsd / skew_* / tvd: two passes,
//   backward: one pass writing ∂L/∂student in the student's dtype. No host synchronisation.
// The logit transforms (logits/transforms.h) are a template flag TR: false compiles the plain
// kernels as before. Standardize adds one moments pass forward (mean and std saved in the stats)
// and one pass backward (the row sums of G = ∂L/∂z and G·z before the gradient is written).
#include <cuda_runtime.h>

#include <cstdint>

#include "fastkd/common/cuda_check.h"
#include "fastkd/common/cuda_rows.h"
#include "fastkd/common/dispatch.h"
#include "fastkd/logits/cuda_kd_rows.h"
#include "fastkd/logits/kd_rows.h"

namespace fastkd {
namespace {

using cuda::FloatPair;
using cuda::add_pair;
using cuda::block_reduce;
using cuda::kMaxThreads;
using cuda::storage_t;
using kd_cuda::RowPair;
using kd_cuda::for_each_pack;
using kd_cuda::for_each_transformed;
using kd_cuda::kUnroll;
using kd_cuda::row_is_active;
using kd_cuda::row_pair;
using kd_cuda::store_share;
using kd_cuda::vec_width;
using kd_cuda::write_kd_row;

// Resident blocks per SM a kernel is compiled for (cuda::kResidentBlocks: two, ≤ 64 registers).
// The per-element math of jsd and skew_* does not fit in 64 registers next to four packs in flight
// (ptxas spills): those kernels are compiled for one block (up to 128 registers), which still
// keeps 64 KiB in flight. So are the transformed kernels (TR): the tanh and the raw student
// values need registers too.
constexpr int min_resident_blocks(int divergence, bool transformed = false) {
  return transformed || divergence == kJsd || divergence == kSkewForwardKl || divergence == kSkewReverseKl
             ? 1
             : cuda::kResidentBlocks;
}

// ------------------------------------------------------------------------------------------
// Kernels. Grid: one block per row (N blocks). student, teacher: (N, V) or (B, T, V) strided
// (RowsView); loss: (N,) fp32; stats: (N, stats_width) fp32; grad: (N, V) contiguous, student dtype.
// ------------------------------------------------------------------------------------------

// forward_kl (REVERSE = false: the teacher weights the sum) or reverse_kl, one pass.
template <DType DS, DType DT, bool REVERSE, bool TR>
__global__ void __launch_bounds__(kMaxThreads, min_resident_blocks(kForwardKl, TR))
    kl_forward_kernel(KdRowsArgs args, float* __restrict__ loss, float* __restrict__ stats) {
  constexpr int VEC = vec_width<DS, DT>();
  const int64_t row = blockIdx.x;
  float mean_std[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (!row_is_active(args, row)) {  // uniform over the block
    if (threadIdx.x == 0) write_kd_row<TR>(args, loss, stats, row, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, mean_std);
    return;
  }
  const RowPair<DS, DT> rows = row_pair<DS, DT>(args.student, args.teacher, args.n_cols, row);
  const float inv_t = args.divergence.inv_temperature;
  RowTransform tr_s{}, tr_t{};
  if constexpr (TR) kd_cuda::forward_transforms(rows, args.transforms, inv_t, tr_s, tr_t, mean_std);
  ShiftedKlStateT<float> state;
  for_each_transformed<DS, DT, TR>(
      rows, inv_t, tr_s, tr_t, [&](const float (&s)[VEC], const float (&t)[VEC], const float (&)[VEC], int64_t,
                                   int64_t, int) {
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
      write_kd_row<TR>(args, loss, stats, row, row_loss, state.a.m, state.a.log_sum(), state.b.m, state.b.log_sum(),
                       row_loss, mean_std);
    } else {
      write_kd_row<TR>(args, loss, stats, row, row_loss, state.b.m, state.b.log_sum(), state.a.m, state.a.log_sum(),
                       0.0f, mean_std);
    }
  }
}

struct LsePair {
  LseStateT<float> s;
  LseStateT<float> t;
};

// jsd, skew_forward_kl, skew_reverse_kl, tvd: normalisers first, then the terms needing p and q.
template <DType DS, DType DT, int DIV, bool TR>
__global__ void __launch_bounds__(kMaxThreads, min_resident_blocks(DIV, TR))
    two_pass_forward_kernel(KdRowsArgs args, float* __restrict__ loss, float* __restrict__ stats) {
  constexpr int VEC = vec_width<DS, DT>();
  const int64_t row = blockIdx.x;
  float mean_std[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (!row_is_active(args, row)) {
    if (threadIdx.x == 0) write_kd_row<TR>(args, loss, stats, row, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, mean_std);
    return;
  }
  const RowPair<DS, DT> rows = row_pair<DS, DT>(args.student, args.teacher, args.n_cols, row);
  const DivergenceParams k = args.divergence;
  RowTransform tr_s{}, tr_t{};
  if constexpr (TR) kd_cuda::forward_transforms(rows, args.transforms, k.inv_temperature, tr_s, tr_t, mean_std);
  LsePair lse;
  for_each_transformed<DS, DT, TR>(rows, k.inv_temperature, tr_s, tr_t,
                                   [&](const float (&s)[VEC], const float (&t)[VEC], const float (&)[VEC], int64_t,
                                       int64_t, int) {
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
  for_each_transformed<DS, DT, TR>(rows, k.inv_temperature, tr_s, tr_t,
                                   [&](const float (&s)[VEC], const float (&t)[VEC], const float (&)[VEC], int64_t,
                                       int64_t, int) {
#pragma unroll
                                     for (int j = 0; j < VEC; ++j) {
                                       float loss_term, aux_term;
                                       two_pass_terms<DIV>(log_prob(s[j], m_s, log_sum_s),
                                                           log_prob(t[j], m_t, log_sum_t), k, loss_term, aux_term);
                                       sums.first += loss_term;
                                       sums.second += aux_term;
                                     }
                                   });
  sums = block_reduce(sums, FloatPair{0.0f, 0.0f}, add_pair);
  if (threadIdx.x == 0) {
    write_kd_row<TR>(args, loss, stats, row, sums.first, m_s, log_sum_s, m_t, log_sum_t, sums.second, mean_std);
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

// The backward with transforms. G_j = ∂L/∂z_j as the plain kernel computes it; under standardize
// a first pass sums G and G·z over the row; the writing pass applies the standardisation's chain
// rule (logits/transforms.h) and d cap(scale·x)/dx.
template <DType DS, DType DT, int DIV>
__global__ void __launch_bounds__(kMaxThreads, min_resident_blocks(DIV, true))
    transformed_backward_kernel(KdRowsArgs args, const float* __restrict__ grad_loss, const float* __restrict__ stats,
                                storage_t<DS>* __restrict__ grad) {
  constexpr int VEC = vec_width<DS, DT>();
  const int64_t row = blockIdx.x;
  storage_t<DS>* g_row = grad + row * args.n_cols;
  if (!row_is_active(args, row)) {
    for (int64_t col = threadIdx.x; col < args.n_cols; col += blockDim.x) g_row[col] = Element<DS>::from_float(0.0f);
    return;
  }
  const DivergenceParams k = args.divergence;
  const LogitTransforms all = args.transforms;
  const float* row_stats = stats + row * stats_width(args);
  const float m_s = row_stats[kMaxS], log_sum_s = row_stats[kLogSumS];
  const float m_t = row_stats[kMaxT], log_sum_t = row_stats[kLogSumT];
  const float aux = row_stats[kAux];
  RowTransform tr_s, tr_t;
  kd_cuda::saved_transforms(all, row_stats, k.inv_temperature, tr_s, tr_t);
  const float scale = grad_loss[row] * k.inv_temperature;
  const RowPair<DS, DT> rows = row_pair<DS, DT>(args.student, args.teacher, args.n_cols, row);
  StandardizeGrad chain{1.0f, 0.0f, 0.0f};
  if (all.standardize) {
    FloatPair sums{0.0f, 0.0f};  // Σ G, Σ G·s (s = z / T)
    for_each_transformed<DS, DT, true>(rows, k.inv_temperature, tr_s, tr_t,
                                       [&](const float (&s)[VEC], const float (&t)[VEC], const float (&)[VEC],
                                           int64_t, int64_t, int count) {
#pragma unroll
                                         for (int j = 0; j < VEC; ++j) {
                                           const float g = grad_scaled_student<DIV>(log_prob(s[j], m_s, log_sum_s),
                                                                                    log_prob(t[j], m_t, log_sum_t),
                                                                                    aux, k) *
                                                           scale;
                                           if (j < count) {
                                             sums.first += g;
                                             sums.second += g * s[j];
                                           }
                                         }
                                       });
    sums = block_reduce(sums, FloatPair{0.0f, 0.0f}, add_pair);
    __shared__ FloatPair shared_sums;
    if (threadIdx.x == 0) shared_sums = sums;
    __syncthreads();
    chain = standardize_grad(shared_sums.first, shared_sums.second / k.inv_temperature, row_stats[kStdS], all.eps,
                             args.n_cols);
  }
  const bool standardize = all.standardize != 0;
  const float inv_t = k.inv_temperature;
  for_each_transformed<DS, DT, true>(rows, inv_t, tr_s, tr_t,
                                     [&](const float (&s)[VEC], const float (&t)[VEC], const float (&x)[VEC],
                                         int64_t col, int64_t step, int count) {
                                       float g[VEC];
#pragma unroll
                                       for (int j = 0; j < VEC; ++j) {
                                         float dz = grad_scaled_student<DIV>(log_prob(s[j], m_s, log_sum_s),
                                                                             log_prob(t[j], m_t, log_sum_t), aux, k) *
                                                    scale;
                                         if (standardize) dz = standardize_chain(dz, s[j] / inv_t, chain);
                                         g[j] = dz * scale_and_cap_derivative(x[j], tr_s);
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
        dispatch_bool(transforms_logits(args.transforms), [&](auto tr_tag) {
          constexpr bool TR = decltype(tr_tag)::value;
          if constexpr (DIV == kForwardKl || DIV == kReverseKl) {
            kl_forward_kernel<DS, DT, DIV == kReverseKl, TR><<<cfg.grid, cfg.block, 0, cfg.stream>>>(args, loss, stats);
          } else {
            two_pass_forward_kernel<DS, DT, DIV, TR><<<cfg.grid, cfg.block, 0, cfg.stream>>>(args, loss, stats);
          }
        });
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
        if (transforms_logits(args.transforms)) {
          transformed_backward_kernel<DS, DT, DIV><<<cfg.grid, cfg.block, 0, cfg.stream>>>(
              args, grad_loss, stats, static_cast<storage_t<DS>*>(grad));
        } else {
          backward_kernel<DS, DT, DIV><<<cfg.grid, cfg.block, 0, cfg.stream>>>(
              args, grad_loss, stats, static_cast<storage_t<DS>*>(grad));
        }
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
