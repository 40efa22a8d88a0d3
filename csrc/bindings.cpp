// pybind11 module fastkd._C. Functions take raw addresses, sizes and strides (no libtorch),
// so one build serves every PyTorch version; fastkd/backends/native.py wraps them.
#include <pybind11/pybind11.h>

#include <cstdint>

namespace py = pybind11;

namespace fastkd {
void row_logsumexp_cpu(const void* x, int dtype_code, int64_t n_rows, int64_t n_cols,
                       int64_t stride_row, int64_t stride_col, float inv_temperature, float* out);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastkd compiled kernels (torch-ABI-free)";
  m.def(
      "row_logsumexp_cpu",
      [](std::uintptr_t x, int dtype_code, int64_t n_rows, int64_t n_cols, int64_t stride_row,
         int64_t stride_col, float inv_temperature, std::uintptr_t out) {
        py::gil_scoped_release release;
        fastkd::row_logsumexp_cpu(reinterpret_cast<const void*>(x), dtype_code, n_rows, n_cols,
                                  stride_row, stride_col, inv_temperature,
                                  reinterpret_cast<float*>(out));
      },
      py::arg("x"), py::arg("dtype_code"), py::arg("n_rows"), py::arg("n_cols"),
      py::arg("stride_row"), py::arg("stride_col"), py::arg("inv_temperature"), py::arg("out"));
#ifdef FASTKD_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
