// What this build of fastkd._C holds: true from csrc/cuda_build.cu when the CUDA part is compiled,
// false from csrc/cuda_stubs.cpp otherwise (setup.py compiles exactly one of the two).
#pragma once

namespace fastkd {

bool built_with_cuda();

}  // namespace fastkd
