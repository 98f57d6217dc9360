// The ParallelFor that the CPU bindings hand to the torch-free kernels: torch's own
// thread pool (at::parallel_for, OpenMP; the extension is built with -fopenmp).
#pragma once

#include <ATen/Parallel.h>

#include <functional>

#include "common/types.h"  // ParallelFor

namespace cifops {

inline const ParallelFor kAtenParallelFor = [](int64_t n, int64_t grain,
                                               const std::function<void(int64_t, int64_t)>& body) {
  at::parallel_for(0, n, grain, body);
};

}  // namespace cifops
