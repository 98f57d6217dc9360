// CUDA building blocks shared by the kernels of every op (csrc/<op>/<op>_cuda.cu): the
// warp constants, the accumulation type of each storage dtype and its conversions, warp
// reductions in a fixed order, and the grid size of grid-stride kernels. Free of torch
// headers (kernel files take raw pointers); the CPU emulation of the kernels
// (tests/native/cuda_emulation) stands in for the CUDA headers included here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dispatch.h"
#include "common/types.h"

namespace cifops {

// The storage types of the CUDA kernels (all four: they convert to AccType themselves),
// for dispatch (common/dispatch.h); an unsupported kind is cudaErrorInvalidValue.
template <>
struct KindOf<__half> {
  static constexpr ScalarKind value = ScalarKind::kFloat16;
};
template <>
struct KindOf<__nv_bfloat16> {
  static constexpr ScalarKind value = ScalarKind::kBFloat16;
};
using CudaTypes = TypeList<__half, __nv_bfloat16, float, double>;
using CudaAccTypes = TypeList<float, double>;  // the types of alphas in the CIF kernels
inline int cuda_unsupported() { return static_cast<int>(cudaErrorInvalidValue); }

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// The accumulation type of a storage type: float for float16, bfloat16 and float32,
// double for double (the host ops' compute dtype is the same rule, compute_type in
// common/host.h).
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round to nearest even from the accumulation type into the storage type.
template <typename T>
__device__ __forceinline__ T from_acc(typename AccType<T>::type x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

// Reductions over the 32 lanes of a full warp by a fixed xor-shuffle tree: every lane
// gets the result, and the same inputs give the same bits run to run.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const T o = __shfl_xor_sync(kFullMask, v, offset);
    v = o > v ? o : v;
  }
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_min(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const T o = __shfl_xor_sync(kFullMask, v, offset);
    v = o < v ? o : v;
  }
  return v;
}

// Blocks for `items` work items at `per_block` a block, at most `max_blocks` (the
// kernel then strides over the rest).
inline unsigned grid_for(int64_t items, int64_t per_block, int64_t max_blocks) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < max_blocks ? blocks : max_blocks);
}

}  // namespace cifops
