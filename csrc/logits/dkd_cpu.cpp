// CPU kernels of decoupled KD (logits/dkd_rows.h): OpenMP over rows, columns in blocks of
// cpu::kBlock converted to scaled fp32. Forward: one pass per row, the one-pass KL accumulator
// (ShiftedKlState) over the non-target classes (the target masked to −inf in the block) gives
// NCKD and both non-target log-sum-exps; the target's two logits give TCKD. Backward: one pass.
// So each of student and teacher is read once forward and once backward, and the gradient
// written once: the floor of a fused logits loss. The logit transforms (logits/transforms.h) as
// in logits/cpu.cpp: a template flag on the forward (the plain path unchanged), and a backward of
// their own; standardize adds a moments pass per side forward and a write pass backward.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "fastkd/common/cpu_rows.h"
#include "fastkd/common/dispatch.h"
#include "fastkd/logits/cpu_kd_rows.h"
#include "fastkd/logits/cpu_transforms.h"
#include "fastkd/logits/dkd_rows.h"

namespace fastkd {
namespace {

using cpu::kBlock;
using cpu::block_max;
using cpu::load_scaled;
using cpu::load_side;
using cpu::row_pointer;
using cpu::storage_t;
using cpu::write_row_outputs;
using ShiftedKlState = ShiftedKlStateT<double>;

constexpr float kNan = std::numeric_limits<float>::quiet_NaN();

// The row's label as a target class, or -1 when it is ignored, or -2 when it is out of range.
int64_t target_of(const KdRowsArgs& args, int64_t row) {
  const int64_t label = args.labels[row];
  if (label == args.ignore_index) return -1;
  return (label >= 0 && label < args.n_cols) ? label : -2;
}

// a·(log a − log b) of one side of the binary KL, 0 where a is 0.
float binary_kl_term(float log_a, float log_b) { return log_a > -INFINITY ? std::exp(log_a) * (log_a - log_b) : 0.0f; }

// The rows' outputs: the five kd_rows stats, then under standardize the sides' means and stds.
template <bool TR>
void write_dkd_row(const KdRowsArgs& args, float* loss, float* stats, int64_t row, float row_loss, float max_s,
                   float log_sum_s, float max_t, float log_sum_t, float aux, const float (&moments)[4]) {
  if constexpr (TR) {
    write_row_outputs(loss, stats, row, row_loss, max_s, log_sum_s, max_t, log_sum_t, aux, stats_width(args));
    if (args.transforms.standardize) {
      cpu::write_standardized_stats(stats, row, moments[0], moments[1], moments[2], moments[3]);
    }
  } else {
    write_row_outputs(loss, stats, row, row_loss, max_s, log_sum_s, max_t, log_sum_t, aux);
  }
}

template <DType DS, DType DT, bool TR>
FASTKD_ROW_CLONES void dkd_forward_row(const KdRowsArgs& args, float alpha, int64_t row, int64_t target,
                                       float* loss, float* stats) {
  alignas(64) float s[kBlock];
  alignas(64) float t[kBlock];
  const storage_t<DS>* s_row = row_pointer<DS>(args.student, row);
  const storage_t<DT>* t_row = row_pointer<DT>(args.teacher, row);
  const float inv_t = args.divergence.inv_temperature;
  RowTransform tr_s{}, tr_t{};
  float moments[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // mean_s, std_s, mean_t, std_t
  if constexpr (TR) {  // the transforms see the whole row, the target included
    tr_s = cpu::forward_transform<DS>(args.transforms, args.transforms.student, s_row, args.n_cols,
                                      args.student.stride_col, inv_t, s, moments[0], moments[1]);
    tr_t = cpu::forward_transform<DT>(args.transforms, args.transforms.teacher, t_row, args.n_cols,
                                      args.teacher.stride_col, inv_t, t, moments[2], moments[3]);
  }
  float s_target = 0.0f, t_target = 0.0f;
  ShiftedKlState state;  // a: the teacher (weights the sum), b: the student
  for (int64_t col = 0; col < args.n_cols; col += kBlock) {
    const int64_t n = std::min(kBlock, args.n_cols - col);
    load_side<DS, TR>(s_row, col, n, args.student.stride_col, inv_t, tr_s, s);
    load_side<DT, TR>(t_row, col, n, args.teacher.stride_col, inv_t, tr_t, t);
    if (target >= col && target < col + n) {  // out of the non-target sums, kept for TCKD
      s_target = s[target - col];
      t_target = t[target - col];
      s[target - col] = -INFINITY;
      t[target - col] = -INFINITY;
    }
    state.rescale(max_f(state.a.m, block_max(t, n)), max_f(state.b.m, block_max(s, n)));
    const float m_t = state.a.m;
    const float m_s = state.b.m;
    double z_t = 0.0, z_s = 0.0, acc = 0.0;
#pragma omp simd reduction(+ : z_t, z_s, acc)
    for (int64_t i = 0; i < n; ++i) {
      float w, e_s, term;
      kl_element_terms(t[i], s[i], m_t, m_s, w, e_s, term);
      z_t += w;
      z_s += e_s;
      acc += term;
    }
    state.a.z += z_t;
    state.b.z += z_s;
    state.acc += acc;
  }
  const float nckd = state.loss();
  const float log_sum_s = state.b.log_sum(), log_sum_t = state.a.log_sum();
  // log q_y and log(1 − q_y) from the target's logit and the non-target log-sum-exp (all
  // relative to the non-target max), as divergences._target_and_rest.
  const float s_y = s_target - state.b.m, t_y = t_target - state.a.m;
  const float log_all_s = log_add_exp(log_sum_s, s_y), log_all_t = log_add_exp(log_sum_t, t_y);
  const float log_q_y = s_y - log_all_s, log_q_rest = log_sum_s - log_all_s;
  const float log_p_y = t_y - log_all_t, log_p_rest = log_sum_t - log_all_t;
  const float tckd = binary_kl_term(log_p_y, log_q_y) + binary_kl_term(log_p_rest, log_q_rest);
  write_dkd_row<TR>(args, loss, stats, row, alpha * tckd + args.divergence.param * nckd, state.b.m, log_sum_s,
                    state.a.m, log_sum_t, std::exp(log_q_y) - std::exp(log_p_y), moments);
}

// ∂L/∂s_j = q̂_j·(beta − alpha·aux) − beta·p̂_j off the target, alpha·aux at it; times
// grad_loss / T. grad row: (V,) contiguous, the student's dtype.
template <DType DS, DType DT>
FASTKD_ROW_CLONES void dkd_backward_row(const KdRowsArgs& args, float alpha, int64_t row, int64_t target,
                                        const float* grad_loss, const float* stats, void* grad) {
  storage_t<DS>* g_row = static_cast<storage_t<DS>*>(grad) + row * args.n_cols;
  alignas(64) float s[kBlock];
  alignas(64) float t[kBlock];
  const storage_t<DS>* s_row = row_pointer<DS>(args.student, row);
  const storage_t<DT>* t_row = row_pointer<DT>(args.teacher, row);
  const float inv_t = args.divergence.inv_temperature;
  const float beta = args.divergence.param;
  const float* row_stats = stats + row * kNumStats;
  const float m_s = row_stats[kMaxS], log_sum_s = row_stats[kLogSumS];
  const float m_t = row_stats[kMaxT], log_sum_t = row_stats[kLogSumT];
  const float aux = row_stats[kAux];
  const float scale = grad_loss[row] * inv_t;
  const float weight_q = (beta - alpha * aux) * scale, weight_p = beta * scale;
  for (int64_t col = 0; col < args.n_cols; col += kBlock) {
    const int64_t n = std::min(kBlock, args.n_cols - col);
    load_scaled<DS>(s_row, col, n, args.student.stride_col, inv_t, s);
    load_scaled<DT>(t_row, col, n, args.teacher.stride_col, inv_t, t);
    storage_t<DS>* out = g_row + col;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float g =
          weight_q * kd_exp(log_prob(s[i], m_s, log_sum_s)) - weight_p * kd_exp(log_prob(t[i], m_t, log_sum_t));
      out[i] = Element<DS>::from_float(g);
    }
  }
  g_row[target] = Element<DS>::from_float(alpha * aux * scale);
}

// The backward with transforms (cf. transformed_backward_row in logits/cpu.cpp): G = ∂L/∂z as
// above, then times dy/dx (one pass), or under standardize into the thread's fp32 scratch row
// with the sums of G and G·z, and the standardisation's chain rule in a second pass.
template <DType DS, DType DT>
FASTKD_ROW_CLONES void transformed_dkd_backward_row(const KdRowsArgs& args, float alpha, int64_t row, int64_t target,
                                                    const float* grad_loss, const float* stats, void* grad) {
  storage_t<DS>* g_row = static_cast<storage_t<DS>*>(grad) + row * args.n_cols;
  alignas(64) float s[kBlock];
  alignas(64) float t[kBlock];
  alignas(64) float d[kBlock];
  const storage_t<DS>* s_row = row_pointer<DS>(args.student, row);
  const storage_t<DT>* t_row = row_pointer<DT>(args.teacher, row);
  const float inv_t = args.divergence.inv_temperature;
  const float beta = args.divergence.param;
  const LogitTransforms& all = args.transforms;
  const bool standardize = all.standardize != 0;
  const float* row_stats = stats + row * stats_width(args);
  const float m_s = row_stats[kMaxS], log_sum_s = row_stats[kLogSumS];
  const float m_t = row_stats[kMaxT], log_sum_t = row_stats[kLogSumT];
  const float aux = row_stats[kAux];
  const float std_s = standardize ? row_stats[kStdS] : 0.0f;
  const RowTransform tr_s =
      cpu::saved_transform(all, all.student, standardize ? row_stats[kMeanS] : 0.0f, std_s, inv_t);
  const RowTransform tr_t = cpu::saved_transform(all, all.teacher, standardize ? row_stats[kMeanT] : 0.0f,
                                                 standardize ? row_stats[kStdT] : 0.0f, inv_t);
  const float scale = grad_loss[row] * inv_t;
  const float weight_q = (beta - alpha * aux) * scale, weight_p = beta * scale;
  const float g_target = alpha * aux * scale;
  float* g_z = standardize ? cpu::row_scratch(args.n_cols) : nullptr;
  double sum_g = 0.0, sum_gs = 0.0;
  for (int64_t col = 0; col < args.n_cols; col += kBlock) {
    const int64_t n = std::min(kBlock, args.n_cols - col);
    cpu::load_transformed<DS>(s_row, col, n, args.student.stride_col, tr_s, s);
    cpu::load_transformed<DT>(t_row, col, n, args.teacher.stride_col, tr_t, t);
    if (standardize) {
      float* out = g_z + col;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        out[i] = weight_q * kd_exp(log_prob(s[i], m_s, log_sum_s)) - weight_p * kd_exp(log_prob(t[i], m_t, log_sum_t));
      }
      if (target >= col && target < col + n) out[target - col] = g_target;
#pragma omp simd reduction(+ : sum_g, sum_gs)
      for (int64_t i = 0; i < n; ++i) {
        sum_g += out[i];
        sum_gs += out[i] * s[i];
      }
    } else {
      cpu::load_derivative<DS>(s_row, col, n, args.student.stride_col, tr_s, d);
      storage_t<DS>* out = g_row + col;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float g =
            weight_q * kd_exp(log_prob(s[i], m_s, log_sum_s)) - weight_p * kd_exp(log_prob(t[i], m_t, log_sum_t));
        out[i] = Element<DS>::from_float(g * d[i]);
      }
      if (target >= col && target < col + n) out[target - col] = Element<DS>::from_float(g_target * d[target - col]);
    }
  }
  if (standardize) {
    // Σ G·z = Σ G·s / (1/T): the loaded s is z / T.
    const StandardizeGrad chain = standardize_grad(sum_g, sum_gs / inv_t, std_s, all.eps, args.n_cols);
    cpu::write_standardized_grad<DS>(s_row, args.n_cols, args.student.stride_col, tr_s, chain, g_z, g_row);
  }
}

