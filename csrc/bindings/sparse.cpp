// Bindings of the sparse_kd family's tail-mode passes (sparse/sparse_rows.h): SparseTailArgs and
// the CPU entry points, for fastkd/kernels/sparse/native.py.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings.h"
#include "fastkd/sparse/sparse_rows.h"

namespace fastkd {
namespace bindings {

void bind_sparse(py::module_& m) {
  py::class_<SparseTailArgs>(m, "SparseTailArgs",
                             "One sparse_kd tail-mode call: N rows of V student logits, ids the address of int32 "
                             "(N, top_k) sorted per row (the sentinel at absent entries), and 1/T.")
      .def(py::init([](int64_t n_rows, int64_t n_cols, int64_t top_k, const RowsView& student, std::uintptr_t ids,
                       float inv_temperature) {
             return SparseTailArgs{n_rows, n_cols, top_k, student, address<const int32_t>(ids), inv_temperature};
           }),
           py::kw_only(), py::arg("n_rows"), py::arg("n_cols"), py::arg("top_k"), py::arg("student"), py::arg("ids"),
           py::arg("inv_temperature"))
      .def_readonly("n_rows", &SparseTailArgs::n_rows)
      .def_readonly("n_cols", &SparseTailArgs::n_cols)
      .def_readonly("top_k", &SparseTailArgs::top_k)
      .def_readonly("student", &SparseTailArgs::student)
      .def_property_readonly("ids", [](const SparseTailArgs& a) { return address_of(a.ids); })
      .def_readonly("inv_temperature", &SparseTailArgs::inv_temperature);

  // active (N,) int8, stats (N, 4) fp32; support_grads (N, k) fp32, coefficients (N, 3) fp32,
  // mode (N,) int8, grad (N, V) contiguous in the student's dtype.
  m.def(
      "sparse_tail_stats_cpu",
      [](const SparseTailArgs& args, std::uintptr_t active, std::uintptr_t stats, int n_threads) {
        with_released_gil(
            [&] { sparse_tail_stats_cpu(args, address<const int8_t>(active), address<float>(stats), n_threads); });
      },
      py::arg("args"), py::kw_only(), py::arg("active"), py::arg("stats"), py::arg("n_threads") = 0);
  m.def(
      "sparse_tail_grad_cpu",
      [](const SparseTailArgs& args, std::uintptr_t support_grads, std::uintptr_t stats, std::uintptr_t coefficients,
         std::uintptr_t mode, std::uintptr_t grad, int n_threads) {
        with_released_gil([&] {
          sparse_tail_grad_cpu(args, address<const float>(support_grads), address<const float>(stats),
                               address<const float>(coefficients), address<const int8_t>(mode), address<void>(grad),
                               n_threads);
        });
      },
      py::arg("args"), py::kw_only(), py::arg("support_grads"), py::arg("stats"), py::arg("coefficients"),
      py::arg("mode"), py::arg("grad"), py::arg("n_threads") = 0);
}

}  // namespace bindings
}  // namespace fastkd
