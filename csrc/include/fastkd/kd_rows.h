// Entry points of the kd_rows and kl_div_rows kernels (CPU: csrc/cpu/kd_rows.cpp, CUDA:
// csrc/cuda/kd_rows.cu), called by csrc/bindings.cpp with raw addresses from Python.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "fastkd/dtypes.h"
#include "fastkd/kd_math.h"

namespace fastkd {

// The rows of a 2-D (N, V) or 3-D (B, T, V) tensor: row r starts at element
// (r / inner)·stride_outer + (r % inner)·stride_inner (inner = T; 1 with stride_inner 0 for 2-D).
// Offsets are int64: N·V may exceed 2^31.
struct RowsView {
  const void* data;
  DType dtype;
  int64_t inner;
  int64_t stride_outer;
  int64_t stride_inner;
  int64_t stride_col;
};

// The two logit tensors of one call, with optional labels (int64 (N,), nullptr when absent).
struct KdRowsArgs {
  int64_t n_rows;
  int64_t n_cols;
  RowsView student;
  RowsView teacher;
  const int64_t* labels;
  int64_t ignore_index;
  int divergence;  // a Divergence code
  DivergenceParams params;
};

// Forward: loss (N,) fp32 and stats (N, 5) fp32 (StatsColumn), zeros on ignored rows.
// Backward: grad (N, V) contiguous in the student's dtype from grad_loss (N,) fp32 and stats.
// Throw std::invalid_argument on bad arguments and std::runtime_error on CUDA errors.
void kd_rows_forward_cpu(const KdRowsArgs& args, float* loss, float* stats, int n_threads);
void kd_rows_backward_cpu(const KdRowsArgs& args, const float* grad_loss, const float* stats, void* grad,
                          int n_threads);
// kl_div_rows: the student view is the input (log-probabilities), the teacher view the target.
// Forward: out (N,) fp32 = Σ_V target·(log target − input). Backward: grad (N, V) contiguous in
// the input's dtype = −target_prob·grad_rows.
void kl_div_rows_forward_cpu(const KdRowsArgs& args, bool log_target, float* out, int n_threads);
void kl_div_rows_backward_cpu(const KdRowsArgs& args, bool log_target, const float* grad_rows, void* grad,
                              int n_threads);

// CUDA versions: enqueue on `stream` (a cudaStream_t as an integer) of device `device`; no host
// synchronisation. Defined only in builds with FASTKD_WITH_CUDA.
void kd_rows_forward_cuda(const KdRowsArgs& args, float* loss, float* stats, int device, uintptr_t stream);
void kd_rows_backward_cuda(const KdRowsArgs& args, const float* grad_loss, const float* stats, void* grad,
                           int device, uintptr_t stream);
void kl_div_rows_forward_cuda(const KdRowsArgs& args, bool log_target, float* out, int device,
                              uintptr_t stream);
void kl_div_rows_backward_cuda(const KdRowsArgs& args, bool log_target, const float* grad_rows, void* grad,
                               int device, uintptr_t stream);

[[noreturn]] inline void throw_invalid(const char* name, const char* what) {
  throw std::invalid_argument(std::string("fastkd: ") + name + what);
}

// Argument checks shared by both (defined inline: the CUDA file calls them too).
inline void check_kd_rows_args(const KdRowsArgs& args, bool needs_divergence) {
  auto check_view = [](const RowsView& view, const char* name) {
    const int code = static_cast<int>(view.dtype);
    if (code < 0 || code > 2) throw_invalid(name, " must be float32, float16 or bfloat16 (dtype code 0, 1 or 2)");
    if (view.inner < 1) throw_invalid(name, " has inner row count < 1");
    if (view.data == nullptr) throw_invalid(name, " is a null pointer");
  };
  if (args.n_rows < 0 || args.n_cols < 1) throw_invalid("n_rows/n_cols", " must be >= 0 and >= 1");
  if (args.n_rows == 0) return;
  check_view(args.student, "student");
  check_view(args.teacher, "teacher");
  if (needs_divergence && (args.divergence < kForwardKl || args.divergence > kTvd))
    throw_invalid("divergence", " code must be 0..5");
}

}  // namespace fastkd
