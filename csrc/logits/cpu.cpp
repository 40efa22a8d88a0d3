// CPU kernels of the logits family (kd_rows, kl_div_rows): OpenMP over rows; inside a row the
// columns go in blocks of cpu::kBlock converted to scaled fp32 (common/cpu_rows.h), and every
// element loop is an `omp simd` loop over the shared math of logits/divergence_math.h.
//   forward_kl / reverse_kl: one pass (ShiftedKlStateT), jsd / skew_* / tvd: two passes,
//   backward: one pass. Extra memory: two blocks per thread; outputs O(N) besides the gradient.
// The logit transforms (logits/transforms.h) are a template flag TR: false compiles the plain
// path exactly as before; true maps each block as it is loaded (logits/cpu_transforms.h).
// Standardize adds one pass per side before the forward (mean and std, saved in the stats) and,
// in the backward, one pass writing the gradient from an fp32 row of ∂L/∂z (O(V) per thread).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "fastkd/common/cpu_rows.h"
#include "fastkd/common/dispatch.h"
#include "fastkd/logits/cpu_kd_rows.h"
#include "fastkd/logits/cpu_transforms.h"
#include "fastkd/logits/kd_rows.h"

namespace fastkd {
namespace {

using cpu::kBlock;
using cpu::LseState;
using cpu::load_scaled;
using cpu::load_side;
using cpu::lse_add_block;
using cpu::block_max;
using cpu::write_row_outputs;
using cpu::row_pointer;
using cpu::storage_t;
using ShiftedKlState = ShiftedKlStateT<double>;

bool row_is_active(const KdRowsArgs& args, int64_t row) {
  return args.labels == nullptr || args.labels[row] != args.ignore_index;
}

// The stats of a row: the five of write_row_outputs, then under standardize the moments.
struct SideMoments {
  float mean_s = 0.0f, std_s = 0.0f, mean_t = 0.0f, std_t = 0.0f;
};

template <bool TR>
void write_kd_row(const KdRowsArgs& args, float* loss, float* stats, int64_t row, float row_loss, float max_s,
                  float log_sum_s, float max_t, float log_sum_t, float aux, const SideMoments& moments) {
  if constexpr (TR) {
    write_row_outputs(loss, stats, row, row_loss, max_s, log_sum_s, max_t, log_sum_t, aux, stats_width(args));
    if (args.transforms.standardize) {
      cpu::write_standardized_stats(stats, row, moments.mean_s, moments.std_s, moments.mean_t, moments.std_t);
    }
  } else {
    write_row_outputs(loss, stats, row, row_loss, max_s, log_sum_s, max_t, log_sum_t, aux);
  }
}

// ------------------------------------------------------------------------------------------
// Per-row kernels. student, teacher rows: (V,) strided, any of the three dtypes.
// ------------------------------------------------------------------------------------------

// forward_kl (REVERSE = false: KL(p‖q), the teacher weights the sum) or reverse_kl, one pass
// (plus the moments pass per side under standardize).
template <DType DS, DType DT, bool REVERSE, bool TR>
FASTKD_ROW_CLONES void kl_forward_row(const KdRowsArgs& args, int64_t row, float* loss, float* stats) {
  alignas(64) float s[kBlock];
  alignas(64) float t[kBlock];
  const storage_t<DS>* s_row = row_pointer<DS>(args.student, row);
  const storage_t<DT>* t_row = row_pointer<DT>(args.teacher, row);
  const float inv_t = args.divergence.inv_temperature;
  RowTransform tr_s{}, tr_t{};
  SideMoments moments;
  if constexpr (TR) {
    tr_s = cpu::forward_transform<DS>(args.transforms, args.transforms.student, s_row, args.n_cols,
                                      args.student.stride_col, inv_t, s, moments.mean_s, moments.std_s);
    tr_t = cpu::forward_transform<DT>(args.transforms, args.transforms.teacher, t_row, args.n_cols,
                                      args.teacher.stride_col, inv_t, t, moments.mean_t, moments.std_t);
  }
  const float* xa = REVERSE ? s : t;
  const float* xb = REVERSE ? t : s;
  ShiftedKlState state;
  for (int64_t col = 0; col < args.n_cols; col += kBlock) {
    const int64_t n = std::min(kBlock, args.n_cols - col);
    load_side<DS, TR>(s_row, col, n, args.student.stride_col, inv_t, tr_s, s);
    load_side<DT, TR>(t_row, col, n, args.teacher.stride_col, inv_t, tr_t, t);
    state.rescale(max_f(state.a.m, block_max(xa, n)), max_f(state.b.m, block_max(xb, n)));
    const float m_a = state.a.m;
    const float m_b = state.b.m;
    double z_a = 0.0, z_b = 0.0, acc = 0.0;
#pragma omp simd reduction(+ : z_a, z_b, acc)
    for (int64_t i = 0; i < n; ++i) {
      float w, e_b, term;
      kl_element_terms(xa[i], xb[i], m_a, m_b, w, e_b, term);
      z_a += w;
      z_b += e_b;
      acc += term;
    }
    state.a.z += z_a;
    state.b.z += z_b;
    state.acc += acc;
  }
  const float row_loss = state.loss();
  // aux as in divergences.row_loss_and_aux: 0 for forward KL, the loss for reverse KL.
  if (REVERSE) {
    write_kd_row<TR>(args, loss, stats, row, row_loss, state.a.m, state.a.log_sum(), state.b.m, state.b.log_sum(),
                     row_loss, moments);
  } else {
    write_kd_row<TR>(args, loss, stats, row, row_loss, state.b.m, state.b.log_sum(), state.a.m, state.a.log_sum(),
                     0.0f, moments);
  }
}

// jsd, skew_forward_kl, skew_reverse_kl, tvd: normalisers first, then the terms needing p and q.
template <DType DS, DType DT, int DIV, bool TR>
FASTKD_ROW_CLONES void two_pass_forward_row(const KdRowsArgs& args, int64_t row, float* loss, float* stats) {
  alignas(64) float s[kBlock];
  alignas(64) float t[kBlock];
  const storage_t<DS>* s_row = row_pointer<DS>(args.student, row);
  const storage_t<DT>* t_row = row_pointer<DT>(args.teacher, row);
  const DivergenceParams k = args.divergence;
  RowTransform tr_s{}, tr_t{};
  SideMoments moments;
  if constexpr (TR) {
    tr_s = cpu::forward_transform<DS>(args.transforms, args.transforms.student, s_row, args.n_cols,
                                      args.student.stride_col, k.inv_temperature, s, moments.mean_s, moments.std_s);
    tr_t = cpu::forward_transform<DT>(args.transforms, args.transforms.teacher, t_row, args.n_cols,
                                      args.teacher.stride_col, k.inv_temperature, t, moments.mean_t, moments.std_t);
  }
  LseState lse_s, lse_t;
  for (int64_t col = 0; col < args.n_cols; col += kBlock) {
    const int64_t n = std::min(kBlock, args.n_cols - col);
    load_side<DS, TR>(s_row, col, n, args.student.stride_col, k.inv_temperature, tr_s, s);
    load_side<DT, TR>(t_row, col, n, args.teacher.stride_col, k.inv_temperature, tr_t, t);
    lse_add_block(lse_s, s, n);
    lse_add_block(lse_t, t, n);
  }
  const float m_s = lse_s.m, log_sum_s = lse_s.log_sum();
  const float m_t = lse_t.m, log_sum_t = lse_t.log_sum();
  double loss_total = 0.0, aux_total = 0.0;
  for (int64_t col = 0; col < args.n_cols; col += kBlock) {
    const int64_t n = std::min(kBlock, args.n_cols - col);
    load_side<DS, TR>(s_row, col, n, args.student.stride_col, k.inv_temperature, tr_s, s);
    load_side<DT, TR>(t_row, col, n, args.teacher.stride_col, k.inv_temperature, tr_t, t);
#pragma omp simd reduction(+ : loss_total, aux_total)
    for (int64_t i = 0; i < n; ++i) {
      float loss_term, aux_term;
      two_pass_terms<DIV>(log_prob(s[i], m_s, log_sum_s), log_prob(t[i], m_t, log_sum_t), k, loss_term, aux_term);
      loss_total += loss_term;
      aux_total += aux_term;
    }
  }
  write_kd_row<TR>(args, loss, stats, row, static_cast<float>(loss_total), m_s, log_sum_s, m_t, log_sum_t,
                   static_cast<float>(aux_total), moments);
}

// grad row: (V,) contiguous, the student's dtype.
template <DType DS, DType DT, int DIV>
FASTKD_ROW_CLONES void backward_row(const KdRowsArgs& args, int64_t row, const float* grad_loss,
                                    const float* stats, void* grad) {
  storage_t<DS>* g_row = static_cast<storage_t<DS>*>(grad) + row * args.n_cols;
  alignas(64) float s[kBlock];
  alignas(64) float t[kBlock];
  const storage_t<DS>* s_row = row_pointer<DS>(args.student, row);
  const storage_t<DT>* t_row = row_pointer<DT>(args.teacher, row);
  const DivergenceParams k = args.divergence;
  const float* row_stats = stats + row * kNumStats;
  const float m_s = row_stats[kMaxS], log_sum_s = row_stats[kLogSumS];
  const float m_t = row_stats[kMaxT], log_sum_t = row_stats[kLogSumT];
  const float aux = row_stats[kAux];
  // ∂L/∂student = ∂L/∂s / T, times the upstream gradient of this row's loss.
  const float scale = grad_loss[row] * k.inv_temperature;
  for (int64_t col = 0; col < args.n_cols; col += kBlock) {
    const int64_t n = std::min(kBlock, args.n_cols - col);
    load_scaled<DS>(s_row, col, n, args.student.stride_col, k.inv_temperature, s);
    load_scaled<DT>(t_row, col, n, args.teacher.stride_col, k.inv_temperature, t);
    storage_t<DS>* out = g_row + col;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float g = grad_scaled_student<DIV>(log_prob(s[i], m_s, log_sum_s), log_prob(t[i], m_t, log_sum_t),
                                               aux, k);
      out[i] = Element<DS>::from_float(g * scale);
    }
  }
}

// The backward with transforms. Without standardize one pass: ∂L/∂y times dy/dx per element.
// With it, pass 1 writes G = ∂L/∂z into the thread's fp32 scratch row and sums G and G·z; pass 2
// (cpu::write_standardized_grad) applies the standardisation's chain rule and dy/dx.
template <DType DS, DType DT, int DIV>
FASTKD_ROW_CLONES void transformed_backward_row(const KdRowsArgs& args, int64_t row, const float* grad_loss,
                                                const float* stats, void* grad) {
  storage_t<DS>* g_row = static_cast<storage_t<DS>*>(grad) + row * args.n_cols;
  alignas(64) float s[kBlock];
  alignas(64) float t[kBlock];
  alignas(64) float d[kBlock];
  const storage_t<DS>* s_row = row_pointer<DS>(args.student, row);
  const storage_t<DT>* t_row = row_pointer<DT>(args.teacher, row);
  const DivergenceParams k = args.divergence;
  const LogitTransforms& all = args.transforms;
  const bool standardize = all.standardize != 0;
  const float* row_stats = stats + row * stats_width(args);
  const float m_s = row_stats[kMaxS], log_sum_s = row_stats[kLogSumS];
  const float m_t = row_stats[kMaxT], log_sum_t = row_stats[kLogSumT];
  const float aux = row_stats[kAux];
  const float std_s = standardize ? row_stats[kStdS] : 0.0f;
  const RowTransform tr_s = cpu::saved_transform(all, all.student, standardize ? row_stats[kMeanS] : 0.0f, std_s,
                                                 k.inv_temperature);
  const RowTransform tr_t = cpu::saved_transform(all, all.teacher, standardize ? row_stats[kMeanT] : 0.0f,
                                                 standardize ? row_stats[kStdT] : 0.0f, k.inv_temperature);
  const float scale = grad_loss[row] * k.inv_temperature;
  float* g_z = standardize ? cpu::row_scratch(args.n_cols) : nullptr;
  double sum_g = 0.0, sum_gs = 0.0;
  for (int64_t col = 0; col < args.n_cols; col += kBlock) {
    const int64_t n = std::min(kBlock, args.n_cols - col);
    cpu::load_transformed<DS>(s_row, col, n, args.student.stride_col, tr_s, s);
    cpu::load_transformed<DT>(t_row, col, n, args.teacher.stride_col, tr_t, t);
    if (standardize) {
      float* out = g_z + col;
#pragma omp simd reduction(+ : sum_g, sum_gs)
      for (int64_t i = 0; i < n; ++i) {
        const float g = grad_scaled_student<DIV>(log_prob(s[i], m_s, log_sum_s), log_prob(t[i], m_t, log_sum_t),
                                                 aux, k) * scale;
        out[i] = g;
        sum_g += g;
        sum_gs += g * s[i];
      }
    } else {
      cpu::load_derivative<DS>(s_row, col, n, args.student.stride_col, tr_s, d);
      storage_t<DS>* out = g_row + col;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float g = grad_scaled_student<DIV>(log_prob(s[i], m_s, log_sum_s), log_prob(t[i], m_t, log_sum_t),
                                                 aux, k);
        out[i] = Element<DS>::from_float(g * scale * d[i]);
      }
    }
  }
  if (standardize) {
    // Σ G·z = Σ G·s / (1/T): the loaded s is z / T.
    const StandardizeGrad chain = standardize_grad(sum_g, sum_gs / k.inv_temperature, std_s, all.eps, args.n_cols);
    cpu::write_standardized_grad<DS>(s_row, args.n_cols, args.student.stride_col, tr_s, chain, g_z, g_row);
  }
}

