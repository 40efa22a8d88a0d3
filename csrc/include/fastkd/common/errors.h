// The one way the kernels' host code reports a bad argument: std::invalid_argument, which pybind11
// turns into a Python ValueError. Messages read "fastkd: <argument> <what is wrong>".
#pragma once

#include <stdexcept>
#include <string>

namespace fastkd {

[[noreturn]] inline void throw_invalid(const char* name, const char* what) {
  throw std::invalid_argument(std::string("fastkd: ") + name + what);
}

// Addresses of tensors a kernel reads or writes arrive as integers from Python: 0 is a bug there.
inline void check_not_null(const void* address, const char* name) {
  if (address == nullptr) throw_invalid(name, " is a null pointer");
}

}  // namespace fastkd
