// Bindings of the logits family (logits/kd_rows.h): DivergenceParams, KdRowsArgs, KlDivRowsArgs
// and the kd_rows / kl_div_rows entry points, for fastkd/backends/native_kd.py.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings.h"
#include "fastkd/logits/dkd_rows.h"
#include "fastkd/logits/kd_rows.h"

namespace fastkd {
namespace bindings {

void bind_logits(py::module_& m) {
  py::class_<DivergenceParams>(m, "DivergenceParams",
                               "A divergence and its parameters (divergences.DivergenceSpec): code as in "
                               "contract()['divergence_codes']; param is beta (jsd) or the skew (skew_*).")
      .def(py::init([](int code, float inv_temperature, float param, float log_param, float log1m_param) {
             return DivergenceParams{code, inv_temperature, param, log_param, log1m_param};
           }),
           py::kw_only(), py::arg("code"), py::arg("inv_temperature"), py::arg("param"), py::arg("log_param"),
           py::arg("log1m_param"))
      .def_readonly("code", &DivergenceParams::code)
      .def_readonly("inv_temperature", &DivergenceParams::inv_temperature)
      .def_readonly("param", &DivergenceParams::param)
      .def_readonly("log_param", &DivergenceParams::log_param)
      .def_readonly("log1m_param", &DivergenceParams::log1m_param);

  py::class_<LogitTransforms>(m, "LogitTransforms",
                              "Per-side logit transforms before the temperature (fastkd/logit_transforms.py): "
                              "y = scale·x, then softcap·tanh(y/softcap) when softcap > 0, then with standardize "
                              "(y − mean)/(std + eps), std the sample std. The defaults are the identity.")
      .def(py::init([](float student_scale, float student_softcap, float teacher_scale, float teacher_softcap,
                       bool standardize, float eps) {
             return LogitTransforms{{student_scale, student_softcap}, {teacher_scale, teacher_softcap},
                                    standardize ? 1 : 0, eps};
           }),
           py::kw_only(), py::arg("student_scale") = 1.0f, py::arg("student_softcap") = 0.0f,
           py::arg("teacher_scale") = 1.0f, py::arg("teacher_softcap") = 0.0f, py::arg("standardize") = false,
           py::arg("eps") = 1e-7f)
      .def_property_readonly("student_scale", [](const LogitTransforms& t) { return t.student.scale; })
      .def_property_readonly("student_softcap", [](const LogitTransforms& t) { return t.student.softcap; })
      .def_property_readonly("teacher_scale", [](const LogitTransforms& t) { return t.teacher.scale; })
      .def_property_readonly("teacher_softcap", [](const LogitTransforms& t) { return t.teacher.softcap; })
      .def_property_readonly("standardize", [](const LogitTransforms& t) { return t.standardize != 0; })
      .def_readonly("eps", &LogitTransforms::eps);

  py::class_<KdRowsArgs>(m, "KdRowsArgs",
                         "One kd_rows call: N rows of V columns of student and teacher logits, labels the "
                         "address of int64 (N,) or 0, the divergence and the logit transforms (default: none).")
      .def(py::init([](int64_t n_rows, int64_t n_cols, const RowsView& student, const RowsView& teacher,
                       std::uintptr_t labels, int64_t ignore_index, const DivergenceParams& divergence,
                       const LogitTransforms& transforms) {
             return KdRowsArgs{n_rows,       n_cols,    student,   teacher, address<const int64_t>(labels),
                               ignore_index, divergence, transforms};
           }),
           py::kw_only(), py::arg("n_rows"), py::arg("n_cols"), py::arg("student"), py::arg("teacher"),
           py::arg("labels"), py::arg("ignore_index"), py::arg("divergence"),
           py::arg("transforms") = LogitTransforms{{1.0f, 0.0f}, {1.0f, 0.0f}, 0, 1e-7f})
      .def_readonly("n_rows", &KdRowsArgs::n_rows)
      .def_readonly("n_cols", &KdRowsArgs::n_cols)
      .def_readonly("student", &KdRowsArgs::student)
      .def_readonly("teacher", &KdRowsArgs::teacher)
      .def_property_readonly("labels", [](const KdRowsArgs& a) { return address_of(a.labels); })
      .def_readonly("ignore_index", &KdRowsArgs::ignore_index)
      .def_readonly("divergence", &KdRowsArgs::divergence)
      .def_readonly("transforms", &KdRowsArgs::transforms);

  py::class_<KlDivRowsArgs>(m, "KlDivRowsArgs",
                            "One kl_div_rows call: input (log-probabilities) and target (probabilities, or "
                            "log-probabilities if log_target), N rows of V columns.")
      .def(py::init([](int64_t n_rows, int64_t n_cols, const RowsView& input, const RowsView& target,
                       bool log_target) { return KlDivRowsArgs{n_rows, n_cols, input, target, log_target}; }),
           py::kw_only(), py::arg("n_rows"), py::arg("n_cols"), py::arg("input"), py::arg("target"),
           py::arg("log_target"))
      .def_readonly("n_rows", &KlDivRowsArgs::n_rows)
      .def_readonly("n_cols", &KlDivRowsArgs::n_cols)
      .def_readonly("input", &KlDivRowsArgs::input)
      .def_readonly("target", &KlDivRowsArgs::target)
      .def_readonly("log_target", &KlDivRowsArgs::log_target);

  // loss (N,) fp32, stats (N, 5) fp32 ((N, 9) with standardize), grad (N, V) contiguous in the
  // student's (input's) dtype.
  m.def(
      "kd_rows_forward_cpu",
      [](const KdRowsArgs& args, std::uintptr_t loss, std::uintptr_t stats, int n_threads) {
        with_released_gil([&] { kd_rows_forward_cpu(args, address<float>(loss), address<float>(stats), n_threads); });
      },
      py::arg("args"), py::kw_only(), py::arg("loss"), py::arg("stats"), py::arg("n_threads") = 0);
  m.def(
      "kd_rows_backward_cpu",
      [](const KdRowsArgs& args, std::uintptr_t grad_loss, std::uintptr_t stats, std::uintptr_t grad, int n_threads) {
        with_released_gil([&] {
          kd_rows_backward_cpu(args, address<const float>(grad_loss), address<const float>(stats), address<void>(grad),
                               n_threads);
        });
      },
      py::arg("args"), py::kw_only(), py::arg("grad_loss"), py::arg("stats"), py::arg("grad"),
      py::arg("n_threads") = 0);
  m.def(
      "kl_div_rows_forward_cpu",
      [](const KlDivRowsArgs& args, std::uintptr_t out, int n_threads) {
        with_released_gil([&] { kl_div_rows_forward_cpu(args, address<float>(out), n_threads); });
      },
      py::arg("args"), py::kw_only(), py::arg("out"), py::arg("n_threads") = 0);
  m.def(
      "kl_div_rows_backward_cpu",
      [](const KlDivRowsArgs& args, std::uintptr_t grad_rows, std::uintptr_t grad, int n_threads) {
        with_released_gil([&] {
          kl_div_rows_backward_cpu(args, address<const float>(grad_rows), address<void>(grad), n_threads);
        });
      },
      py::arg("args"), py::kw_only(), py::arg("grad_rows"), py::arg("grad"), py::arg("n_threads") = 0);

  // dkd (logits/dkd_rows.h): a kd_rows call with required labels, alpha apart.
  m.def(
      "dkd_rows_forward_cpu",
      [](const KdRowsArgs& args, float alpha, std::uintptr_t loss, std::uintptr_t stats, int n_threads) {
        with_released_gil(
            [&] { dkd_rows_forward_cpu(args, alpha, address<float>(loss), address<float>(stats), n_threads); });
      },
      py::arg("args"), py::kw_only(), py::arg("alpha"), py::arg("loss"), py::arg("stats"), py::arg("n_threads") = 0);
  m.def(
      "dkd_rows_backward_cpu",
      [](const KdRowsArgs& args, float alpha, std::uintptr_t grad_loss, std::uintptr_t stats, std::uintptr_t grad,
         int n_threads) {
        with_released_gil([&] {
          dkd_rows_backward_cpu(args, alpha, address<const float>(grad_loss), address<const float>(stats),
                                address<void>(grad), n_threads);
        });
      },
      py::arg("args"), py::kw_only(), py::arg("alpha"), py::arg("grad_loss"), py::arg("stats"), py::arg("grad"),
      py::arg("n_threads") = 0);

  // The same on CUDA: device index and stream (a cudaStream_t as an integer) instead of n_threads.
  m.def(
      "kd_rows_forward_cuda",
      [](const KdRowsArgs& args, std::uintptr_t loss, std::uintptr_t stats, int device, std::uintptr_t stream) {
        with_released_gil(
            [&] { kd_rows_forward_cuda(args, address<float>(loss), address<float>(stats), device, stream); });
      },
      py::arg("args"), py::kw_only(), py::arg("loss"), py::arg("stats"), py::arg("device"), py::arg("stream"));
  m.def(
      "kd_rows_backward_cuda",
      [](const KdRowsArgs& args, std::uintptr_t grad_loss, std::uintptr_t stats, std::uintptr_t grad, int device,
         std::uintptr_t stream) {
        with_released_gil([&] {
          kd_rows_backward_cuda(args, address<const float>(grad_loss), address<const float>(stats),
                                address<void>(grad), device, stream);
        });
      },
      py::arg("args"), py::kw_only(), py::arg("grad_loss"), py::arg("stats"), py::arg("grad"), py::arg("device"),
      py::arg("stream"));
  m.def(
      "dkd_rows_forward_cuda",
      [](const KdRowsArgs& args, float alpha, std::uintptr_t loss, std::uintptr_t stats, int device,
         std::uintptr_t stream) {
        with_released_gil(
            [&] { dkd_rows_forward_cuda(args, alpha, address<float>(loss), address<float>(stats), device, stream); });
      },
      py::arg("args"), py::kw_only(), py::arg("alpha"), py::arg("loss"), py::arg("stats"), py::arg("device"),
      py::arg("stream"));
  m.def(
      "dkd_rows_backward_cuda",
      [](const KdRowsArgs& args, float alpha, std::uintptr_t grad_loss, std::uintptr_t stats, std::uintptr_t grad,
         int device, std::uintptr_t stream) {
        with_released_gil([&] {
          dkd_rows_backward_cuda(args, alpha, address<const float>(grad_loss), address<const float>(stats),
                                 address<void>(grad), device, stream);
        });
      },
      py::arg("args"), py::kw_only(), py::arg("alpha"), py::arg("grad_loss"), py::arg("stats"), py::arg("grad"),
      py::arg("device"), py::arg("stream"));
  m.def(
      "kl_div_rows_forward_cuda",
      [](const KlDivRowsArgs& args, std::uintptr_t out, int device, std::uintptr_t stream) {
        with_released_gil([&] { kl_div_rows_forward_cuda(args, address<float>(out), device, stream); });
      },
      py::arg("args"), py::kw_only(), py::arg("out"), py::arg("device"), py::arg("stream"));
  m.def(
      "kl_div_rows_backward_cuda",
      [](const KlDivRowsArgs& args, std::uintptr_t grad_rows, std::uintptr_t grad, int device, std::uintptr_t stream) {
        with_released_gil([&] {
          kl_div_rows_backward_cuda(args, address<const float>(grad_rows), address<void>(grad), device, stream);
        });
      },
      py::arg("args"), py::kw_only(), py::arg("grad_rows"), py::arg("grad"), py::arg("device"), py::arg("stream"));
}

}  // namespace bindings
}  // namespace fastkd
