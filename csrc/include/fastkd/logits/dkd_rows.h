// Entry points of decoupled KD (divergence "dkd", fastkd/divergences.py): a kd_rows
// call whose labels (required) split each row into the target class y and the rest.
//   loss_i = alpha·TCKD + beta·NCKD, TCKD = KL([p_y, 1 − p_y] ‖ [q_y, 1 − q_y]),
//   NCKD = KL(p̂ ‖ q̂) over the classes j ≠ y renormalised.
// args.divergence supplies inv_temperature and param = beta (its code is not read); alpha apart.
// Forward: loss (N,) fp32, stats (N, stats_width) fp32 with the max and log-sum-exp offset of the
// non-target classes per side and aux = q_y − p_y (then, with standardize, each side's mean and
// std over all V classes: the transforms come first); zeros on ignored rows; a label outside
// [0, V) that is not ignore_index gives a NaN loss. Backward: grad (N, V) contiguous in the
// student's dtype; zeros on ignored rows, NaN on rows with an out-of-range label.
// CPU: csrc/logits/dkd_cpu.cpp, CUDA: csrc/logits/cuda.cu (dkd kernels; csrc/cuda_stubs.cpp
// without CUDA). Bound in csrc/bindings/logits.cpp.
#pragma once

#include "fastkd/logits/kd_rows.h"

namespace fastkd {

void dkd_rows_forward_cpu(const KdRowsArgs& args, float alpha, float* loss, float* stats, int n_threads);
void dkd_rows_backward_cpu(const KdRowsArgs& args, float alpha, const float* grad_loss, const float* stats,
                           void* grad, int n_threads);
void dkd_rows_forward_cuda(const KdRowsArgs& args, float alpha, float* loss, float* stats, int device,
                           uintptr_t stream);
void dkd_rows_backward_cuda(const KdRowsArgs& args, float alpha, const float* grad_loss, const float* stats,
                            void* grad, int device, uintptr_t stream);

inline void check_dkd_rows_args(const KdRowsArgs& args) {
  check_row_count(args.n_rows, args.n_cols);
  if (args.n_rows == 0) return;
  check_rows_view(args.student, "student");
  check_rows_view(args.teacher, "teacher");
  if (args.labels == nullptr) throw_invalid("labels", " are required by dkd (the target class of each row)");
  if (args.n_cols < 2) throw_invalid("n_cols", " must be >= 2 for dkd (a target and the rest)");
  check_transforms(args.transforms);
}

}  // namespace fastkd
