// Compiled only with the CUDA part (its counterpart is csrc/cuda_stubs.cpp).
#include "fastkd/common/build.h"

namespace fastkd {

bool built_with_cuda() { return true; }

}  // namespace fastkd
