// Host-side helpers shared by the CPU and CUDA bindings of the contrastive loss:
// argument checks with messages that name the argument, and the O(N) assembly of
// the loss, the per-row weights and the temperature gradient from the per-row
// statistics (plain ATen ops, so they run on the inputs' device without a sync).
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>
#include <string_view>

#include "common/host.h"
#include "contrastive.h"

namespace cifops {

enum class ContrastiveReduction { kNone, kSum, kMean };

inline ContrastiveReduction parse_reduction(std::string_view reduction, const char* fn) {
  if (reduction == "none") return ContrastiveReduction::kNone;
  if (reduction == "sum") return ContrastiveReduction::kSum;
  if (reduction == "mean") return ContrastiveReduction::kMean;
  TORCH_CHECK(false, fn, ": reduction must be 'none', 'sum' or 'mean', got '", reduction, "'");
}

// Metadata checks shared by every contrastive op (values are checked elsewhere:
// targets by check_target_values, temperature by checked_temperature).
inline void check_contrastive_args(const at::Tensor& student, const at::Tensor& teacher,
                                   const std::optional<at::Tensor>& targets,
                                   const at::Tensor* temperature, bool symmetric,
                                   const char* fn) {
  TORCH_CHECK(student.dim() == 2, fn, ": student must be a 2-D tensor [N, D], got shape ",
              student.sizes());
  TORCH_CHECK(teacher.dim() == 2, fn, ": teacher must be a 2-D tensor [M, D], got shape ",
              teacher.sizes());
  TORCH_CHECK(is_supported_float(student.scalar_type()), fn,
              ": student must be " CIFOPS_FLOAT_DTYPES ", got ", student.scalar_type());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), fn, ": teacher has dtype ",
              teacher.scalar_type(), " but student has dtype ", student.scalar_type(),
              "; they must match");
  check_same_device(teacher, "teacher", student, "student", fn);
  const int64_t N = student.size(0), M = teacher.size(0), D = student.size(1);
  TORCH_CHECK(teacher.size(1) == D, fn, ": teacher must have D = ", D,
              " columns to match student [N, D] = ", student.sizes(), ", got shape ",
              teacher.sizes());
  if (targets.has_value()) {
    TORCH_CHECK(targets->dim() == 1 && targets->size(0) == N, fn,
                ": targets must be a 1-D tensor [N] = [", N, "], got shape ", targets->sizes());
    TORCH_CHECK(at::isIntegralType(targets->scalar_type(), /*includeBool=*/false), fn,
                ": targets must be an integer tensor, got ", targets->scalar_type());
    check_same_device(*targets, "targets", student, "student", fn);
  } else {
    TORCH_CHECK(M >= N, fn, ": teacher has M = ", M, " rows but targets is None, which pairs ",
                "student row i with teacher row i, so M >= N = ", N, " is needed");
  }
  if (symmetric) {
    TORCH_CHECK(!targets.has_value(), fn,
                ": symmetric=True needs targets=None (the positive of row i is column i)");
    TORCH_CHECK(N == M, fn, ": symmetric=True needs as many teacher rows as student rows, got N = ",
                N, ", M = ", M);
  }
  if (temperature != nullptr) {
    TORCH_CHECK(temperature->numel() == 1 && temperature->dim() <= 1, fn,
                ": temperature must be a float or a 0-dim tensor, got shape ",
                temperature->sizes());
    TORCH_CHECK(is_supported_float(temperature->scalar_type()), fn,
                ": temperature must be " CIFOPS_FLOAT_DTYPES ", got ",
                temperature->scalar_type());
    TORCH_CHECK(temperature->device().is_cpu() || temperature->device() == student.device(), fn,
                ": temperature is on ", temperature->device(), " but student is on ",
                student.device(), " (a CPU scalar tensor is also accepted)");
  }
}

// The temperature's value when it lives on the CPU (checked), else NaN: a device
// temperature is read by the kernels and not checked here, which would need a sync.
inline double checked_temperature(const at::Tensor& temperature, const char* fn) {
  if (!temperature.device().is_cpu()) return std::nan("");
  const double tau = temperature.item<double>();
  TORCH_CHECK(std::isfinite(tau) && tau > 0, fn, ": temperature must be a finite number > 0, got ",
              tau);
  return tau;
}

// Raise for the first target that is neither ignore_index nor in [0, M). Reads
// the values, so the CUDA binding does not call it (see contrastive_cuda_op.cpp).
inline void check_target_values(const at::Tensor& targets, int64_t M, int64_t ignore_index,
                                const char* fn) {
  const at::Tensor bad = (targets != ignore_index) & ((targets < 0) | (targets >= M));
  if (!bad.any().item<bool>()) return;
  const int64_t i = bad.to(at::kLong).argmax().item<int64_t>();
  TORCH_CHECK(false, fn, ": targets must be in [0, M) = [0, ", M, ") or ignore_index = ",
              ignore_index, ", got targets[", i, "] = ", targets[i].item<int64_t>());
}

// Rows that count: targets != ignore_index (all rows without targets). Bool [N].
inline at::Tensor counted_rows(const std::optional<at::Tensor>& targets, int64_t N,
                               int64_t ignore_index, const at::TensorOptions& opts) {
  if (!targets.has_value()) return at::ones({N}, opts.dtype(at::kBool));
  return *targets != ignore_index;
}

// The per-row losses r_i (0 for rows not counted), reduced. stats is [kStatRows][N].
inline at::Tensor loss_from_stats(const at::Tensor& stats, const at::Tensor& counted,
                                  bool symmetric, ContrastiveReduction reduction) {
  at::Tensor row = stats[kStatLse] - stats[kStatTarget];
  if (symmetric) row = (row + (stats[kStatColLse] - stats[kStatColTarget])) * 0.5;
  row = at::where(counted, row, at::zeros({}, row.options()));
  switch (reduction) {
    case ContrastiveReduction::kNone: return row;
    case ContrastiveReduction::kSum: return row.sum();
    case ContrastiveReduction::kMean: return row.sum() / counted.sum().to(row.scalar_type());
  }
  return row;
}

