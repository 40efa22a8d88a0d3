// Entry points of the logits family: the kd_rows kernels (a divergence between student and
// teacher logit rows) and the kl_div_rows kernels (torch.nn.functional.kl_div's pointwise terms
// summed per row). CPU: csrc/logits/cpu.cpp, CUDA: csrc/logits/cuda.cu (csrc/cuda_stubs.cpp in
// builds without CUDA); bound in csrc/bindings/logits.cpp.
#pragma once

#include <cstdint>
#include <type_traits>

#include "fastkd/common/errors.h"
#include "fastkd/common/rows_view.h"
#include "fastkd/logits/contract.h"
#include "fastkd/logits/divergence_math.h"
#include "fastkd/logits/transforms.h"

namespace fastkd {

// The two logit tensors of one kd_rows call, with optional labels (int64 (N,), nullptr when absent),
// and the per-side logit transforms applied before the temperature (logits/transforms.h).
struct KdRowsArgs {
  int64_t n_rows;
  int64_t n_cols;
  RowsView student;
  RowsView teacher;
  const int64_t* labels;
  int64_t ignore_index;
  DivergenceParams divergence;
  LogitTransforms transforms;
};

// Columns of a call's stats rows: kNumStats, or kNumStatsStandardized with standardize.
FASTKD_HOST_DEVICE int64_t stats_width(const KdRowsArgs& args) {
  if (args.transforms.standardize) return kNumStatsStandardized;  // two enums: no ?: between them (-Wenum-compare)
  return kNumStats;
}

// kl_div_rows: input (log-probabilities) and target (probabilities, or log-probabilities if
// log_target). No labels: every row is computed.
struct KlDivRowsArgs {
  int64_t n_rows;
  int64_t n_cols;
  RowsView input;
  RowsView target;
  bool log_target;
};

// kd_rows forward: loss (N,) fp32 and stats (N, stats_width) fp32 (StatsColumn, then with
// standardize StandardizedStatsColumn), zeros on ignored rows.
// kd_rows backward: grad (N, V) contiguous in the student's dtype from grad_loss (N,) fp32 and
// stats; zeros on ignored rows.
// kl_div_rows forward: out (N,) fp32 = Σ_V target·(log target − input). Backward: grad (N, V)
// contiguous in the input's dtype = −target_prob·grad_rows.
// CPU: n_threads as in common/threads.h. CUDA: enqueued on `stream` (a cudaStream_t as an
// integer) of `device`, no host synchronisation.
// All throw std::invalid_argument on bad arguments and std::runtime_error on CUDA errors.
void kd_rows_forward_cpu(const KdRowsArgs& args, float* loss, float* stats, int n_threads);
void kd_rows_backward_cpu(const KdRowsArgs& args, const float* grad_loss, const float* stats, void* grad,
                          int n_threads);
void kl_div_rows_forward_cpu(const KlDivRowsArgs& args, float* out, int n_threads);
void kl_div_rows_backward_cpu(const KlDivRowsArgs& args, const float* grad_rows, void* grad, int n_threads);

void kd_rows_forward_cuda(const KdRowsArgs& args, float* loss, float* stats, int device, uintptr_t stream);
void kd_rows_backward_cuda(const KdRowsArgs& args, const float* grad_loss, const float* stats, void* grad,
                           int device, uintptr_t stream);
void kl_div_rows_forward_cuda(const KlDivRowsArgs& args, float* out, int device, uintptr_t stream);
void kl_div_rows_backward_cuda(const KlDivRowsArgs& args, const float* grad_rows, void* grad, int device,
                               uintptr_t stream);

// Argument checks shared by the CPU and CUDA launchers; run before any CUDA call.
inline void check_transforms(const LogitTransforms& tr) {
  // Written as negations so that NaN fails too.
  if (!(tr.student.scale > 0.0f) || !(tr.teacher.scale > 0.0f)) throw_invalid("logit_scale", " must be > 0");
  if (!(tr.student.softcap >= 0.0f) || !(tr.teacher.softcap >= 0.0f)) {
    throw_invalid("softcap", " must be >= 0 (0: none)");
  }
  if (tr.standardize != 0 && tr.standardize != 1) throw_invalid("standardize", " must be 0 or 1");
  if (tr.standardize && !(tr.eps > 0.0f)) throw_invalid("standardize_eps", " must be > 0");
}

inline void check_row_count(int64_t n_rows, int64_t n_cols) {
  if (n_rows < 0 || n_cols < 1) throw_invalid("n_rows/n_cols", " must be >= 0 and >= 1");
}

inline void check_kd_rows_args(const KdRowsArgs& args) {
  check_row_count(args.n_rows, args.n_cols);
  if (args.n_rows == 0) return;
  check_rows_view(args.student, "student");
  check_rows_view(args.teacher, "teacher");
  if (args.divergence.code < kForwardKl || args.divergence.code > kTvd) throw_invalid("divergence", " code must be 0..5");
  check_transforms(args.transforms);
}

inline void check_kl_div_rows_args(const KlDivRowsArgs& args) {
  check_row_count(args.n_rows, args.n_cols);
  if (args.n_rows == 0) return;
  check_rows_view(args.input, "input");
  check_rows_view(args.target, "target");
}

template <int V>
using divergence_tag = std::integral_constant<int, V>;

// Divergence code → compile-time template argument (f is called with a divergence_tag).
template <class F>
void dispatch_divergence(int divergence, F&& f) {
  switch (divergence) {
    case kForwardKl: f(divergence_tag<kForwardKl>{}); return;
    case kReverseKl: f(divergence_tag<kReverseKl>{}); return;
    case kJsd: f(divergence_tag<kJsd>{}); return;
    case kSkewForwardKl: f(divergence_tag<kSkewForwardKl>{}); return;
    case kSkewReverseKl: f(divergence_tag<kSkewReverseKl>{}); return;
    case kTvd: f(divergence_tag<kTvd>{}); return;
    default: throw_invalid("divergence", " code must be 0..5");
  }
}

}  // namespace fastkd