template <DType DI, DType DT>
FASTKD_ROW_CLONES void kl_div_forward_row(const KlDivRowsArgs& args, int64_t row, float* out) {
  alignas(64) float x[kBlock];
  alignas(64) float y[kBlock];
  const storage_t<DI>* x_row = row_pointer<DI>(args.input, row);
  const storage_t<DT>* y_row = row_pointer<DT>(args.target, row);
  const bool log_target = args.log_target;
  double total = 0.0;
  for (int64_t col = 0; col < args.n_cols; col += kBlock) {
    const int64_t n = std::min(kBlock, args.n_cols - col);
    load_scaled<DI>(x_row, col, n, args.input.stride_col, 1.0f, x);
    load_scaled<DT>(y_row, col, n, args.target.stride_col, 1.0f, y);
    // Not `omp simd`: the non-log target needs libm's logf, a scalar call.
    for (int64_t i = 0; i < n; ++i) total += kl_div_term(x[i], y[i], log_target);
  }
  out[row] = static_cast<float>(total);
}

template <DType DI, DType DT>
FASTKD_ROW_CLONES void kl_div_backward_row(const KlDivRowsArgs& args, int64_t row, const float* grad_rows,
                                           void* grad) {
  storage_t<DI>* g_row = static_cast<storage_t<DI>*>(grad) + row * args.n_cols;
  alignas(64) float y[kBlock];
  const storage_t<DT>* y_row = row_pointer<DT>(args.target, row);
  const bool log_target = args.log_target;
  const float scale = -grad_rows[row];
  for (int64_t col = 0; col < args.n_cols; col += kBlock) {
    const int64_t n = std::min(kBlock, args.n_cols - col);
    load_scaled<DT>(y_row, col, n, args.target.stride_col, 1.0f, y);
    storage_t<DI>* out = g_row + col;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = Element<DI>::from_float(kl_div_target_prob(y[i], log_target) * scale);
  }
}

}  // namespace

