// Row-wise temperature log-sum-exp on the CPU: the first kernel of the shared C++ math.
#include <cstdint>
#include <stdexcept>

#include "fastkd/dtypes.h"
#include "fastkd/online_softmax.h"

namespace fastkd {

// x: (N, V) strided, any DType; out: (N,) float32 contiguous. out[i] = logsumexp(x[i, :] / T).
void row_logsumexp_cpu(const void* x, int dtype_code, int64_t n_rows, int64_t n_cols,
                       int64_t stride_row, int64_t stride_col, float inv_temperature, float* out) {
  if (dtype_code < 0 || dtype_code > 3) throw std::invalid_argument("unknown dtype code");
  const DType dtype = static_cast<DType>(dtype_code);
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < n_rows; ++row) {
    OnlineLogSumExp state;
    const int64_t row_offset = row * stride_row;  // int64: N * V may exceed 2^31
    for (int64_t col = 0; col < n_cols; ++col) {
      state.add(load_as_float(x, dtype, row_offset + col * stride_col) * inv_temperature);
    }
    out[row] = state.value();
  }
}

}  // namespace fastkd
