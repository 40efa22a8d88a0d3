// Bindings of the cross-entropy family (cross_entropy/ce_rows.h): CeRowsArgs, GradRows and the
// ce_rows entry points, for fastkd/backends/native_ce.py.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings.h"
#include "fastkd/cross_entropy/ce_rows.h"

namespace fastkd {
namespace bindings {

void bind_cross_entropy(py::module_& m) {
  py::class_<CeRowsArgs>(m, "CeRowsArgs",
                         "One ce_rows call: N rows of V logits (a RowsView with contiguous rows), labels the "
                         "address of int64 (N,); rows whose label is ignore_index are ignored.")
      .def(py::init([](int64_t n_rows, int64_t n_cols, const RowsView& logits, std::uintptr_t labels,
                       int64_t ignore_index) {
             return CeRowsArgs{n_rows, n_cols, logits, address<const int64_t>(labels), ignore_index};
           }),
           py::kw_only(), py::arg("n_rows"), py::arg("n_cols"), py::arg("logits"), py::arg("labels"),
           py::arg("ignore_index"))
      .def_readonly("n_rows", &CeRowsArgs::n_rows)
      .def_readonly("n_cols", &CeRowsArgs::n_cols)
      .def_readonly("logits", &CeRowsArgs::logits)
      .def_property_readonly("labels", [](const CeRowsArgs& a) { return address_of(a.labels); })
      .def_readonly("ignore_index", &CeRowsArgs::ignore_index);

  py::class_<GradRows>(m, "GradRows",
                       "The (N, V) gradient block ce_rows_backward adds into, in place: rows contiguous, "
                       "row r at element r·stride_row; dtype code 0, 1 or 2.")
      .def(py::init([](std::uintptr_t data, int dtype, int64_t stride_row) {
             return GradRows{address<void>(data), static_cast<DType>(dtype), stride_row};
           }),
           py::kw_only(), py::arg("data"), py::arg("dtype"), py::arg("stride_row"))
      .def_property_readonly("data", [](const GradRows& g) { return address_of(g.data); })
      .def_property_readonly("dtype", [](const GradRows& g) { return static_cast<int>(g.dtype); })
      .def_readonly("stride_row", &GradRows::stride_row);

  // loss (N,) fp32, stats (N, 2) fp32, grad_loss (N,) fp32.
  m.def(
      "ce_rows_forward_cpu",
      [](const CeRowsArgs& args, std::uintptr_t loss, std::uintptr_t stats, int n_threads) {
        with_released_gil([&] { ce_rows_forward_cpu(args, address<float>(loss), address<float>(stats), n_threads); });
      },
      py::arg("args"), py::kw_only(), py::arg("loss"), py::arg("stats"), py::arg("n_threads") = 0);
  m.def(
      "ce_rows_backward_cpu",
      [](const CeRowsArgs& args, std::uintptr_t grad_loss, std::uintptr_t stats, const GradRows& out, int n_threads) {
        with_released_gil([&] {
          ce_rows_backward_cpu(args, address<const float>(grad_loss), address<const float>(stats), out, n_threads);
        });
      },
      py::arg("args"), py::kw_only(), py::arg("grad_loss"), py::arg("stats"), py::arg("out"),
      py::arg("n_threads") = 0);
  m.def(
      "ce_rows_forward_cuda",
      [](const CeRowsArgs& args, std::uintptr_t loss, std::uintptr_t stats, int device, std::uintptr_t stream) {
        with_released_gil(
            [&] { ce_rows_forward_cuda(args, address<float>(loss), address<float>(stats), device, stream); });
      },
      py::arg("args"), py::kw_only(), py::arg("loss"), py::arg("stats"), py::arg("device"), py::arg("stream"));
  m.def(
      "ce_rows_backward_cuda",
      [](const CeRowsArgs& args, std::uintptr_t grad_loss, std::uintptr_t stats, const GradRows& out, int device,
         std::uintptr_t stream) {
        with_released_gil([&] {
          ce_rows_backward_cuda(args, address<const float>(grad_loss), address<const float>(stats), out, device,
                                stream);
        });
      },
      py::arg("args"), py::kw_only(), py::arg("grad_loss"), py::arg("stats"), py::arg("out"), py::arg("device"),
      py::arg("stream"));
}

}  // namespace bindings
}  // namespace fastkd
