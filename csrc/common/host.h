// Host-side helpers shared by the torch bindings of every op (csrc/<op>/<op>_*_op.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace cifops {

// The dtype the ops compute in: float32 for float16, bfloat16 and float32 inputs,
// float64 for float64 (on the device: AccType in common/cuda_common.cuh).
inline at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// x in the compute dtype, contiguous.
inline at::Tensor to_compute(const at::Tensor& x) {
  return x.to(compute_type(x.scalar_type())).contiguous();
}

// The data of an optional int64 tensor, or null.
inline const int64_t* maybe_ptr(const std::optional<at::Tensor>& x) {
  return x.has_value() ? x->data_ptr<int64_t>() : nullptr;
}

}  // namespace cifops
