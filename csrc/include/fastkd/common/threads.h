// The one thread-count rule of the CPU kernels: a positive request is taken as given, anything
// else means OpenMP's default. fastkd/backends/native.py passes torch.get_num_threads(), so
// torch.set_num_threads applies to the kernels as it does to PyTorch's own CPU ops.
#pragma once

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastkd {

inline int resolve_threads(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

}  // namespace fastkd
