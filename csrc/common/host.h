// Host-side helpers shared by the torch bindings of every op (csrc/<op>/<op>_*_op.cpp):
// the ScalarKind of a dtype, argument checks that name the argument, the compute dtype,
// raw pointers of optional tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "common/types.h"

namespace cifops {

inline ScalarKind scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return ScalarKind::kFloat16;
    case at::kBFloat16:
      return ScalarKind::kBFloat16;
    case at::kFloat:
      return ScalarKind::kFloat32;
    case at::kDouble:
      return ScalarKind::kFloat64;
    default:
      TORCH_CHECK(false, "cifops: unsupported dtype ", t);
  }
}

// The four floating dtypes the kernels support (not float8 and other floating types,
// which at::isFloatingType also accepts).
inline bool is_supported_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}
#define CIFOPS_FLOAT_DTYPES "float16, bfloat16, float32 or float64"

// "<fn>: <name> is on <device> but <ref_name> is on <device>" unless x is on ref's device.
// Every tensor argument of every op is checked like this (meta tensors included: the
// fake kernels in cifops/_cif.py and cifops/_contrastive.py check the same).
inline void check_same_device(const at::Tensor& x, const char* name, const at::Tensor& ref,
                              const char* ref_name, const char* fn) {
  TORCH_CHECK(x.device() == ref.device(), fn, ": ", name, " is on ", x.device(), " but ", ref_name,
              " is on ", ref.device());
}

// The dtype the ops compute in: float32 for float16, bfloat16 and float32 inputs,
// float64 for float64 (on the device: AccType in common/cuda_common.cuh). Also the dtype
// of CIF's alpha_sum (a float16 sum would overflow at 65504) and of the contrastive
// statistics; cifops._C.compute_dtypes exports it to the fake kernels (csrc/ops.cpp).
inline at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// x in the compute dtype, contiguous.
inline at::Tensor to_compute(const at::Tensor& x) {
  return x.to(compute_type(x.scalar_type())).contiguous();
}

// Integer tensors of any dtype (lengths, targets) as contiguous int64, or nullopt.
inline std::optional<at::Tensor> to_long(const std::optional<at::Tensor>& x) {
  if (!x.has_value()) return std::nullopt;
  return x->to(at::kLong).contiguous();
}

// The data of an optional int64 tensor, or null.
inline const int64_t* maybe_ptr(const std::optional<at::Tensor>& x) {
  return x.has_value() ? x->data_ptr<int64_t>() : nullptr;
}

}  // namespace cifops
