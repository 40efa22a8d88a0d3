// Entry points of the batched log-domain Sinkhorn forward (CPU: csrc/sinkhorn/cpu.cpp, CUDA:
// csrc/sinkhorn/cuda.cu, csrc/cuda_stubs.cpp in builds without CUDA), bound in
// csrc/bindings/sinkhorn.cpp for fastkd/backends/native_sinkhorn.py. The backward stays in
// PyTorch (backends/torch_sinkhorn.py).
#pragma once

#include <cstdint>

#include "fastkd/common/dispatch.h"
#include "fastkd/common/dtypes.h"
#include "fastkd/common/errors.h"

namespace fastkd {

// The cost matrices: (B, n, m), or one (n, m) shared by the batch with stride_b = 0;
// fp32|fp16|bf16, strides in elements.
struct CostView {
  const void* data;
  DType dtype;
  int64_t stride_b;
  int64_t stride_n;
  int64_t stride_m;
};

struct SinkhornArgs {
  int64_t n_problems;  // B
  int64_t n;
  int64_t m;
  CostView cost;
  const float* a;  // (B, n) fp32 contiguous
  const float* b;  // (B, m) fp32 contiguous
  float eps;
  int max_iter;  // ≥ 1
  float tol;     // < 0: exactly max_iter iterations
  bool save_history;
  bool return_plan;
};

// All fp32 (n_iter int32), contiguous: value, value_linear, err (B,); f̃ (B, n); g̃ (B, m);
// plan (B, n, m) if return_plan; f̃ history (B, max_iter, n), g̃ history (B, max_iter, m) if
// save_history (entries after a problem's last iteration are left untouched).
struct SinkhornOutputs {
  float* value;
  float* value_linear;
  float* f;
  float* g;
  int32_t* n_iter;
  float* err;
  float* plan;
  float* f_hist;
  float* g_hist;
};

// CPU: n_threads as in common/threads.h. CUDA: enqueued on `stream` (a cudaStream_t as an
// integer) of `device`; workspace: B·(3n + 4m) fp32 of device memory.
void sinkhorn_forward_cpu(const SinkhornArgs& args, const SinkhornOutputs& out, int n_threads);
void sinkhorn_forward_cuda(const SinkhornArgs& args, const SinkhornOutputs& out, float* workspace, int device,
                           uintptr_t stream);

inline void check_sinkhorn_args(const SinkhornArgs& args, const SinkhornOutputs& out) {
  if (args.n_problems < 0 || args.n < 1 || args.m < 1) throw_invalid("B/n/m", " must be >= 0, >= 1 and >= 1");
  if (!is_kernel_dtype(args.cost.dtype)) throw_invalid("cost", " must be float32, float16 or bfloat16 (dtype code 0, 1 or 2)");
  if (!(args.eps > 0.0f)) throw_invalid("eps", " must be > 0");
  if (args.max_iter < 1) throw_invalid("max_iter", " must be >= 1");
  if (args.n_problems == 0) return;
  if (args.cost.data == nullptr || args.a == nullptr || args.b == nullptr) throw_invalid("cost/a/b", " is a null pointer");
  if (out.value == nullptr || out.value_linear == nullptr || out.f == nullptr || out.g == nullptr ||
      out.n_iter == nullptr || out.err == nullptr)
    throw_invalid("outputs", " hold a null pointer");
  if (args.return_plan && out.plan == nullptr) throw_invalid("plan", " is a null pointer but return_plan is set");
  if (args.save_history && (out.f_hist == nullptr || out.g_hist == nullptr))
    throw_invalid("f_hist/g_hist", " is a null pointer but save_history is set");
}

}  // namespace fastkd
