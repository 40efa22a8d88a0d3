// CPU kernels of the logits family (kd_rows, kl_div_rows): OpenMP over rows; inside a row the
// columns go in blocks of cpu::kBlock converted to scaled fp32 (common/cpu_rows.h), and every
// element loop is an `omp simd` loop over the shared math of logits/divergence_math.h.
//   forward_kl / reverse_kl: one pass (ShiftedKlStateT), jsd / skew_* / tvd: two passes,
//   backward: one pass. Extra memory: two blocks per thread; outputs O(N) besides the gradient.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "fastkd/common/cpu_rows.h"
#include "fastkd/common/dispatch.h"
#include "fastkd/logits/cpu_kd_rows.h"
#include "fastkd/logits/kd_rows.h"

namespace fastkd {
namespace {

using cpu::kBlock;
using cpu::LseState;
using cpu::load_scaled;
using cpu::lse_add_block;
using cpu::block_max;
using cpu::write_row_outputs;
using cpu::row_pointer;
using cpu::storage_t;
using ShiftedKlState = ShiftedKlStateT<double>;

bool row_is_active(const KdRowsArgs& args, int64_t row) {
  return args.labels == nullptr || args.labels[row] != args.ignore_index;
}

// ------------------------------------------------------------------------------------------
// Per-row kernels. student, teacher rows: (V,) strided, any of the three dtypes.
// ------------------------------------------------------------------------------------------

// forward_kl (REVERSE = false: KL(p‖q), the teacher weights the sum) or reverse_kl, one pass.
template <DType DS, DType DT, bool REVERSE>
FASTKD_ROW_CLONES void kl_forward_row(const KdRowsArgs& args, int64_t row, float* loss, float* stats) {
  alignas(64) float s[kBlock];
  alignas(64) float t[kBlock];
  const storage_t<DS>* s_row = row_pointer<DS>(args.student, row);
  const storage_t<DT>* t_row = row_pointer<DT>(args.teacher, row);
  const float inv_t = args.divergence.inv_temperature;
  const float* xa = REVERSE ? s : t;
  const float* xb = REVERSE ? t : s;
  ShiftedKlState state;
  for (int64_t col = 0; col < args.n_cols; col += kBlock) {
    const int64_t n = std::min(kBlock, args.n_cols - col);
    load_scaled<DS>(s_row, col, n, args.student.stride_col, inv_t, s);
    load_scaled<DT>(t_row, col, n, args.teacher.stride_col, inv_t, t);
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
    write_row_outputs(loss, stats, row, row_loss, state.a.m, state.a.log_sum(), state.b.m, state.b.log_sum(),
                      row_loss);
  } else {
    write_row_outputs(loss, stats, row, row_loss, state.b.m, state.b.log_sum(), state.a.m, state.a.log_sum(),
                      0.0f);
  }
}

// jsd, skew_forward_kl, skew_reverse_kl, tvd: normalisers first, then the terms needing p and q.
template <DType DS, DType DT, int DIV>
FASTKD_ROW_CLONES void two_pass_forward_row(const KdRowsArgs& args, int64_t row, float* loss, float* stats) {
  alignas(64) float s[kBlock];
  alignas(64) float t[kBlock];
  const storage_t<DS>* s_row = row_pointer<DS>(args.student, row);
  const storage_t<DT>* t_row = row_pointer<DT>(args.teacher, row);
  const DivergenceParams k = args.divergence;
  LseState lse_s, lse_t;
  for (int64_t col = 0; col < args.n_cols; col += kBlock) {
    const int64_t n = std::min(kBlock, args.n_cols - col);
    load_scaled<DS>(s_row, col, n, args.student.stride_col, k.inv_temperature, s);
    load_scaled<DT>(t_row, col, n, args.teacher.stride_col, k.inv_temperature, t);
    lse_add_block(lse_s, s, n);
    lse_add_block(lse_t, t, n);
  }
  const float m_s = lse_s.m, log_sum_s = lse_s.log_sum();
  const float m_t = lse_t.m, log_sum_t = lse_t.log_sum();
  double loss_total = 0.0, aux_total = 0.0;
  for (int64_t col = 0; col < args.n_cols; col += kBlock) {
    const int64_t n = std::min(kBlock, args.n_cols - col);
    load_scaled<DS>(s_row, col, n, args.student.stride_col, k.inv_temperature, s);
    load_scaled<DT>(t_row, col, n, args.teacher.stride_col, k.inv_temperature, t);
#pragma omp simd reduction(+ : loss_total, aux_total)
    for (int64_t i = 0; i < n; ++i) {
      float loss_term, aux_term;
      two_pass_terms<DIV>(log_prob(s[i], m_s, log_sum_s), log_prob(t[i], m_t, log_sum_t), k, loss_term, aux_term);
      loss_total += loss_term;
      aux_total += aux_term;
    }
  }
  write_row_outputs(loss, stats, row, static_cast<float>(loss_total), m_s, log_sum_s, m_t, log_sum_t,
                    static_cast<float>(aux_total));
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
        cpu::for_each_row(args.n_rows, n_threads, [&](int64_t row) {
          if (!row_is_active(args, row)) {
            write_row_outputs(loss, stats, row, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f);
          } else if constexpr (DIV == kForwardKl || DIV == kReverseKl) {
            kl_forward_row<DS, DT, DIV == kReverseKl>(args, row, loss, stats);
          } else {
            two_pass_forward_row<DS, DT, DIV>(args, row, loss, stats);
          }
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
        cpu::for_each_row(args.n_rows, n_threads, [&](int64_t row) {
          if (row_is_active(args, row)) {
            backward_row<DS, DT, DIV>(args, row, grad_loss, stats, grad);
          } else {  // every float dtype's zero is all-zero bits
            std::memset(static_cast<storage_t<DS>*>(grad) + row * args.n_cols, 0,
                        sizeof(storage_t<DS>) * args.n_cols);
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