template <DType DS>
void fill_row(void* grad, int64_t row, int64_t n_cols, float value) {
  storage_t<DS>* g_row = static_cast<storage_t<DS>*>(grad) + row * n_cols;
  const storage_t<DS> v = Element<DS>::from_float(value);
  for (int64_t i = 0; i < n_cols; ++i) g_row[i] = v;
}

}  // namespace

void dkd_rows_forward_cpu(const KdRowsArgs& args, float alpha, float* loss, float* stats, int n_threads) {
  check_dkd_rows_args(args);
  if (args.n_rows == 0) return;
  check_not_null(loss, "loss");
  check_not_null(stats, "stats");
  dispatch_dtype(args.student.dtype, [&](auto s_tag) {
    dispatch_dtype(args.teacher.dtype, [&](auto t_tag) {
      constexpr DType DS = decltype(s_tag)::value;
      constexpr DType DT = decltype(t_tag)::value;
      dispatch_bool(transforms_logits(args.transforms), [&](auto tr_tag) {
        constexpr bool TR = decltype(tr_tag)::value;
        constexpr float kZeros[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        cpu::for_each_row(args.n_rows, n_threads, [&](int64_t row) {
          const int64_t target = target_of(args, row);
          if (target == -1) {
            write_dkd_row<TR>(args, loss, stats, row, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, kZeros);
          } else if (target == -2) {
            write_dkd_row<TR>(args, loss, stats, row, kNan, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, kZeros);
          } else {
            dkd_forward_row<DS, DT, TR>(args, alpha, row, target, loss, stats);
          }
        });
      });
    });
  });
}

void dkd_rows_backward_cpu(const KdRowsArgs& args, float alpha, const float* grad_loss, const float* stats,
                           void* grad, int n_threads) {
  check_dkd_rows_args(args);
  if (args.n_rows == 0) return;
  check_not_null(grad_loss, "grad_loss");
  check_not_null(stats, "stats");
  check_not_null(grad, "grad");
  dispatch_dtype(args.student.dtype, [&](auto s_tag) {
    dispatch_dtype(args.teacher.dtype, [&](auto t_tag) {
      constexpr DType DS = decltype(s_tag)::value;
      constexpr DType DT = decltype(t_tag)::value;
      const bool transformed = transforms_logits(args.transforms);
      cpu::for_each_row(args.n_rows, n_threads, [&](int64_t row) {
        const int64_t target = target_of(args, row);
        if (target >= 0 && transformed) {
          transformed_dkd_backward_row<DS, DT>(args, alpha, row, target, grad_loss, stats, grad);
        } else if (target >= 0) {
          dkd_backward_row<DS, DT>(args, alpha, row, target, grad_loss, stats, grad);
        } else {  // ignored: zeros; out of range: NaN, as its loss
          fill_row<DS>(grad, row, args.n_cols, target == -1 ? 0.0f : kNan);
        }
      });
    });
  });
}

}  // namespace fastkd
