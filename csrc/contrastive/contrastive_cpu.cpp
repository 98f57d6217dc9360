// CPU entry points of the fused contrastive loss (contrastive.h): the padding rules, the
// dtype dispatch, and the choice between the two builds of the tile kernels
// (contrastive_cpu_kernels.cpp: portable, and AVX2 + FMA where the CPU has it).
// Torch-free: raw pointers in, a ParallelFor callback for the threads.
//
// Parallelisation: one task per block of 48 rows of A; every task sweeps all of B,
// so each output row is written by exactly one task (deterministic, no atomics).
// float32 inputs compute in float32 (per-row statistics in double), float64 in
// float64.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/dispatch.h"
#include "contrastive.h"
#include "contrastive_cpu_kernels.h"

namespace cifops {

// The padding rules, shared by both builds and by the binding.
int64_t contrastive_cpu_panel(ScalarKind kind) { return kind == ScalarKind::kFloat64 ? 8 : 16; }

int64_t contrastive_cpu_padded_rows(int64_t rows) {
  return (rows + kCpuRowBlock - 1) / kCpuRowBlock * kCpuRowBlock;
}

int64_t contrastive_cpu_padded_dim(ScalarKind kind, int64_t dim) {
  const int64_t w = contrastive_cpu_panel(kind);
  return (dim + w - 1) / w * w;
}

namespace {

// CIFOPS_CPU_SIMD=portable (read once) forces the portable build, so that tests can
// cover it on an AVX2 machine.
bool use_avx2() {
#if CIFOPS_CONTRASTIVE_X86
  static const bool use = [] {
    const char* forced = std::getenv("CIFOPS_CPU_SIMD");
    if (forced != nullptr && std::string(forced) == "portable") return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return use;
#else
  return false;
#endif
}

#if CIFOPS_CONTRASTIVE_X86
#define CIFOPS_CONTRASTIVE_CALL(fn, ...)                       \
  (use_avx2() ? contrastive_cpu_kernels::avx2::fn(__VA_ARGS__) \
              : contrastive_cpu_kernels::portable::fn(__VA_ARGS__))
#else
#define CIFOPS_CONTRASTIVE_CALL(fn, ...) contrastive_cpu_kernels::portable::fn(__VA_ARGS__)
#endif

const ThrowUnsupported kUnsupported{"cifops contrastive CPU kernels take float32/float64"};

}  // namespace

void contrastive_prepare_cpu(const ContrastiveSideParams& side, const ParallelFor& parallel_for) {
  dispatch(
      CpuTypes{}, side.kind,
      [&](auto tag) {
        using T = decltype(tag);
        CIFOPS_CONTRASTIVE_CALL(prepare<T>, static_cast<const T*>(side.x), side.rows, side.dim,
                                side.normalize, static_cast<T*>(side.unit),
                                static_cast<T*>(side.packed), side.inv_norm, parallel_for);
      },
      kUnsupported);
}

void contrastive_row_pass_cpu(const ContrastiveCpuParams& params, const ParallelFor& parallel_for) {
  dispatch(
      CpuTypes{}, params.kind,
      [&](auto tag) {
        using T = decltype(tag);
        CIFOPS_CONTRASTIVE_CALL(row_pass<T>, params, parallel_for);
      },
      kUnsupported);
}

void contrastive_grad_pass_cpu(const ContrastiveCpuParams& params,
                               const ParallelFor& parallel_for) {
  dispatch(
      CpuTypes{}, params.kind,
      [&](auto tag) {
        using T = decltype(tag);
        CIFOPS_CONTRASTIVE_CALL(grad_pass<T>, params, parallel_for);
      },
      kUnsupported);
}

}  // namespace cifops
