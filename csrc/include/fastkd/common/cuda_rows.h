// Building blocks of the CUDA row kernels (one thread block per row): 16-byte packs, block-wide
// reductions of per-thread states, and the launch shape. CUDA sources only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fastkd/common/cuda_check.h"
#include "fastkd/common/dtypes.h"
#include "fastkd/common/errors.h"

namespace fastkd {
namespace cuda {

constexpr int kWarp = 32;
// Threads per row at most; the row kernels' __launch_bounds__ use it.
constexpr int kMaxThreads = 512;
// Resident blocks per SM a row kernel is compiled for (the __launch_bounds__ minimum) unless its
// math needs more registers: two, so that one block's reductions and row changes hide behind the
// other's loads. It caps registers at 65536 / (2 · 512) = 64 per thread.
constexpr int kResidentBlocks = 2;

template <DType D>
using storage_t = typename Element<D>::storage;

// Elements per 16-byte load of the wider of two storage types.
template <class A, class B>
constexpr int vec_width() {
  return 16 / (sizeof(A) > sizeof(B) ? sizeof(A) : sizeof(B));
}

template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <class T, int N>
__device__ __forceinline__ bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N) == 0;
}

template <class T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <DType D, int N>
__device__ __forceinline__ void unpack_scaled(const Pack<storage_t<D>, N>& pack, float scale, float (&out)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = Element<D>::to_float(pack.v[j]) * scale;
}

// Warp shuffle of a struct of 32-bit words.
template <class T>
__device__ __forceinline__ T shuffle_down(const T& value, int offset) {
  static_assert(sizeof(T) % 4 == 0, "shuffle_down needs 32-bit words");
  T out;
  const unsigned* src = reinterpret_cast<const unsigned*>(&value);
  unsigned* dst = reinterpret_cast<unsigned*>(&out);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(T) / 4); ++i) dst[i] = __shfl_down_sync(0xffffffffu, src[i], offset);
  return out;
}

// Merges every thread's value into thread 0's (blockDim.x a multiple of 32, at most kMaxThreads).
// `identity` changes nothing when merged. Ends with a barrier, so the block may call it again.
template <class T, class Merge>
__device__ T block_reduce(T value, const T& identity, Merge merge) {
  __shared__ alignas(16) unsigned char raw[kMaxThreads / kWarp * sizeof(T)];  // no constructor: raw bytes
  T* partial = reinterpret_cast<T*>(raw);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) merge(value, shuffle_down(value, offset));
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < static_cast<int>(blockDim.x / kWarp) ? partial[lane] : identity;
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) merge(value, shuffle_down(value, offset));
  }
  __syncthreads();
  return value;
}

struct FloatPair {
  float first;
  float second;
};

__device__ __forceinline__ void add_pair(FloatPair& into, const FloatPair& other) {
  into.first += other.first;
  into.second += other.second;
}

// ------------------------------------------------------------------------------------------
// Host side.
// ------------------------------------------------------------------------------------------

struct RowLaunch {
  dim3 grid;
  dim3 block;
  cudaStream_t stream;
};

// Elements per 16-byte load of the wider of two dtypes (host side of vec_width).
inline int pack_width(DType a, DType b) {
  const int widest = (a == DType::kFloat32 || b == DType::kFloat32) ? 4 : 2;
  return 16 / widest;
}

// One block per row. Threads: the fewest (64 to kMaxThreads, a power of two) that cover the row
// in one step of `packs_per_step` packs of `vec` columns per thread, so a short row does not leave
// warps idle; a long row takes several steps (V = 128256 bf16: 16032 packs of 8, 512 threads,
// ~31 packs per thread, ~8 steps of 4).
inline RowLaunch row_launch(int64_t n_rows, int64_t n_cols, int vec, int packs_per_step, uintptr_t stream) {
  if (n_rows > 0x7FFFFFFF) throw_invalid("n_rows", " exceeds the CUDA grid limit (2^31 - 1 rows)");
  // Column offsets within a row are int32 in the kernels; 2^30 leaves room for a step's overshoot.
  if (n_cols > (int64_t{1} << 30)) throw_invalid("n_cols", " exceeds 2^30, the longest row of the CUDA kernels");
  const int64_t n_packs = (n_cols + vec - 1) / vec;
  int threads = 64;
  while (threads < kMaxThreads && static_cast<int64_t>(threads) * packs_per_step < n_packs) threads *= 2;
  return {dim3(static_cast<unsigned>(n_rows)), dim3(threads), reinterpret_cast<cudaStream_t>(stream)};
}

inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

}  // namespace cuda
}  // namespace fastkd