void kd_rows_forward_cpu(const KdRowsArgs& args, float* loss, float* stats, int n_threads) {
  check_kd_rows_args(args);
  if (args.n_rows == 0) return;
  check_not_null(loss, "loss");
  check_not_null(stats, "stats");
  dispatch_dtype(args.student.dtype, [&](auto s_tag) {
    dispatch_dtype(args.teacher.dtype, [&](auto t_tag) {
      dispatch_divergence(args.divergence.code, [&](auto div_tag) {
        constexpr DType DS = decltype(s_tag)::value;
        constexpr DType DT = decltype(t_tag)::value;
        constexpr int DIV = decltype(div_tag)::value;
        dispatch_bool(transforms_logits(args.transforms), [&](auto tr_tag) {
          constexpr bool TR = decltype(tr_tag)::value;
          cpu::for_each_row(args.n_rows, n_threads, [&](int64_t row) {
            if (!row_is_active(args, row)) {
              write_kd_row<TR>(args, loss, stats, row, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, SideMoments{});
            } else if constexpr (DIV == kForwardKl || DIV == kReverseKl) {
              kl_forward_row<DS, DT, DIV == kReverseKl, TR>(args, row, loss, stats);
            } else {
              two_pass_forward_row<DS, DT, DIV, TR>(args, row, loss, stats);
            }
          });
        });
      });
    });
  });
}

