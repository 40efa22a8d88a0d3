// How the kernels address the rows of a 2-D (N, V) or 3-D (B, T, V) tensor (the host side of
// this addressing is fastkd/reduction.py row_layout; the Triton side backends/triton/rows.py).
#pragma once

#include <cstdint>

#include "fastkd/common/dispatch.h"
#include "fastkd/common/dtypes.h"
#include "fastkd/common/errors.h"
#include "fastkd/common/host_device.h"

namespace fastkd {

// Row r starts at element (r / inner)·stride_outer + (r % inner)·stride_inner (inner = T; 1 with
// stride_inner 0 for 2-D), its columns stride_col apart. Strides count elements, not bytes.
struct RowsView {
  const void* data;
  DType dtype;
  int64_t inner;
  int64_t stride_outer;
  int64_t stride_inner;
  int64_t stride_col;
};

// int64 offsets: N·V may exceed 2^31.
FASTKD_HOST_DEVICE int64_t row_start(const RowsView& view, int64_t row) {
  return (row / view.inner) * view.stride_outer + (row % view.inner) * view.stride_inner;
}

inline void check_rows_view(const RowsView& view, const char* name) {
  if (!is_kernel_dtype(view.dtype)) throw_invalid(name, " must be float32, float16 or bfloat16 (dtype code 0, 1 or 2)");
  if (view.inner < 1) throw_invalid(name, " has inner row count < 1");
  if (view.data == nullptr) throw_invalid(name, " is a null pointer");
}

}  // namespace fastkd
