// Runtime dtype codes → compile-time template arguments, for the CPU and CUDA launchers alike:
// f is called with a std::integral_constant tag of the kernel dtype.
#pragma once

#include <type_traits>

#include "fastkd/common/dtypes.h"
#include "fastkd/common/errors.h"

namespace fastkd {

template <DType D>
using dtype_tag = std::integral_constant<DType, D>;

// The kernels' dtypes: float32, float16, bfloat16 (float64 has a code, but no kernel takes it).
template <class F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(dtype_tag<DType::kFloat32>{}); return;
    case DType::kFloat16: f(dtype_tag<DType::kFloat16>{}); return;
    case DType::kBFloat16: f(dtype_tag<DType::kBFloat16>{}); return;
    default: throw_invalid("dtype", " code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  }
}

// A runtime flag → a compile-time bool (std::true_type / std::false_type), e.g. "this call
// transforms its logits", so the plain path compiles without the flag's code.
template <class F>
void dispatch_bool(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

inline bool is_kernel_dtype(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16;
}

}  // namespace fastkd
