// pybind11 module fastkd._C. Functions take raw addresses, sizes and strides (no libtorch), so one
// build serves every PyTorch version; fastkd/backends/native*.py call them. This file binds what
// the families share (RowsView, the contract, with_cuda) and lets each family bind the rest.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "fastkd/common/build.h"
#include "fastkd/common/contract.h"
#include "fastkd/common/dtypes.h"
#include "fastkd/common/rows_view.h"
#include "fastkd/cross_entropy/contract.h"
#include "fastkd/logits/contract.h"
#include "fastkd/sparse/sparse_rows.h"

namespace fastkd {
namespace bindings {
namespace {

template <int N>
py::dict code_dict(const NamedCode (&table)[N]) {
  py::dict out;
  for (const NamedCode& entry : table) out[py::str(entry.name)] = entry.code;
  return out;
}

// Column names in column order (the tables are checked to be permutations at compile time).
template <int N>
py::list column_list(const NamedCode (&table)[N]) {
  py::list out(N);
  for (const NamedCode& entry : table) out[entry.code] = py::str(entry.name);
  return out;
}

py::dict contract() {
  py::dict out;
  out["divergence_codes"] = code_dict(kDivergenceCodes);
  out["stats_columns"] = column_list(kStatsColumns);
  out["standardized_stats_columns"] = column_list(kStandardizedStatsColumns);
  out["ce_stats_columns"] = column_list(kCeStatsColumns);
  out["dtype_codes"] = code_dict(kDTypeCodes);
  out["sparse_stats_columns"] = column_list(kSparseStatsColumns);
  out["sparse_id_sentinel"] = kSparseIdSentinel;
  out["sparse_row_modes"] = code_dict(kSparseRowModes);
  return out;
}

void bind_rows_view(py::module_& m) {
  py::class_<RowsView>(m, "RowsView",
                       "The rows of a 2-D (N, V) or 3-D (B, T, V) tensor: row r starts at element "
                       "(r // inner)·stride_outer + (r % inner)·stride_inner, columns stride_col apart "
                       "(strides in elements; 2-D: inner 1, stride_inner 0).")
      .def(py::init([](std::uintptr_t data, int dtype, int64_t inner, int64_t stride_outer, int64_t stride_inner,
                       int64_t stride_col) {
             return RowsView{address<const void>(data), static_cast<DType>(dtype), inner, stride_outer, stride_inner,
                             stride_col};
           }),
           py::kw_only(), py::arg("data"), py::arg("dtype"), py::arg("inner"), py::arg("stride_outer"),
           py::arg("stride_inner"), py::arg("stride_col"))
      .def_property_readonly("data", [](const RowsView& v) { return address_of(v.data); })
      .def_property_readonly("dtype", [](const RowsView& v) { return static_cast<int>(v.dtype); })
      .def_readonly("inner", &RowsView::inner)
      .def_readonly("stride_outer", &RowsView::stride_outer)
      .def_readonly("stride_inner", &RowsView::stride_inner)
      .def_readonly("stride_col", &RowsView::stride_col);
}

}  // namespace
}  // namespace bindings
}  // namespace fastkd

PYBIND11_MODULE(_C, m) {
  namespace b = fastkd::bindings;
  m.doc() = "fastkd compiled kernels (torch-ABI-free): argument structs built with keywords, raw addresses";
  m.def("contract", &b::contract,
        "The codes and layouts fastkd._C was compiled with: {'divergence_codes': {name: code}, "
        "'stats_columns': [names in column order], 'standardized_stats_columns': [...], 'ce_stats_columns': [...], "
        "'dtype_codes': {name: code}, 'sparse_stats_columns': [...], 'sparse_id_sentinel': int, "
        "'sparse_row_modes': {name: code}}. "
        "fastkd.backends.native.check_contract compares them with Python's.");
  m.attr("with_cuda") = fastkd::built_with_cuda();
  b::bind_rows_view(m);
  b::bind_logits(m);
  b::bind_cross_entropy(m);
  b::bind_sinkhorn(m);
  b::bind_sparse(m);
}
