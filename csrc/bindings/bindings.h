// Shared by the binding files of fastkd._C: each family binds its argument structs and entry
// points in its own file (logits.cpp, cross_entropy.cpp, sinkhorn.cpp, sparse.cpp); module.cpp binds the
// common structs and the contract, and calls them.
//
// Conventions, for Python callers (fastkd/backends/native*.py):
//   * argument structs are built with keyword arguments only, e.g. RowsView(data=…, dtype=…, …),
//     so no caller repeats a field order;
//   * tensors travel as integer addresses (tensor.data_ptr()), 0 for an absent optional tensor;
//   * an entry point takes its argument struct, then keyword-only outputs and where it runs:
//     n_threads (CPU; ≤ 0: OpenMP's default) or device and stream (CUDA).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace fastkd {
namespace bindings {

namespace py = pybind11;

template <class T>
T* address(std::uintptr_t value) {
  return reinterpret_cast<T*>(value);
}

template <class T>
std::uintptr_t address_of(const T* pointer) {
  return reinterpret_cast<std::uintptr_t>(pointer);
}

// Kernels run without the GIL: other Python threads go on meanwhile (the arguments are C++ copies).
template <class F>
void with_released_gil(F&& f) {
  py::gil_scoped_release release;
  f();
}

void bind_logits(py::module_& m);
void bind_cross_entropy(py::module_& m);
void bind_sinkhorn(py::module_& m);
void bind_sparse(py::module_& m);

}  // namespace bindings
}  // namespace fastkd
