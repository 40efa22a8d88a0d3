// Entry points of the cross-entropy family: hard-label cross-entropy rows at temperature 1, with
// the semantics of fastkd/backends/triton/cross_entropy.py. CPU: csrc/cross_entropy/cpu.cpp,
// CUDA: csrc/cross_entropy/cuda.cu (csrc/cuda_stubs.cpp in builds without CUDA); bound in
// csrc/bindings/cross_entropy.cpp for fastkd/backends/native_ce.py.
#pragma once

#include <cstdint>

#include "fastkd/common/errors.h"
#include "fastkd/common/rows_view.h"
#include "fastkd/cross_entropy/contract.h"

namespace fastkd {

// logits: (N, V) fp32|fp16|bf16 with contiguous rows (stride_col 1; 2-D: inner 1);
// labels: (N,) int64. A row whose label is ignore_index is ignored.
struct CeRowsArgs {
  int64_t n_rows;
  int64_t n_cols;
  RowsView logits;
  const int64_t* labels;
  int64_t ignore_index;
};

// The (N, V) gradient block the backward adds into, in place: fp32|fp16|bf16, rows contiguous,
// row r at element r·stride_row.
struct GradRows {
  void* data;
  DType dtype;
  int64_t stride_row;
};

// Forward: loss (N,) fp32 = (max − x[label]) + log_sum, NaN for a label outside [0, V);
// stats (N, 2) fp32 (CeStatsColumn). Ignored rows read nothing and get zeros in both.
// Backward: out[i] += grad_loss[i]·(softmax(x_i) − onehot(label_i)), computed in fp32 and rounded
// once to out's dtype; ignored rows are neither read nor written (their stats are zeros, which
// no exponential may meet); an active row with an out-of-range label becomes NaN.
// CPU: n_threads as in common/threads.h. CUDA: enqueued on `stream` (a cudaStream_t as an
// integer) of `device`, no host synchronisation.
void ce_rows_forward_cpu(const CeRowsArgs& args, float* loss, float* stats, int n_threads);
void ce_rows_backward_cpu(const CeRowsArgs& args, const float* grad_loss, const float* stats, const GradRows& out,
                          int n_threads);
void ce_rows_forward_cuda(const CeRowsArgs& args, float* loss, float* stats, int device, uintptr_t stream);
void ce_rows_backward_cuda(const CeRowsArgs& args, const float* grad_loss, const float* stats, const GradRows& out,
                           int device, uintptr_t stream);

// Shared by the CPU and CUDA launchers; run before any CUDA call. Nothing to check without rows.
inline void check_ce_rows_args(const CeRowsArgs& args) {
  if (args.n_rows < 0 || args.n_cols < 1) throw_invalid("n_rows/n_cols", " must be >= 0 and >= 1");
  if (args.n_rows == 0) return;
  check_rows_view(args.logits, "logits");
  if (args.logits.stride_col != 1) throw_invalid("logits", " rows must be contiguous (stride_col 1)");
  check_not_null(args.labels, "labels");
}

inline void check_grad_rows(const GradRows& out) {
  if (!is_kernel_dtype(out.dtype)) throw_invalid("out", " must be float32, float16 or bfloat16 (dtype code 0, 1 or 2)");
  check_not_null(out.data, "out");
}

}  // namespace fastkd
