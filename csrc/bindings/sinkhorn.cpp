// Bindings of the Sinkhorn family (sinkhorn/sinkhorn.h): CostView, SinkhornArgs, SinkhornOutputs
// and the sinkhorn_forward entry points, for fastkd/backends/native_sinkhorn.py.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings.h"
#include "fastkd/sinkhorn/sinkhorn.h"

namespace fastkd {
namespace bindings {

void bind_sinkhorn(py::module_& m) {
  py::class_<CostView>(m, "CostView",
                       "The cost matrices: (B, n, m), or one (n, m) shared by the batch with stride_b 0; "
                       "strides in elements, dtype code 0, 1 or 2.")
      .def(py::init([](std::uintptr_t data, int dtype, int64_t stride_b, int64_t stride_n, int64_t stride_m) {
             return CostView{address<const void>(data), static_cast<DType>(dtype), stride_b, stride_n, stride_m};
           }),
           py::kw_only(), py::arg("data"), py::arg("dtype"), py::arg("stride_b"), py::arg("stride_n"),
           py::arg("stride_m"))
      .def_property_readonly("data", [](const CostView& c) { return address_of(c.data); })
      .def_property_readonly("dtype", [](const CostView& c) { return static_cast<int>(c.dtype); })
      .def_readonly("stride_b", &CostView::stride_b)
      .def_readonly("stride_n", &CostView::stride_n)
      .def_readonly("stride_m", &CostView::stride_m);

  py::class_<SinkhornArgs>(m, "SinkhornArgs",
                           "B problems of n × m: the cost, marginals a (B, n) and b (B, m) as addresses of "
                           "contiguous fp32; tol < 0 runs exactly max_iter iterations.")
      .def(py::init([](int64_t n_problems, int64_t n, int64_t m, const CostView& cost, std::uintptr_t a,
                       std::uintptr_t b, float eps, int max_iter, float tol, bool save_history, bool return_plan) {
             return SinkhornArgs{n_problems, n, m, cost, address<const float>(a), address<const float>(b), eps,
                                 max_iter, tol, save_history, return_plan};
           }),
           py::kw_only(), py::arg("n_problems"), py::arg("n"), py::arg("m"), py::arg("cost"), py::arg("a"),
           py::arg("b"), py::arg("eps"), py::arg("max_iter"), py::arg("tol"), py::arg("save_history"),
           py::arg("return_plan"))
      .def_readonly("n_problems", &SinkhornArgs::n_problems)
      .def_readonly("n", &SinkhornArgs::n)
      .def_readonly("m", &SinkhornArgs::m)
      .def_readonly("cost", &SinkhornArgs::cost)
      .def_property_readonly("a", [](const SinkhornArgs& s) { return address_of(s.a); })
      .def_property_readonly("b", [](const SinkhornArgs& s) { return address_of(s.b); })
      .def_readonly("eps", &SinkhornArgs::eps)
      .def_readonly("max_iter", &SinkhornArgs::max_iter)
      .def_readonly("tol", &SinkhornArgs::tol)
      .def_readonly("save_history", &SinkhornArgs::save_history)
      .def_readonly("return_plan", &SinkhornArgs::return_plan);

  py::class_<SinkhornOutputs>(m, "SinkhornOutputs",
                              "Addresses of the contiguous outputs: value, value_linear, err (B,) fp32; n_iter "
                              "(B,) int32; f (B, n), g (B, m) fp32; plan (B, n, m) and the histories f_hist "
                              "(B, max_iter, n), g_hist (B, max_iter, m) fp32, 0 when not asked for.")
      .def(py::init([](std::uintptr_t value, std::uintptr_t value_linear, std::uintptr_t f, std::uintptr_t g,
                       std::uintptr_t n_iter, std::uintptr_t err, std::uintptr_t plan, std::uintptr_t f_hist,
                       std::uintptr_t g_hist) {
             return SinkhornOutputs{address<float>(value), address<float>(value_linear), address<float>(f),
                                    address<float>(g),     address<int32_t>(n_iter),    address<float>(err),
                                    address<float>(plan),  address<float>(f_hist),      address<float>(g_hist)};
           }),
           py::kw_only(), py::arg("value"), py::arg("value_linear"), py::arg("f"), py::arg("g"), py::arg("n_iter"),
           py::arg("err"), py::arg("plan") = 0, py::arg("f_hist") = 0, py::arg("g_hist") = 0)
      .def_property_readonly("value", [](const SinkhornOutputs& o) { return address_of(o.value); })
      .def_property_readonly("value_linear", [](const SinkhornOutputs& o) { return address_of(o.value_linear); })
      .def_property_readonly("f", [](const SinkhornOutputs& o) { return address_of(o.f); })
      .def_property_readonly("g", [](const SinkhornOutputs& o) { return address_of(o.g); })
      .def_property_readonly("n_iter", [](const SinkhornOutputs& o) { return address_of(o.n_iter); })
      .def_property_readonly("err", [](const SinkhornOutputs& o) { return address_of(o.err); })
      .def_property_readonly("plan", [](const SinkhornOutputs& o) { return address_of(o.plan); })
      .def_property_readonly("f_hist", [](const SinkhornOutputs& o) { return address_of(o.f_hist); })
      .def_property_readonly("g_hist", [](const SinkhornOutputs& o) { return address_of(o.g_hist); });

  m.def(
      "sinkhorn_forward_cpu",
      [](const SinkhornArgs& args, const SinkhornOutputs& outputs, int n_threads) {
        with_released_gil([&] { sinkhorn_forward_cpu(args, outputs, n_threads); });
      },
      py::arg("args"), py::kw_only(), py::arg("outputs"), py::arg("n_threads") = 0);
  // workspace: B·(3n + 4m) fp32 of device memory.
  m.def(
      "sinkhorn_forward_cuda",
      [](const SinkhornArgs& args, const SinkhornOutputs& outputs, std::uintptr_t workspace, int device,
         std::uintptr_t stream) {
        with_released_gil([&] { sinkhorn_forward_cuda(args, outputs, address<float>(workspace), device, stream); });
      },
      py::arg("args"), py::kw_only(), py::arg("outputs"), py::arg("workspace"), py::arg("device"), py::arg("stream"));
}

}  // namespace bindings
}  // namespace fastkd