// Whether contrastive_forward finishes the student gradient inside the forward (its
// fused_grad output is then [N, D], else empty): on both backends for a scalar loss that
// is not symmetric, when the caller allows it. cifops._C.contrastive_fuses_student_grad
// is this function (csrc/ops.cpp), for the fake kernel.
inline bool contrastive_fuses_student_grad(bool fuse_student_grad, ContrastiveReduction reduction,
                                           bool symmetric) {
  return fuse_student_grad && reduction != ContrastiveReduction::kNone && !symmetric;
}

// Checks of contrastive_backward's saved tensors and upstream gradient, shared by both
// backends. Returns whether fused_grad holds a student gradient from the forward.
inline bool check_backward_tensors(const at::Tensor& grad_loss, const at::Tensor& stats,
                                   const at::Tensor& fused_grad, const at::Tensor& student,
                                   int64_t N, ContrastiveReduction reduction) {
  const char* fn = "cifops.contrastive_backward";
  check_same_device(grad_loss, "grad_loss", student, "student", fn);
  check_same_device(stats, "stats", student, "student", fn);
  check_same_device(fused_grad, "fused_grad", student, "student", fn);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == kStatRows && stats.size(1) == N,
              "cifops.contrastive_backward: stats must have shape [", kStatRows, ", ", N,
              "], got ", stats.sizes());
  const bool scalar_loss = reduction != ContrastiveReduction::kNone;
  TORCH_CHECK(scalar_loss ? grad_loss.numel() == 1 : grad_loss.sizes() == at::IntArrayRef{N},
              "cifops.contrastive_backward: grad_loss must have the loss's shape, got ",
              grad_loss.sizes());
  const bool has_fused = fused_grad.numel() > 0;
  TORCH_CHECK(!has_fused || (scalar_loss && fused_grad.sizes() == student.sizes()),
              "cifops.contrastive_backward: fused_grad must be empty or [N, D] with a scalar "
              "loss, got ", fused_grad.sizes());
  return has_fused;
}

// w_i = dLoss/dr_i from the upstream gradient (0 for rows not counted; "mean" with no
// counted rows then gives zero gradients, as torch's cross_entropy does).
inline at::Tensor row_weights(const at::Tensor& grad_loss, const at::Tensor& counted,
                              ContrastiveReduction reduction, at::ScalarType compute) {
  const int64_t N = counted.size(0);
  at::Tensor w = grad_loss.to(compute);
  if (reduction == ContrastiveReduction::kMean) w = w / counted.sum().to(compute);
  if (reduction != ContrastiveReduction::kNone) w = w.expand({N});
  return at::where(counted, w, at::zeros({}, w.options())).contiguous();
}

// dLoss/dtau = -(1/tau) sum_i [a_i (E_i - z_i,target) + b_i (E'_i - z'_ii)], with
// a = b = w / 2 when symmetric and a = w, b = 0 otherwise. Returned with the
// temperature's shape, dtype and device.
inline at::Tensor temperature_grad(const at::Tensor& stats, const at::Tensor& weights,
                                   const at::Tensor& counted, bool symmetric,
                                   const at::Tensor& temperature) {
  at::Tensor term = stats[kStatExpect] - stats[kStatTarget];
  if (symmetric) term = (term + (stats[kStatColExpect] - stats[kStatColTarget])) * 0.5;
  term = at::where(counted, weights * term, at::zeros({}, term.options()));
  const at::Tensor tau = temperature.to(term.device(), term.scalar_type()).reshape({});
  const at::Tensor grad = -term.sum() / tau;
  return grad.to(temperature.device(), temperature.scalar_type()).reshape(temperature.sizes());
}

// The backward's row weights and softmax terms of G (contrastive.h), shared by both
// backends: w_i = dLoss/dr_i; each term weighs w / 2 when symmetric (the row term over
// teacher columns with the student's targets, the column term over student rows). The
// tensors own the memory that the SoftmaxTerm pointers point to.
struct BackwardTerms {
  at::Tensor stats, w, a, lse, col_lse;  // stats and weights in the compute type
  SoftmaxTerm row, col;

  BackwardTerms(const at::Tensor& grad_loss, const at::Tensor& saved_stats,
                const at::Tensor& counted, ContrastiveReduction reduction,
                at::ScalarType compute, bool symmetric, const std::optional<at::Tensor>& targets)
      : stats(saved_stats.to(compute).contiguous()),
        w(row_weights(grad_loss, counted, reduction, compute)),
        a(symmetric ? (w * 0.5).contiguous() : w),
        lse(stats[kStatLse].contiguous()),
        col_lse(stats[kStatColLse].contiguous()),
        row{a.data_ptr(), lse.data_ptr(), maybe_ptr(targets)},
        col(symmetric ? SoftmaxTerm{a.data_ptr(), col_lse.data_ptr(), nullptr} : SoftmaxTerm{}) {}
};

// Fraction of counted rows whose argmax is the positive (NaN when none counts).
inline at::Tensor accuracy_from_argmax(const at::Tensor& argmax,
                                       const std::optional<at::Tensor>& targets,
                                       const at::Tensor& counted, at::ScalarType compute) {
  const at::Tensor positive =
      targets.has_value() ? *targets : at::arange(argmax.size(0), argmax.options());
  const at::Tensor hits = (argmax == positive) & counted;
  return hits.sum().to(compute) / counted.sum().to(compute);
}

}  // namespace cifops
