// CUDA kernels of the cross-entropy family (hard-label rows at temperature 1), mirroring
// fastkd/backends/triton/cross_entropy.py. One thread block per row; each thread keeps fp32
// partial state, the block merges it (common/cuda_rows.h). A row is read in 16-byte packs after a
// scalar head that brings it to 16-byte alignment, so odd V (50257, 32003) still loads in packs.
//   forward: one pass (streamed max and Σ exp), then the label's logit; loss (N,), stats (N, 2).
//   backward: one pass adding grad_loss·(softmax − onehot) into the caller's block, in place.
// Ignored rows are neither read nor (backward) written. No host synchronisation.
#include <cuda_runtime.h>

#include <cstdint>

#include "fastkd/common/cuda_check.h"
#include "fastkd/common/cuda_rows.h"
#include "fastkd/common/dispatch.h"
#include "fastkd/common/lse_state.h"
#include "fastkd/cross_entropy/ce_rows.h"

namespace fastkd {
namespace {

using cuda::Pack;
using cuda::block_reduce;
using cuda::is_aligned;
using cuda::kMaxThreads;
using cuda::load_pack;
using cuda::storage_t;
using cuda::unpack_scaled;

// Packs a thread loads before it uses any, so that ≥ 64 KiB are in flight per SM even with a
// single resident block of 512 threads (Little's law: 3 TB/s × 1 µs / 132 SMs ≈ 22 KiB needed; the
// reasoning of csrc/logits/cuda.cu kUnroll), 128 KiB at the two blocks the kernels are compiled
// for. Forward: one tensor, 512 × 8 × 16 B = 64 KiB per block. Backward: logits and the gradient
// block, 512 × 4 × 16 B × 2 = 64 KiB per block (48 KiB when one of them is 16-bit, the other fp32).
constexpr int kForwardUnroll = 8;
constexpr int kBackwardUnroll = 4;

__device__ __forceinline__ bool label_in_range(int64_t label, int64_t n_cols) { return label >= 0 && label < n_cols; }

// Elements before row + head is aligned to a pack of VEC elements of T (< VEC; at most n_cols).
template <class T, int VEC>
__device__ __forceinline__ int64_t aligned_head(const T* row, int64_t n_cols) {
  constexpr uintptr_t kPackBytes = sizeof(T) * VEC;
  const uintptr_t misaligned = reinterpret_cast<uintptr_t>(row) % kPackBytes;
  const int64_t head = misaligned == 0 ? 0 : static_cast<int64_t>((kPackBytes - misaligned) / sizeof(T));
  return head < n_cols ? head : n_cols;
}

// Adds one logit to a thread's streamed log-sum-exp.
__device__ __forceinline__ void lse_add(LseStateT<float>& lse, float x) {
  const float m = max_f(lse.m, x);
  if (m != lse.m) lse.rescale(m);
  lse.z += kd_exp(x - m);
}

// ------------------------------------------------------------------------------------------
// Kernels. Grid: one block per row (N blocks). logits: (N, V) rows contiguous (RowsView);
// labels: (N,) int64; loss: (N,) fp32; stats: (N, 2) fp32; out: (N, V) rows contiguous.
// ------------------------------------------------------------------------------------------

template <DType D>
__global__ void __launch_bounds__(kMaxThreads, cuda::kResidentBlocks)
    ce_forward_kernel(CeRowsArgs args, float* __restrict__ loss, float* __restrict__ stats) {
  using T = storage_t<D>;
  constexpr int VEC = 16 / sizeof(T);
  const int64_t row = blockIdx.x;
  const int64_t label = args.labels[row];
  if (label == args.ignore_index) {  // uniform over the block
    if (threadIdx.x == 0) {
      loss[row] = 0.0f;
      stats[row * kNumCeStats + kCeMax] = 0.0f;
      stats[row * kNumCeStats + kCeLogSum] = 0.0f;
    }
    return;
  }
  const int64_t n_cols = args.n_cols;
  const T* x_row = static_cast<const T*>(args.logits.data) + row_start(args.logits, row);
  const int64_t head = aligned_head<T, VEC>(x_row, n_cols);
  const int64_t n_packs = (n_cols - head) / VEC;
  const T* packs = x_row + head;
  const int64_t stride = blockDim.x;

  LseStateT<float> lse;
  if (threadIdx.x < head) lse_add(lse, Element<D>::to_float(x_row[threadIdx.x]));
  float x[VEC];
  int64_t p = threadIdx.x;
  for (; p + (kForwardUnroll - 1) * stride < n_packs; p += kForwardUnroll * stride) {
    Pack<T, VEC> raw[kForwardUnroll];
#pragma unroll
    for (int u = 0; u < kForwardUnroll; ++u) raw[u] = load_pack<T, VEC>(packs + (p + u * stride) * VEC);
#pragma unroll
    for (int u = 0; u < kForwardUnroll; ++u) {
      unpack_scaled<D, VEC>(raw[u], 1.0f, x);
      float m = lse.m;
#pragma unroll
      for (int j = 0; j < VEC; ++j) m = max_f(m, x[j]);
      if (m != lse.m) lse.rescale(m);
#pragma unroll
      for (int j = 0; j < VEC; ++j) lse.z += kd_exp(x[j] - m);
    }
  }
  for (; p < n_packs; p += stride) {  // fewer than kForwardUnroll packs left for this thread
    unpack_scaled<D, VEC>(load_pack<T, VEC>(packs + p * VEC), 1.0f, x);
#pragma unroll
    for (int j = 0; j < VEC; ++j) lse_add(lse, x[j]);
  }
  const int64_t tail = head + n_packs * VEC + threadIdx.x;  // fewer than VEC columns remain
  if (tail < n_cols) lse_add(lse, Element<D>::to_float(x_row[tail]));

  lse = block_reduce(lse, LseStateT<float>{},
                     [](LseStateT<float>& into, const LseStateT<float>& other) { into.merge(other); });
  if (threadIdx.x == 0) {
    const float log_sum = lse.log_sum();
    loss[row] = label_in_range(label, n_cols) ? (lse.m - Element<D>::to_float(x_row[label])) + log_sum : NAN;
    stats[row * kNumCeStats + kCeMax] = lse.m;
    stats[row * kNumCeStats + kCeLogSum] = log_sum;
  }
}

template <DType DX, DType DO>
__global__ void __launch_bounds__(kMaxThreads, cuda::kResidentBlocks)
    ce_backward_kernel(CeRowsArgs args, const float* __restrict__ grad_loss, const float* __restrict__ stats,
                       GradRows out) {
  using TX = storage_t<DX>;
  using TO = storage_t<DO>;
  constexpr int VEC = cuda::vec_width<TX, TO>();
  const int64_t row = blockIdx.x;
  const int64_t label = args.labels[row];
  if (label == args.ignore_index) return;  // its zero stats must meet no exponential
  const int64_t n_cols = args.n_cols;
  const int64_t stride = blockDim.x;
  TO* __restrict__ o_row = static_cast<TO*>(out.data) + row * out.stride_row;
  if (!label_in_range(label, n_cols)) {  // the forward's loss is NaN: so is every gradient entry
    for (int64_t col = threadIdx.x; col < n_cols; col += stride) o_row[col] = Element<DO>::from_float(NAN);
    return;
  }
  const TX* __restrict__ x_row = static_cast<const TX*>(args.logits.data) + row_start(args.logits, row);
  const float row_max = stats[row * kNumCeStats + kCeMax];
  const float log_sum = stats[row * kNumCeStats + kCeLogSum];
  const float scale = grad_loss[row];
  // previous + grad_loss·(p − onehot) in fp32, rounded once to out's dtype (as Triton).
  auto updated = [&](float x, TO previous, int64_t col) {
    const float g = kd_exp((x - row_max) - log_sum) - (col == label ? 1.0f : 0.0f);
    return Element<DO>::from_float(Element<DO>::to_float(previous) + scale * g);
  };

  // Packs need both rows aligned at the same column; where their phases differ (a rare view
  // offset), the whole row goes column by column.
  int64_t head = aligned_head<TO, VEC>(o_row, n_cols);
  if (!is_aligned<TX, VEC>(x_row + head)) head = n_cols;
  for (int64_t col = threadIdx.x; col < head; col += stride) o_row[col] = updated(Element<DX>::to_float(x_row[col]), o_row[col], col);
  const int64_t n_packs = (n_cols - head) / VEC;
  const TX* x_packs = x_row + head;
  TO* o_packs = o_row + head;
  auto update_pack = [&](const Pack<TX, VEC>& x_pack, Pack<TO, VEC>& o_pack, int64_t pack) {
    float x[VEC];
    unpack_scaled<DX, VEC>(x_pack, 1.0f, x);
#pragma unroll
    for (int j = 0; j < VEC; ++j) o_pack.v[j] = updated(x[j], o_pack.v[j], head + pack * VEC + j);
    *reinterpret_cast<Pack<TO, VEC>*>(o_packs + pack * VEC) = o_pack;
  };
  int64_t p = threadIdx.x;
  for (; p + (kBackwardUnroll - 1) * stride < n_packs; p += kBackwardUnroll * stride) {
    Pack<TX, VEC> x_raw[kBackwardUnroll];
    Pack<TO, VEC> o_raw[kBackwardUnroll];
#pragma unroll
    for (int u = 0; u < kBackwardUnroll; ++u) {  // every load of the step before any store
      x_raw[u] = load_pack<TX, VEC>(x_packs + (p + u * stride) * VEC);
      o_raw[u] = load_pack<TO, VEC>(o_packs + (p + u * stride) * VEC);
    }
#pragma unroll
    for (int u = 0; u < kBackwardUnroll; ++u) update_pack(x_raw[u], o_raw[u], p + u * stride);
  }
  for (; p < n_packs; p += stride) {  // fewer than kBackwardUnroll packs left for this thread
    Pack<TO, VEC> o_raw = load_pack<TO, VEC>(o_packs + p * VEC);
    update_pack(load_pack<TX, VEC>(x_packs + p * VEC), o_raw, p);
  }
  const int64_t tail = head + n_packs * VEC + threadIdx.x;  // fewer than VEC columns remain
  if (tail < n_cols) o_row[tail] = updated(Element<DX>::to_float(x_row[tail]), o_row[tail], tail);
}

}  // namespace

void ce_rows_forward_cuda(const CeRowsArgs& args, float* loss, float* stats, int device, uintptr_t stream) {
  check_ce_rows_args(args);
  if (args.n_rows == 0) return;
  check_not_null(loss, "loss");
  check_not_null(stats, "stats");
  const cuda::RowLaunch cfg = cuda::row_launch(
      args.n_rows, args.n_cols, cuda::pack_width(args.logits.dtype, args.logits.dtype), kForwardUnroll, stream);
  DeviceGuard guard(device);
  dispatch_dtype(args.logits.dtype, [&](auto x_tag) {
    ce_forward_kernel<decltype(x_tag)::value><<<cfg.grid, cfg.block, 0, cfg.stream>>>(args, loss, stats);
  });
  cuda::check_launch("the ce_rows forward kernel launch");
}

void ce_rows_backward_cuda(const CeRowsArgs& args, const float* grad_loss, const float* stats, const GradRows& out,
                           int device, uintptr_t stream) {
  check_ce_rows_args(args);
  if (args.n_rows == 0) return;
  check_not_null(grad_loss, "grad_loss");
  check_not_null(stats, "stats");
  check_grad_rows(out);
  const cuda::RowLaunch cfg = cuda::row_launch(
      args.n_rows, args.n_cols, cuda::pack_width(args.logits.dtype, out.dtype), kBackwardUnroll, stream);
  DeviceGuard guard(device);
  dispatch_dtype(args.logits.dtype, [&](auto x_tag) {
    dispatch_dtype(out.dtype, [&](auto o_tag) {
      ce_backward_kernel<decltype(x_tag)::value, decltype(o_tag)::value>
          <<<cfg.grid, cfg.block, 0, cfg.stream>>>(args, grad_loss, stats, out);
    });
  });
  cuda::check_launch("the ce_rows backward kernel launch");
}

}  // namespace fastkd
