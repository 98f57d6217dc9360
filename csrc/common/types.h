// Types and macros shared by the torch-free kernels of every op (csrc/<op>/<op>.h and
// their CPU and CUDA kernel files): free of torch headers, so that the kernels build into
// the native tests (tests/native) as well as into the extension.
#pragma once

#include <cstdint>
#include <functional>

// Functions compiled for the host and, under nvcc, for the device too.
#if defined(__CUDACC__)
#define CIFOPS_HD __host__ __device__ __forceinline__
#else
#define CIFOPS_HD inline
#endif

// A kernel launch, CIFOPS_LAUNCH(grid, block, smem, stream, kernel<T...>)(args...): the
// kernel comes last, so that the commas of its template arguments need no parentheses.
// The CUDA emulation (tests/native/cuda_emulation/emu_cuda.h) defines it before it
// includes a .cu, to run the kernels on the CPU.
#ifndef CIFOPS_LAUNCH
#define CIFOPS_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace cifops {

// The storage dtype of a tensor argument of a kernel entry point (host: scalar_kind in
// common/host.h; C++ type: dispatch in common/dispatch.h).
enum class ScalarKind : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// How the CPU kernels run in parallel: `parallel_for(n, grain, body)` runs body(begin, end)
// over [0, n) in chunks; the torch bindings pass at::parallel_for (common/cpu_parallel.h),
// the native tests a serial loop.
using ParallelFor =
    std::function<void(int64_t, int64_t, const std::function<void(int64_t, int64_t)>&)>;

}  // namespace cifops
