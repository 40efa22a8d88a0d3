// CUDA kernel of the batched log-domain Sinkhorn forward, mirroring the Triton tile kernel of
// fastkd/backends/triton/sinkhorn.py with the shared math of sinkhorn/sinkhorn_math.h. One thread
// block per problem runs all of its iterations and stops on its own once its marginal error
// reaches tol (the error is reduced in the block: no host synchronisation, no lock-step).
//   cost: when n·m fp32 fits in the block's shared memory (up to the device's opt-in limit,
//     227 KiB on sm_90), C/ε is read once into it and every iteration reads it from there;
//     otherwise each half-step reads the cost from global memory (L2-resident for small batches)
//     and scales it on the fly. A shared (n, m) cost has stride_b = 0: all blocks read the one
//     matrix, never B copies.
//   row step: one warp per row (lanes over coalesced columns), max then Σ exp, warp shuffles.
//   column step: one thread per column (a warp reads 32 adjacent columns of a row), two passes.
// fp32 throughout; the potentials live in a per-problem workspace of 3n + 4m fp32 (global memory,
// L1-cached; barriers order one half-step's writes before the next one's reads).
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "fastkd/common/cuda_check.h"
#include "fastkd/common/dispatch.h"
#include "fastkd/sinkhorn/sinkhorn.h"
#include "fastkd/sinkhorn/sinkhorn_math.h"

namespace fastkd {
namespace {

constexpr int kThreads = 256;
// Resident blocks per SM the kernel is compiled for: four caps registers at 65536 / (4 · 256) = 64.
// Left to itself, ptxas aimed lower for sm_80 (48 registers) and spilled in the tile variant.
constexpr int kResidentBlocks = 4;
constexpr int kWarp = 32;

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x = sinkhorn_max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Σ over the block, returned to every thread; all threads add the warp partials in the same
// order, so the result (and any decision taken on it) is identical block-wide.
__device__ float block_sum(float x, float* partial) {
  x = warp_sum(x);
  if (threadIdx.x % kWarp == 0) partial[threadIdx.x / kWarp] = x;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < static_cast<int>(blockDim.x / kWarp); ++w) total += partial[w];
  __syncthreads();
  return total;
}

// C_ij/ε of this block's problem: from the shared-memory tile, or read and scaled from global memory.
template <DType D, bool TILE>
struct ScaledCost {
  const typename Element<D>::storage* base;
  const float* tile;
  int64_t stride_n;
  int64_t stride_m;
  int64_t m;
  float inv_eps;
  __device__ __forceinline__ float operator()(int64_t i, int64_t j) const {
    if constexpr (TILE) {
      return tile[i * m + j];
    } else {
      return Element<D>::to_float(base[i * stride_n + j * stride_m]) * inv_eps;
    }
  }
};

// L_j = lse_i(u_i − cs_ij) for this thread's columns; returns this thread's share of the column
// error Σ_j |b_j·exp(L_j − L_old_j) − b_j| when L_old is given (else 0).
template <class Cost>
__device__ float column_step(const Cost& cs, const float* u, const float* b, const float* lb,
                             const float* L_old, float* L, int64_t n, int64_t m) {
  float err = 0.0f;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    float top = -INFINITY;
    for (int64_t i = 0; i < n; ++i) {
      if (u[i] != -INFINITY) top = sinkhorn_max(top, u[i] - cs(i, j));
    }
    const float shift = sinkhorn_lse_shift(top);
    float sum = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      if (u[i] != -INFINITY) sum += sinkhorn_lse_term(u[i], cs(i, j), shift);
    }
    L[j] = sinkhorn_lse_finish(sum, shift);
    if (L_old != nullptr) err += sinkhorn_column_error(b[j], lb[j], L[j], L_old[j]);
  }
  return err;
}

