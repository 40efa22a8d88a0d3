// The CUDA entry points of a build without its CUDA part (no nvcc, or FASTKD_BUILD_CUDA=0):
// setup.py compiles this file instead of the .cu sources, so the bindings are the same in every
// build and a CUDA call raises one clear RuntimeError. Arguments are checked first, as in the CUDA
// build, so a bad argument is reported the same way in both.
#include <cstdint>
#include <stdexcept>

#include "fastkd/common/build.h"
#include "fastkd/cross_entropy/ce_rows.h"
#include "fastkd/logits/dkd_rows.h"
#include "fastkd/logits/kd_rows.h"
#include "fastkd/sinkhorn/sinkhorn.h"

namespace fastkd {
namespace {

[[noreturn]] void no_cuda() {
  throw std::runtime_error("fastkd._C was built without CUDA (no nvcc when it was compiled, or "
                           "FASTKD_BUILD_CUDA=0); reinstall fastkd with the CUDA toolkit, or use backend='triton'");
}

}  // namespace

bool built_with_cuda() { return false; }

void kd_rows_forward_cuda(const KdRowsArgs& args, float*, float*, int, uintptr_t) {
  check_kd_rows_args(args);
  no_cuda();
}
void kd_rows_backward_cuda(const KdRowsArgs& args, const float*, const float*, void*, int, uintptr_t) {
  check_kd_rows_args(args);
  no_cuda();
}
void dkd_rows_forward_cuda(const KdRowsArgs& args, float, float*, float*, int, uintptr_t) {
  check_dkd_rows_args(args);
  no_cuda();
}
void dkd_rows_backward_cuda(const KdRowsArgs& args, float, const float*, const float*, void*, int, uintptr_t) {
  check_dkd_rows_args(args);
  no_cuda();
}
void kl_div_rows_forward_cuda(const KlDivRowsArgs& args, float*, int, uintptr_t) {
  check_kl_div_rows_args(args);
  no_cuda();
}
void kl_div_rows_backward_cuda(const KlDivRowsArgs& args, const float*, void*, int, uintptr_t) {
  check_kl_div_rows_args(args);
  no_cuda();
}
void ce_rows_forward_cuda(const CeRowsArgs& args, float*, float*, int, uintptr_t) {
  check_ce_rows_args(args);
  no_cuda();
}
void ce_rows_backward_cuda(const CeRowsArgs& args, const float*, const float*, const GradRows&, int, uintptr_t) {
  check_ce_rows_args(args);
  no_cuda();
}
void sinkhorn_forward_cuda(const SinkhornArgs& args, const SinkhornOutputs& out, float*, int, uintptr_t) {
  check_sinkhorn_args(args, out);
  no_cuda();
}

}  // namespace fastkd
