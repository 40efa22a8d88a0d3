// CUDA kernels of decoupled KD (logits/dkd_rows.h), as csrc/logits/dkd_cpu.cpp: one thread block
// per row. Forward: one pass; the one-pass KL accumulator (ShiftedKlStateT) over the non-target
// classes (the target's column set to −inf as it is loaded) gives NCKD and both non-target
// log-sum-exps; thread 0 reads the target's two logits for TCKD. Backward: one pass. The logit
// transforms as in logits/cuda.cu: a template flag TR (false: the plain kernels); standardize adds
// a moments pass forward and a sums pass backward. Not yet run on a GPU (compiled and
// register-checked only).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "fastkd/common/cuda_check.h"
#include "fastkd/common/cuda_rows.h"
#include "fastkd/common/dispatch.h"
#include "fastkd/logits/cuda_kd_rows.h"
#include "fastkd/logits/dkd_rows.h"

namespace fastkd {
namespace {

using cuda::FloatPair;
using cuda::add_pair;
using cuda::block_reduce;
using cuda::kMaxThreads;
using cuda::storage_t;
using kd_cuda::RowPair;
using kd_cuda::for_each_transformed;
using kd_cuda::kUnroll;
using kd_cuda::row_pair;
using kd_cuda::store_share;
using kd_cuda::vec_width;
using kd_cuda::write_kd_row;

// The row's label as a target class, or -1 when it is ignored, or -2 when it is out of range.
__device__ __forceinline__ int64_t target_of(const KdRowsArgs& args, int64_t row) {
  const int64_t label = args.labels[row];
  if (label == args.ignore_index) return -1;
  return (label >= 0 && label < args.n_cols) ? label : -2;
}

// a·(log a − log b) of one side of the binary KL, 0 where a is 0.
__device__ __forceinline__ float binary_kl_term(float log_a, float log_b) {
  return log_a > -INFINITY ? expf(log_a) * (log_a - log_b) : 0.0f;
}

// One side's logit at column `col` as the kernels see it: transformed (TR) and / T.
template <DType D, bool TR>
__device__ __forceinline__ float logit_at(const storage_t<D>* row, int64_t stride, int64_t col, float inv_t,
                                          const RowTransform& tr) {
  const float x = Element<D>::to_float(row[col * stride]);
  if constexpr (TR) return apply_transform(x, tr);
  return x * inv_t;
}

// Grid: one block per row. student, teacher: (N, V) strided; labels (N,) int64 required;
// loss (N,) fp32; stats (N, stats_width) fp32.
// Compiled for one resident block (up to 128 registers): at two (≤ 64) the target mask's copies of
// the packs spilled 4 bytes in the bf16/bf16 instance on sm_80 (scripts/kernel_report.py).
template <DType DS, DType DT, bool TR>
__global__ void __launch_bounds__(kMaxThreads, 1)
    dkd_forward_kernel(KdRowsArgs args, float alpha, float* __restrict__ loss, float* __restrict__ stats) {
  constexpr int VEC = vec_width<DS, DT>();
  const int64_t row = blockIdx.x;
  const int64_t target = target_of(args, row);
  float mean_std[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (target < 0) {  // uniform over the block: ignored (zeros) or out of range (NaN loss)
    if (threadIdx.x == 0) {
      write_kd_row<TR>(args, loss, stats, row, target == -1 ? 0.0f : NAN, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, mean_std);
    }
    return;
  }
  const RowPair<DS, DT> rows = row_pair<DS, DT>(args.student, args.teacher, args.n_cols, row);
  const float inv_t = args.divergence.inv_temperature;
  RowTransform tr_s{}, tr_t{};
  if constexpr (TR) kd_cuda::forward_transforms(rows, args.transforms, inv_t, tr_s, tr_t, mean_std);
  ShiftedKlStateT<float> state;  // a: the teacher (weights the sum), b: the student
  for_each_transformed<DS, DT, TR>(
      rows, inv_t, tr_s, tr_t,
      [&](const float (&s_in)[VEC], const float (&t_in)[VEC], const float (&)[VEC], int64_t col, int64_t step, int) {
        float s[VEC];
        float t[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {  // the target is out of the non-target sums
          const bool is_target = col + j * step == target;
          s[j] = is_target ? -INFINITY : s_in[j];
          t[j] = is_target ? -INFINITY : t_in[j];
        }
        float m_t = state.a.m, m_s = state.b.m;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          m_t = max_f(m_t, t[j]);
          m_s = max_f(m_s, s[j]);
        }
        if (m_t != state.a.m || m_s != state.b.m) state.rescale(m_t, m_s);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          float w, e_s, term;
          kl_element_terms(t[j], s[j], m_t, m_s, w, e_s, term);
          state.a.z += w;
          state.b.z += e_s;
          state.acc += term;
        }
      });
  state = block_reduce(state, ShiftedKlStateT<float>{},
                       [](ShiftedKlStateT<float>& into, const ShiftedKlStateT<float>& other) { into.merge(other); });
  if (threadIdx.x != 0) return;
  const float nckd = state.loss();
  const float log_sum_s = state.b.log_sum(), log_sum_t = state.a.log_sum();
  // log q_y and log(1 − q_y) from the target's logit and the non-target log-sum-exp (all relative
  // to the non-target max), as divergences._target_and_rest.
  const float s_y = logit_at<DS, TR>(rows.s, rows.stride_s, target, inv_t, tr_s) - state.b.m;
  const float t_y = logit_at<DT, TR>(rows.t, rows.stride_t, target, inv_t, tr_t) - state.a.m;
  const float log_all_s = log_add_exp(log_sum_s, s_y), log_all_t = log_add_exp(log_sum_t, t_y);
  const float log_q_y = s_y - log_all_s, log_q_rest = log_sum_s - log_all_s;
  const float log_p_y = t_y - log_all_t, log_p_rest = log_sum_t - log_all_t;
  const float tckd = binary_kl_term(log_p_y, log_q_y) + binary_kl_term(log_p_rest, log_q_rest);
  write_kd_row<TR>(args, loss, stats, row, alpha * tckd + args.divergence.param * nckd, state.b.m, log_sum_s,
                   state.a.m, log_sum_t, expf(log_q_y) - expf(log_p_y), mean_std);
}

// ∂L/∂z_j = q̂_j·(beta − alpha·aux) − beta·p̂_j off the target, alpha·aux at it; times grad_loss / T
// (then, with TR, the transforms' chain rule). grad: (N, V) contiguous, the student's dtype.
template <DType DS, DType DT, bool TR>
__global__ void __launch_bounds__(kMaxThreads, TR ? 1 : cuda::kResidentBlocks)
    dkd_backward_kernel(KdRowsArgs args, float alpha, const float* __restrict__ grad_loss,
                        const float* __restrict__ stats, storage_t<DS>* __restrict__ grad) {
  constexpr int VEC = vec_width<DS, DT>();
  const int64_t row = blockIdx.x;
  const int64_t target = target_of(args, row);
  storage_t<DS>* g_row = grad + row * args.n_cols;
  if (target < 0) {  // ignored: zeros; out of range: NaN, as its loss
    const storage_t<DS> fill = Element<DS>::from_float(target == -1 ? 0.0f : NAN);
    for (int64_t col = threadIdx.x; col < args.n_cols; col += blockDim.x) g_row[col] = fill;
    return;
  }
  const float inv_t = args.divergence.inv_temperature;
  const float beta = args.divergence.param;
  const float* row_stats = stats + row * (TR ? stats_width(args) : int64_t{kNumStats});
  const float m_s = row_stats[kMaxS], log_sum_s = row_stats[kLogSumS];
  const float m_t = row_stats[kMaxT], log_sum_t = row_stats[kLogSumT];
  const float aux = row_stats[kAux];
  const float scale = grad_loss[row] * inv_t;
  const float weight_q = (beta - alpha * aux) * scale, weight_p = beta * scale;
  const float g_target = alpha * aux * scale;
  RowTransform tr_s{}, tr_t{};
  if constexpr (TR) kd_cuda::saved_transforms(args.transforms, row_stats, inv_t, tr_s, tr_t);
  const RowPair<DS, DT> rows = row_pair<DS, DT>(args.student, args.teacher, args.n_cols, row);
  const auto grad_z = [&](float s, float t, int64_t col) {
    return col == target ? g_target
                         : weight_q * expf(log_prob(s, m_s, log_sum_s)) - weight_p * expf(log_prob(t, m_t, log_sum_t));
  };
  StandardizeGrad chain{1.0f, 0.0f, 0.0f};
  bool standardize = false;
  if constexpr (TR) {
    standardize = args.transforms.standardize != 0;
    if (standardize) {
      FloatPair sums{0.0f, 0.0f};  // Σ G, Σ G·s (s = z / T)
      for_each_transformed<DS, DT, true>(rows, inv_t, tr_s, tr_t,
                                         [&](const float (&s)[VEC], const float (&t)[VEC], const float (&)[VEC],
                                             int64_t col, int64_t step, int count) {
#pragma unroll
                                           for (int j = 0; j < VEC; ++j) {
                                             if (j < count) {
                                               const float g = grad_z(s[j], t[j], col + j * step);
                                               sums.first += g;
                                               sums.second += g * s[j];
                                             }
                                           }
                                         });
      sums = block_reduce(sums, FloatPair{0.0f, 0.0f}, add_pair);
      __shared__ FloatPair shared_sums;
      if (threadIdx.x == 0) shared_sums = sums;
      __syncthreads();
      chain = standardize_grad(shared_sums.first, shared_sums.second / inv_t, row_stats[kStdS],
                               args.transforms.eps, args.n_cols);
    }
  }
  for_each_transformed<DS, DT, TR>(rows, inv_t, tr_s, tr_t,
                                   [&](const float (&s)[VEC], const float (&t)[VEC], const float (&x)[VEC],
                                       int64_t col, int64_t step, int count) {
                                     float g[VEC];
#pragma unroll
                                     for (int j = 0; j < VEC; ++j) {
                                       g[j] = grad_z(s[j], t[j], col + j * step);
                                       if constexpr (TR) {
                                         if (standardize) g[j] = standardize_chain(g[j], s[j] / inv_t, chain);
                                         g[j] *= scale_and_cap_derivative(x[j], tr_s);
                                       }
                                     }
                                     store_share<DS, VEC>(g_row, g, col, step, count);
                                   });
}

cuda::RowLaunch launch_shape(const KdRowsArgs& args, uintptr_t stream) {
  return cuda::row_launch(args.n_rows, args.n_cols, cuda::pack_width(args.student.dtype, args.teacher.dtype), kUnroll,
                          stream);
}

}  // namespace

void dkd_rows_forward_cuda(const KdRowsArgs& args, float alpha, float* loss, float* stats, int device,
                           uintptr_t stream) {
  check_dkd_rows_args(args);
  if (args.n_rows == 0) return;
  check_not_null(loss, "loss");
  check_not_null(stats, "stats");
  const cuda::RowLaunch cfg = launch_shape(args, stream);
  DeviceGuard guard(device);
  dispatch_dtype(args.student.dtype, [&](auto s_tag) {
    dispatch_dtype(args.teacher.dtype, [&](auto t_tag) {
      dispatch_bool(transforms_logits(args.transforms), [&](auto tr_tag) {
        constexpr DType DS = decltype(s_tag)::value;
        constexpr DType DT = decltype(t_tag)::value;
        constexpr bool TR = decltype(tr_tag)::value;
        dkd_forward_kernel<DS, DT, TR><<<cfg.grid, cfg.block, 0, cfg.stream>>>(args, alpha, loss, stats);
      });
    });
  });
  cuda::check_launch("the dkd_rows forward kernel launch");
}

void dkd_rows_backward_cuda(const KdRowsArgs& args, float alpha, const float* grad_loss, const float* stats,
                            void* grad, int device, uintptr_t stream) {
  check_dkd_rows_args(args);
  if (args.n_rows == 0) return;
  check_not_null(grad_loss, "grad_loss");
  check_not_null(stats, "stats");
  check_not_null(grad, "grad");
  const cuda::RowLaunch cfg = launch_shape(args, stream);
  DeviceGuard guard(device);
  dispatch_dtype(args.student.dtype, [&](auto s_tag) {
    dispatch_dtype(args.teacher.dtype, [&](auto t_tag) {
      dispatch_bool(transforms_logits(args.transforms), [&](auto tr_tag) {
        constexpr DType DS = decltype(s_tag)::value;
        constexpr DType DT = decltype(t_tag)::value;
        constexpr bool TR = decltype(tr_tag)::value;
        dkd_backward_kernel<DS, DT, TR><<<cfg.grid, cfg.block, 0, cfg.stream>>>(
            args, alpha, grad_loss, stats, static_cast<storage_t<DS>*>(grad));
      });
    });
  });
  cuda::check_launch("the dkd_rows backward kernel launch");
}

}  // namespace fastkd