void kd_rows_backward_cpu(const KdRowsArgs& args, const float* grad_loss, const float* stats, void* grad,
                          int n_threads) {
  check_kd_rows_args(args);
  if (args.n_rows == 0) return;
  check_not_null(grad_loss, "grad_loss");
  check_not_null(stats, "stats");
  check_not_null(grad, "grad");
  dispatch_dtype(args.student.dtype, [&](auto s_tag) {
    dispatch_dtype(args.teacher.dtype, [&](auto t_tag) {
      dispatch_divergence(args.divergence.code, [&](auto div_tag) {
        constexpr DType DS = decltype(s_tag)::value;
        constexpr DType DT = decltype(t_tag)::value;
        constexpr int DIV = decltype(div_tag)::value;
        const bool transformed = transforms_logits(args.transforms);
        cpu::for_each_row(args.n_rows, n_threads, [&](int64_t row) {
          if (!row_is_active(args, row)) {  // every float dtype's zero is all-zero bits
            std::memset(static_cast<storage_t<DS>*>(grad) + row * args.n_cols, 0,
                        sizeof(storage_t<DS>) * args.n_cols);
          } else if (transformed) {
            transformed_backward_row<DS, DT, DIV>(args, row, grad_loss, stats, grad);
          } else {
            backward_row<DS, DT, DIV>(args, row, grad_loss, stats, grad);
          }
        });
      });
    });
  });
}

