// Autocast kernels of the contrastive ops (as torchvision's csrc/ops/autocast/): under
// torch.autocast (CPU or CUDA) student and teacher are cast to their common dtype, the
// wider of the two (autocast's "promote" policy, as torch.cat): a student projected in
// bfloat16 against float32 teacher rows computes in float32, two bfloat16 sides stay in
// bfloat16 (the tensor-core path on CUDA), and nothing is narrowed. The loss comes back in
// that dtype. The op itself then runs below autocast, as without it. contrastive_backward
// needs no autocast kernel: it receives the forward's (already common) inputs.
//
// CIF has none either: cif_forward takes hidden and alphas of any two supported dtypes and
// returns embeds in hidden's dtype, so autocast's fallthrough runs it on the inputs as
// given (the kernels compute in float32 for float16/bfloat16 inputs).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/ScalarType.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/host.h"

namespace cifops {
namespace {

// student and teacher in their common dtype (unchanged when either is not a supported
// floating dtype: the op's checks then name it).
std::pair<at::Tensor, at::Tensor> common_dtype(const at::Tensor& student,
                                               const at::Tensor& teacher) {
  if (!is_supported_float(student.scalar_type()) || !is_supported_float(teacher.scalar_type()))
    return {student, teacher};
  const at::ScalarType common = c10::promoteTypes(student.scalar_type(), teacher.scalar_type());
  return {student.to(common), teacher.to(common)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward_autocast(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& targets,
    const at::Tensor& temperature, bool normalize, bool symmetric, c10::string_view reduction,
    int64_t ignore_index, bool fuse_student_grad) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cifops::contrastive_forward", "")
                             .typed<decltype(contrastive_forward_autocast)>();
  const auto [s, t] = common_dtype(student, teacher);
  return op.call(s, t, targets, temperature, normalize, symmetric, reduction, ignore_index,
                 fuse_student_grad);
}

at::Tensor contrastive_accuracy_autocast(const at::Tensor& student, const at::Tensor& teacher,
                                         const std::optional<at::Tensor>& targets, bool normalize,
                                         int64_t ignore_index) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cifops::contrastive_accuracy", "")
                             .typed<decltype(contrastive_accuracy_autocast)>();
  const auto [s, t] = common_dtype(student, teacher);
  return op.call(s, t, targets, normalize, ignore_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(cifops, AutocastCPU, m) {
  m.impl("contrastive_forward", &contrastive_forward_autocast);
  m.impl("contrastive_accuracy", &contrastive_accuracy_autocast);
}

TORCH_LIBRARY_IMPL(cifops, AutocastCUDA, m) {
  m.impl("contrastive_forward", &contrastive_forward_autocast);
  m.impl("contrastive_accuracy", &contrastive_accuracy_autocast);
}

}  // namespace cifops
