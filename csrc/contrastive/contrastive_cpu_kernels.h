// The drivers of the contrastive CPU tile kernels, one set per CPU capability
// (contrastive_cpu_kernels.cpp, compiled once per capability; contrastive_cpu.cpp picks
// one at run time). Torch-free.
#pragma once

#include <cstdint>

#include "contrastive.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define CIFOPS_CONTRASTIVE_X86 1  // the avx2 build exists
#else
#define CIFOPS_CONTRASTIVE_X86 0
#endif

// T is float or double. prepare: contrastive_prepare_cpu; row_pass / grad_pass:
// contrastive_row_pass_cpu / contrastive_grad_pass_cpu (contrastive.h).
#define CIFOPS_CONTRASTIVE_CPU_DRIVERS                                                    \
  template <typename T>                                                                   \
  void prepare(const T* x, int64_t rows, int64_t dim, bool normalize, T* unit, T* packed, \
               double* inv_norm, const ParallelFor& parallel_for);                        \
  template <typename T>                                                                   \
  void row_pass(const ContrastiveCpuParams& params, const ParallelFor& parallel_for);     \
  template <typename T>                                                                   \
  void grad_pass(const ContrastiveCpuParams& params, const ParallelFor& parallel_for);

namespace cifops {
namespace contrastive_cpu_kernels {
namespace portable {
CIFOPS_CONTRASTIVE_CPU_DRIVERS
}  // namespace portable
#if CIFOPS_CONTRASTIVE_X86
namespace avx2 {
CIFOPS_CONTRASTIVE_CPU_DRIVERS
}  // namespace avx2
#endif
}  // namespace contrastive_cpu_kernels
}  // namespace cifops

#undef CIFOPS_CONTRASTIVE_CPU_DRIVERS