void kl_div_rows_forward_cpu(const KlDivRowsArgs& args, float* out, int n_threads) {
  check_kl_div_rows_args(args);
  if (args.n_rows == 0) return;
  check_not_null(out, "out");
  dispatch_dtype(args.input.dtype, [&](auto i_tag) {
    dispatch_dtype(args.target.dtype, [&](auto t_tag) {
      constexpr DType DI = decltype(i_tag)::value;
      constexpr DType DT = decltype(t_tag)::value;
      cpu::for_each_row(args.n_rows, n_threads, [&](int64_t row) { kl_div_forward_row<DI, DT>(args, row, out); });
    });
  });
}

void kl_div_rows_backward_cpu(const KlDivRowsArgs& args, const float* grad_rows, void* grad, int n_threads) {
  check_kl_div_rows_args(args);
  if (args.n_rows == 0) return;
  check_not_null(grad_rows, "grad_rows");
  check_not_null(grad, "grad");
  dispatch_dtype(args.input.dtype, [&](auto i_tag) {
    dispatch_dtype(args.target.dtype, [&](auto t_tag) {
      constexpr DType DI = decltype(i_tag)::value;
      constexpr DType DT = decltype(t_tag)::value;
      cpu::for_each_row(args.n_rows, n_threads,
                        [&](int64_t row) { kl_div_backward_row<DI, DT>(args, row, grad_rows, grad); });
    });
  });
}

}  // namespace fastkd
