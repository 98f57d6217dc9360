// The one dtype dispatch of the kernel entry points (CPU and CUDA, every op): from the
// runtime ScalarKind of an argument to the C++ type a kernel template is instantiated for.
//
//   return dispatch(CpuTypes{}, kind, [&](auto tag) {
//     using T = decltype(tag);
//     ...kernel<T>(static_cast<const T*>(x), ...);
//   }, unsupported);
//
// calls f(T{}) for the T of the list whose kind_of<T> is `kind` and returns its result;
// a kind outside the list returns unsupported() (the CPU kernels throw, the CUDA
// launchers return cudaErrorInvalidValue). Nested dispatches (hidden and alphas) nest.
#pragma once

#include <stdexcept>

#include "common/types.h"

namespace cifops {

template <typename... Ts>
struct TypeList {};

// The ScalarKind of a C++ storage type (cuda_common.cuh adds __half and __nv_bfloat16).
template <typename T>
struct KindOf;
template <>
struct KindOf<float> {
  static constexpr ScalarKind value = ScalarKind::kFloat32;
};
template <>
struct KindOf<double> {
  static constexpr ScalarKind value = ScalarKind::kFloat64;
};

// The types the CPU kernels compute in (the bindings convert float16/bfloat16 to float32).
using CpuTypes = TypeList<float, double>;

template <typename F, typename U>
auto dispatch(TypeList<>, ScalarKind, F&&, U&& unsupported) {
  return unsupported();
}

template <typename T, typename... Rest, typename F, typename U>
auto dispatch(TypeList<T, Rest...>, ScalarKind kind, F&& f, U&& unsupported) {
  if (kind == KindOf<T>::value) return f(T{});
  return dispatch(TypeList<Rest...>{}, kind, f, unsupported);
}

// unsupported() of the CPU kernels.
struct ThrowUnsupported {
  const char* what;
  [[noreturn]] void operator()() const { throw std::invalid_argument(what); }
};

}  // namespace cifops
