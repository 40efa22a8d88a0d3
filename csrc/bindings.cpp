// pybind11 module fastkd._C. Functions take raw addresses, sizes and strides (no libtorch),
// so one build serves every PyTorch version; fastkd/backends/native.py wraps them.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <tuple>

#include "fastkd/kd_rows.h"
#include "fastkd/sinkhorn.h"

namespace py = pybind11;

namespace fastkd {
void row_logsumexp_cpu(const void* x, int dtype_code, int64_t n_rows, int64_t n_cols,
                       int64_t stride_row, int64_t stride_col, float inv_temperature, float* out);
}

namespace {

// (address, dtype code, inner, stride_outer, stride_inner, stride_col): fastkd/backends/native.py rows_view.
using ViewTuple = std::tuple<std::uintptr_t, int, int64_t, int64_t, int64_t, int64_t>;
// (divergence code, 1/T, param, log(param), log(1 − param)).
using SpecTuple = std::tuple<int, float, float, float, float>;

fastkd::RowsView to_view(const ViewTuple& v) {
  return {reinterpret_cast<const void*>(std::get<0>(v)), static_cast<fastkd::DType>(std::get<1>(v)),
          std::get<2>(v), std::get<3>(v), std::get<4>(v), std::get<5>(v)};
}

fastkd::KdRowsArgs to_args(int64_t n_rows, int64_t n_cols, const ViewTuple& student, const ViewTuple& teacher,
                           std::uintptr_t labels, int64_t ignore_index, const SpecTuple& spec) {
  fastkd::KdRowsArgs args;
  args.n_rows = n_rows;
  args.n_cols = n_cols;
  args.student = to_view(student);
  args.teacher = to_view(teacher);
  args.labels = reinterpret_cast<const int64_t*>(labels);
  args.ignore_index = ignore_index;
  args.divergence = std::get<0>(spec);
  args.params = {std::get<1>(spec), std::get<2>(spec), std::get<3>(spec), std::get<4>(spec)};
  return args;
}

// Sinkhorn: cost as (address, dtype code, stride_b, stride_n, stride_m), stride_b 0 when shared;
// outputs as the addresses of (value, value_linear, f, g, n_iter, err, plan, f_hist, g_hist).
using CostTuple = std::tuple<std::uintptr_t, int, int64_t, int64_t, int64_t>;
using SinkhornOutTuple = std::tuple<std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t,
                                    std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t>;

fastkd::SinkhornArgs to_sinkhorn_args(int64_t n_problems, int64_t n, int64_t m, const CostTuple& cost,
                                      std::uintptr_t a, std::uintptr_t b, float eps, int max_iter, float tol,
                                      bool save_history, bool return_plan) {
  fastkd::SinkhornArgs args;
  args.n_problems = n_problems;
  args.n = n;
  args.m = m;
  args.cost = reinterpret_cast<const void*>(std::get<0>(cost));
  args.cost_dtype = static_cast<fastkd::DType>(std::get<1>(cost));
  args.stride_cost_b = std::get<2>(cost);
  args.stride_cost_n = std::get<3>(cost);
  args.stride_cost_m = std::get<4>(cost);
  args.a = reinterpret_cast<const float*>(a);
  args.b = reinterpret_cast<const float*>(b);
  args.eps = eps;
  args.max_iter = max_iter;
  args.tol = tol;
  args.save_history = save_history;
  args.return_plan = return_plan;
  return args;
}

fastkd::SinkhornOutputs to_sinkhorn_outputs(const SinkhornOutTuple& o) {
  return {reinterpret_cast<float*>(std::get<0>(o)), reinterpret_cast<float*>(std::get<1>(o)),
          reinterpret_cast<float*>(std::get<2>(o)), reinterpret_cast<float*>(std::get<3>(o)),
          reinterpret_cast<int32_t*>(std::get<4>(o)), reinterpret_cast<float*>(std::get<5>(o)),
          reinterpret_cast<float*>(std::get<6>(o)), reinterpret_cast<float*>(std::get<7>(o)),
          reinterpret_cast<float*>(std::get<8>(o))};
}

#ifndef FASTKD_WITH_CUDA
[[noreturn]] void no_cuda() {
  throw std::runtime_error("fastkd._C was built without CUDA (no nvcc when it was compiled, or "
                           "FASTKD_BUILD_CUDA=0); reinstall fastkd with the CUDA toolkit, or use backend='triton'");
}
#endif

template <class F>
void with_released_gil(F&& f) {
  py::gil_scoped_release release;
  f();
}

}  // namespace

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

  // kd_rows: student/teacher are view tuples, labels an address of int64 (N,) or 0, spec a spec
  // tuple; loss (N,) fp32, stats (N, 5) fp32, grad (N, V) contiguous in the student's dtype.
  m.def(
      "kd_rows_forward_cpu",
      [](int64_t n_rows, int64_t n_cols, const ViewTuple& student, const ViewTuple& teacher,
         std::uintptr_t labels, int64_t ignore_index, const SpecTuple& spec, std::uintptr_t loss,
         std::uintptr_t stats, int n_threads) {
        const auto args = to_args(n_rows, n_cols, student, teacher, labels, ignore_index, spec);
        with_released_gil([&] {
          fastkd::kd_rows_forward_cpu(args, reinterpret_cast<float*>(loss), reinterpret_cast<float*>(stats),
                                      n_threads);
        });
      },
      py::arg("n_rows"), py::arg("n_cols"), py::arg("student"), py::arg("teacher"), py::arg("labels"),
      py::arg("ignore_index"), py::arg("spec"), py::arg("loss"), py::arg("stats"), py::arg("n_threads"));
  m.def(
      "kd_rows_backward_cpu",
      [](int64_t n_rows, int64_t n_cols, const ViewTuple& student, const ViewTuple& teacher,
         std::uintptr_t labels, int64_t ignore_index, const SpecTuple& spec, std::uintptr_t grad_loss,
         std::uintptr_t stats, std::uintptr_t grad, int n_threads) {
        const auto args = to_args(n_rows, n_cols, student, teacher, labels, ignore_index, spec);
        with_released_gil([&] {
          fastkd::kd_rows_backward_cpu(args, reinterpret_cast<const float*>(grad_loss),
                                       reinterpret_cast<const float*>(stats), reinterpret_cast<void*>(grad),
                                       n_threads);
        });
      },
      py::arg("n_rows"), py::arg("n_cols"), py::arg("student"), py::arg("teacher"), py::arg("labels"),
      py::arg("ignore_index"), py::arg("spec"), py::arg("grad_loss"), py::arg("stats"), py::arg("grad"),
      py::arg("n_threads"));
  // kl_div_rows: input and target are view tuples; out (N,) fp32, grad (N, V) in the input's dtype.
  m.def(
      "kl_div_rows_forward_cpu",
      [](int64_t n_rows, int64_t n_cols, const ViewTuple& input, const ViewTuple& target, bool log_target,
         std::uintptr_t out, int n_threads) {
        const auto args = to_args(n_rows, n_cols, input, target, 0, 0, SpecTuple{0, 1.0f, 0.0f, 0.0f, 0.0f});
        with_released_gil([&] {
          fastkd::kl_div_rows_forward_cpu(args, log_target, reinterpret_cast<float*>(out), n_threads);
        });
      },
      py::arg("n_rows"), py::arg("n_cols"), py::arg("input"), py::arg("target"), py::arg("log_target"),
      py::arg("out"), py::arg("n_threads"));
  m.def(
      "kl_div_rows_backward_cpu",
      [](int64_t n_rows, int64_t n_cols, const ViewTuple& input, const ViewTuple& target, bool log_target,
         std::uintptr_t grad_rows, std::uintptr_t grad, int n_threads) {
        const auto args = to_args(n_rows, n_cols, input, target, 0, 0, SpecTuple{0, 1.0f, 0.0f, 0.0f, 0.0f});
        with_released_gil([&] {
          fastkd::kl_div_rows_backward_cpu(args, log_target, reinterpret_cast<const float*>(grad_rows),
                                           reinterpret_cast<void*>(grad), n_threads);
        });
      },
      py::arg("n_rows"), py::arg("n_cols"), py::arg("input"), py::arg("target"), py::arg("log_target"),
      py::arg("grad_rows"), py::arg("grad"), py::arg("n_threads"));

  // The same on CUDA, plus the device index and the stream (a cudaStream_t as an integer). In a
  // build without CUDA they exist and raise RuntimeError, so callers get a clear message.
  m.def(
      "kd_rows_forward_cuda",
      [](int64_t n_rows, int64_t n_cols, const ViewTuple& student, const ViewTuple& teacher,
         std::uintptr_t labels, int64_t ignore_index, const SpecTuple& spec, std::uintptr_t loss,
         std::uintptr_t stats, int device, std::uintptr_t stream) {
        const auto args = to_args(n_rows, n_cols, student, teacher, labels, ignore_index, spec);
#ifdef FASTKD_WITH_CUDA
        with_released_gil([&] {
          fastkd::kd_rows_forward_cuda(args, reinterpret_cast<float*>(loss), reinterpret_cast<float*>(stats),
                                       device, stream);
        });
#else
        (void)args, (void)loss, (void)stats, (void)device, (void)stream;
        no_cuda();
#endif
      },
      py::arg("n_rows"), py::arg("n_cols"), py::arg("student"), py::arg("teacher"), py::arg("labels"),
      py::arg("ignore_index"), py::arg("spec"), py::arg("loss"), py::arg("stats"), py::arg("device"),
      py::arg("stream"));
  m.def(
      "kd_rows_backward_cuda",
      [](int64_t n_rows, int64_t n_cols, const ViewTuple& student, const ViewTuple& teacher,
         std::uintptr_t labels, int64_t ignore_index, const SpecTuple& spec, std::uintptr_t grad_loss,
         std::uintptr_t stats, std::uintptr_t grad, int device, std::uintptr_t stream) {
        const auto args = to_args(n_rows, n_cols, student, teacher, labels, ignore_index, spec);
#ifdef FASTKD_WITH_CUDA
        with_released_gil([&] {
          fastkd::kd_rows_backward_cuda(args, reinterpret_cast<const float*>(grad_loss),
                                        reinterpret_cast<const float*>(stats), reinterpret_cast<void*>(grad),
                                        device, stream);
        });
#else
        (void)args, (void)grad_loss, (void)stats, (void)grad, (void)device, (void)stream;
        no_cuda();
#endif
      },
      py::arg("n_rows"), py::arg("n_cols"), py::arg("student"), py::arg("teacher"), py::arg("labels"),
      py::arg("ignore_index"), py::arg("spec"), py::arg("grad_loss"), py::arg("stats"), py::arg("grad"),
      py::arg("device"), py::arg("stream"));
  m.def(
      "kl_div_rows_forward_cuda",
      [](int64_t n_rows, int64_t n_cols, const ViewTuple& input, const ViewTuple& target, bool log_target,
         std::uintptr_t out, int device, std::uintptr_t stream) {
        const auto args = to_args(n_rows, n_cols, input, target, 0, 0, SpecTuple{0, 1.0f, 0.0f, 0.0f, 0.0f});
#ifdef FASTKD_WITH_CUDA
        with_released_gil([&] {
          fastkd::kl_div_rows_forward_cuda(args, log_target, reinterpret_cast<float*>(out), device, stream);
        });
#else
        (void)args, (void)log_target, (void)out, (void)device, (void)stream;
        no_cuda();
#endif
      },
      py::arg("n_rows"), py::arg("n_cols"), py::arg("input"), py::arg("target"), py::arg("log_target"),
      py::arg("out"), py::arg("device"), py::arg("stream"));
  m.def(
      "kl_div_rows_backward_cuda",
      [](int64_t n_rows, int64_t n_cols, const ViewTuple& input, const ViewTuple& target, bool log_target,
         std::uintptr_t grad_rows, std::uintptr_t grad, int device, std::uintptr_t stream) {
        const auto args = to_args(n_rows, n_cols, input, target, 0, 0, SpecTuple{0, 1.0f, 0.0f, 0.0f, 0.0f});
#ifdef FASTKD_WITH_CUDA
        with_released_gil([&] {
          fastkd::kl_div_rows_backward_cuda(args, log_target, reinterpret_cast<const float*>(grad_rows),
                                            reinterpret_cast<void*>(grad), device, stream);
        });
#else
        (void)args, (void)log_target, (void)grad_rows, (void)grad, (void)device, (void)stream;
        no_cuda();
#endif
      },
      py::arg("n_rows"), py::arg("n_cols"), py::arg("input"), py::arg("target"), py::arg("log_target"),
      py::arg("grad_rows"), py::arg("grad"), py::arg("device"), py::arg("stream"));

  // sinkhorn_forward: B problems of n × m (fastkd/backends/native_sinkhorn.py); a (B, n), b (B, m)
  // contiguous fp32; the CUDA version also takes a device workspace of B·(3n + 4m) fp32.
  m.def(
      "sinkhorn_forward_cpu",
      [](int64_t n_problems, int64_t n, int64_t m, const CostTuple& cost, std::uintptr_t a, std::uintptr_t b,
         float eps, int max_iter, float tol, bool save_history, bool return_plan, const SinkhornOutTuple& outputs,
         int n_threads) {
        const auto args = to_sinkhorn_args(n_problems, n, m, cost, a, b, eps, max_iter, tol, save_history, return_plan);
        const auto out = to_sinkhorn_outputs(outputs);
        with_released_gil([&] { fastkd::sinkhorn_forward_cpu(args, out, n_threads); });
      },
      py::arg("n_problems"), py::arg("n"), py::arg("m"), py::arg("cost"), py::arg("a"), py::arg("b"), py::arg("eps"),
      py::arg("max_iter"), py::arg("tol"), py::arg("save_history"), py::arg("return_plan"), py::arg("outputs"),
      py::arg("n_threads"));
  m.def(
      "sinkhorn_forward_cuda",
      [](int64_t n_problems, int64_t n, int64_t m, const CostTuple& cost, std::uintptr_t a, std::uintptr_t b,
         float eps, int max_iter, float tol, bool save_history, bool return_plan, const SinkhornOutTuple& outputs,
         std::uintptr_t workspace, int device, std::uintptr_t stream) {
        const auto args = to_sinkhorn_args(n_problems, n, m, cost, a, b, eps, max_iter, tol, save_history, return_plan);
        const auto out = to_sinkhorn_outputs(outputs);
#ifdef FASTKD_WITH_CUDA
        with_released_gil([&] {
          fastkd::sinkhorn_forward_cuda(args, out, reinterpret_cast<float*>(workspace), device, stream);
        });
#else
        (void)args, (void)out, (void)workspace, (void)device, (void)stream;
        no_cuda();
#endif
      },
      py::arg("n_problems"), py::arg("n"), py::arg("m"), py::arg("cost"), py::arg("a"), py::arg("b"), py::arg("eps"),
      py::arg("max_iter"), py::arg("tol"), py::arg("save_history"), py::arg("return_plan"), py::arg("outputs"),
      py::arg("workspace"), py::arg("device"), py::arg("stream"));

#ifdef FASTKD_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
