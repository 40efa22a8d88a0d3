// Runtime dtype codes and divergence codes → compile-time template arguments, for the CPU and CUDA
// launchers alike: f is called with std::integral_constant tags.
#pragma once

#include <type_traits>

#include "fastkd/dtypes.h"
#include "fastkd/kd_rows.h"

namespace fastkd {

template <DType D>
using dtype_tag = std::integral_constant<DType, D>;
template <int V>
using int_tag = std::integral_constant<int, V>;

template <class F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(dtype_tag<DType::kFloat32>{}); return;
    case DType::kFloat16: f(dtype_tag<DType::kFloat16>{}); return;
    case DType::kBFloat16: f(dtype_tag<DType::kBFloat16>{}); return;
    default: throw_invalid("dtype", " code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  }
}

template <class F>
void dispatch_divergence(int divergence, F&& f) {
  switch (divergence) {
    case kForwardKl: f(int_tag<kForwardKl>{}); return;
    case kReverseKl: f(int_tag<kReverseKl>{}); return;
    case kJsd: f(int_tag<kJsd>{}); return;
    case kSkewForwardKl: f(int_tag<kSkewForwardKl>{}); return;
    case kSkewReverseKl: f(int_tag<kSkewReverseKl>{}); return;
    case kTvd: f(int_tag<kTvd>{}); return;
    default: throw_invalid("divergence", " code must be 0..5");
  }
}

// The row r of a RowsView starts at this element offset (int64: N·V may exceed 2^31).
FASTKD_HOST_DEVICE int64_t row_start(const RowsView& view, int64_t row) {
  return (row / view.inner) * view.stride_outer + (row % view.inner) * view.stride_inner;
}

}  // namespace fastkd