// Grid: one block per problem (B). cost: (B, n, m) or shared (n, m) strided (CostView); a (B, n),
// b (B, m) fp32; outputs as SinkhornOutputs; workspace: (B, 3n + 4m) fp32.
template <DType D, bool TILE>
__global__ void __launch_bounds__(kThreads, kResidentBlocks)
    sinkhorn_forward_kernel(SinkhornArgs args, SinkhornOutputs out, float* workspace) {
  extern __shared__ float tile[];  // (n, m) C/ε when TILE
  __shared__ float partial[kThreads / kWarp];
  using storage = typename Element<D>::storage;
  const int64_t k = blockIdx.x;
  const int64_t n = args.n, m = args.m;
  const float eps = args.eps;
  const float inv_eps = 1.0f / eps;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int n_warps = blockDim.x / kWarp;

  const storage* cost = static_cast<const storage*>(args.cost.data) + k * args.cost.stride_b;  // (n, m)
  if constexpr (TILE) {
    for (int64_t e = threadIdx.x; e < n * m; e += blockDim.x) {
      const int64_t i = e / m, j = e % m;
      tile[e] = Element<D>::to_float(cost[i * args.cost.stride_n + j * args.cost.stride_m]) * inv_eps;
    }
  }
  const ScaledCost<D, TILE> cs{cost, tile, args.cost.stride_n, args.cost.stride_m, m, inv_eps};
  float* la = workspace + k * (3 * n + 4 * m);  // (n)
  float* u = la + n;                            // (n)
  float* R = u + n;                             // (n)
  float* lb = R + n;                            // (m)
  float* v = lb + m;                            // (m)
  float* L = v + m;                             // (m)
  float* L_new = L + m;                         // (m)
  const float* a = args.a + k * n;              // (n)
  const float* b = args.b + k * m;              // (m)
  float* f_hist = args.save_history ? out.f_hist + k * args.max_iter * n : nullptr;  // (max_iter, n)
  float* g_hist = args.save_history ? out.g_hist + k * args.max_iter * m : nullptr;  // (max_iter, m)

  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    la[i] = sinkhorn_log_mass(a[i]);
    u[i] = a[i] > 0.0f ? 0.0f : -INFINITY;  // POT's f = 0 start; absent rows stay out of step 1
    R[i] = 0.0f;
  }
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) lb[j] = sinkhorn_log_mass(b[j]);
  __syncthreads();
  column_step(cs, u, b, lb, nullptr, L, n, m);
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {  // the columns this thread just computed
    v[j] = sinkhorn_log_scaling(b[j], lb[j], L[j]);
    if (g_hist != nullptr) g_hist[j] = -eps * L[j];
  }
  __syncthreads();

  int it = 0;
  float err = INFINITY;
  bool running = true;
  while (running) {
    for (int64_t i = warp; i < n; i += n_warps) {
      float top = -INFINITY;
      for (int64_t j = lane; j < m; j += kWarp) top = sinkhorn_max(top, v[j] - cs(i, j));
      const float shift = sinkhorn_lse_shift(warp_max(top));
      float sum = 0.0f;
      for (int64_t j = lane; j < m; j += kWarp) sum += sinkhorn_lse_term(v[j], cs(i, j), shift);
      sum = warp_sum(sum);
      if (lane == 0) {
        R[i] = sinkhorn_lse_finish(sum, shift);
        u[i] = sinkhorn_log_scaling(a[i], la[i], R[i]);
        if (f_hist != nullptr) f_hist[it * n + i] = -eps * R[i];
      }
    }
    __syncthreads();
    ++it;
    err = block_sum(column_step(cs, u, b, lb, L, L_new, n, m), partial);
    running = sinkhorn_keeps_running(it, args.max_iter, err, args.tol);  // block-uniform
    if (running) {  // a stopping problem keeps the L its last row step used: rows stay exact
      for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
        L[j] = L_new[j];
        v[j] = sinkhorn_log_scaling(b[j], lb[j], L[j]);
        if (g_hist != nullptr) g_hist[it * m + j] = -eps * L[j];
      }
    }
    __syncthreads();
  }

  float value = 0.0f, value_linear = 0.0f;
  for (int64_t i = warp; i < n; i += n_warps) {
    const float fi = -eps * R[i];
    const float ui = u[i];
    if (lane == 0) out.f[k * n + i] = fi;
    float* plan_row = args.return_plan ? out.plan + (k * n + i) * m : nullptr;
    for (int64_t j = lane; j < m; j += kWarp) {
      const float c = cs(i, j);
      const float p = sinkhorn_plan_entry(ui, v[j], c);  // 0 on absent rows and columns
      value_linear += p * (c * eps);
      value += p * (fi - eps * L[j]);
      if (plan_row != nullptr) plan_row[j] = p;
    }
  }
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) out.g[k * m + j] = -eps * L[j];
  value = block_sum(value, partial);
  value_linear = block_sum(value_linear, partial);
  if (threadIdx.x == 0) {
    out.value[k] = value;
    out.value_linear[k] = value_linear;
    out.n_iter[k] = it;
    out.err[k] = err;
  }
}

template <DType D, bool TILE>
void launch_forward(const SinkhornArgs& args, const SinkhornOutputs& out, float* workspace, size_t tile_bytes,
                    cudaStream_t stream) {
  auto kernel = sinkhorn_forward_kernel<D, TILE>;
  // Above 48 KiB of dynamic shared memory a kernel must opt in.
  if (TILE && tile_bytes > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(tile_bytes)),
               "cudaFuncSetAttribute(sinkhorn_forward_kernel)");
  }
  kernel<<<dim3(static_cast<unsigned>(args.n_problems)), dim3(kThreads), TILE ? tile_bytes : 0, stream>>>(
      args, out, workspace);
  check_cuda(cudaGetLastError(), "sinkhorn_forward_kernel");
}

}  // namespace

void sinkhorn_forward_cuda(const SinkhornArgs& args, const SinkhornOutputs& out, float* workspace, int device,
                           uintptr_t stream) {
  check_sinkhorn_args(args, out);
  if (args.n_problems == 0) return;
  if (args.n_problems > 0x7FFFFFFF) throw_invalid("B", " exceeds the CUDA grid limit (2^31 - 1 problems)");
  if (workspace == nullptr) throw_invalid("workspace", " is a null pointer");
  DeviceGuard guard(device);
  int max_shared = 0;
  check_cuda(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  const int64_t tile_bytes = args.n * args.m * static_cast<int64_t>(sizeof(float));
  // Leave room for the kernel's static shared memory (the block-sum partials).
  const bool tile = tile_bytes + 1024 <= max_shared;
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(args.cost.dtype, [&](auto tag) {
    constexpr DType D = decltype(tag)::value;
    if (tile) {
      launch_forward<D, true>(args, out, workspace, static_cast<size_t>(tile_bytes), cuda_stream);
    } else {
      launch_forward<D, false>(args, out, workspace, 0, cuda_stream);
    }
  });
}

}  // namespace fastkd
