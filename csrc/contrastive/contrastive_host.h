// Host side of the contrastive ops, shared by their CPU and CUDA bindings: argument
// checks with messages that name the argument, the O(N) assembly of the loss, the
// per-row weights and the temperature gradient from the per-row statistics (plain ATen
// ops, so they run on the inputs' device without a sync), and the op bodies themselves
// (contrastive_forward_op, contrastive_backward_op, contrastive_accuracy_op), written
// once for both backends.
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

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
                                   const at::Tensor* temperature, bool symmetric, const char* fn) {
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
    TORCH_CHECK(N == M, fn,
                ": symmetric=True needs as many teacher rows as student rows, got N = ", N,
                ", M = ", M);
  }
  if (temperature != nullptr) {
    TORCH_CHECK(temperature->numel() == 1 && temperature->dim() <= 1, fn,
                ": temperature must be a float or a 0-dim tensor, got shape ",
                temperature->sizes());
    TORCH_CHECK(is_supported_float(temperature->scalar_type()), fn,
                ": temperature must be " CIFOPS_FLOAT_DTYPES ", got ", temperature->scalar_type());
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
  TORCH_CHECK(false, fn, ": targets must be in [0, M) = [0, ", M,
              ") or ignore_index = ", ignore_index, ", got targets[", i,
              "] = ", targets[i].item<int64_t>());
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
    case ContrastiveReduction::kNone:
      return row;
    case ContrastiveReduction::kSum:
      return row.sum();
    case ContrastiveReduction::kMean:
      return row.sum() / counted.sum().to(row.scalar_type());
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
              "cifops.contrastive_backward: stats must have shape [", kStatRows, ", ", N, "], got ",
              stats.sizes());
  const bool scalar_loss = reduction != ContrastiveReduction::kNone;
  TORCH_CHECK(scalar_loss ? grad_loss.numel() == 1 : grad_loss.sizes() == at::IntArrayRef{N},
              "cifops.contrastive_backward: grad_loss must have the loss's shape, got ",
              grad_loss.sizes());
  const bool has_fused = fused_grad.numel() > 0;
  TORCH_CHECK(!has_fused || (scalar_loss && fused_grad.sizes() == student.sizes()),
              "cifops.contrastive_backward: fused_grad must be empty or [N, D] with a scalar "
              "loss, got ",
              fused_grad.sizes());
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
                const at::Tensor& counted, ContrastiveReduction reduction, at::ScalarType compute,
                bool symmetric, const std::optional<at::Tensor>& targets)
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

// ----------------------------------------------------------------------------
// The op bodies, written once: the Backend (ContrastiveCpu in contrastive_cpu_op.cpp,
// ContrastiveCuda in contrastive_cuda_op.cpp) is the only difference. One is constructed
// from the student's device for the call, after the argument checks (CUDA: the device
// guard and the current stream), and provides
//   kOnHost    the kernels compute in the compute dtype (inputs converted) and values can
//              be read without a device sync (target values are checked); the CPU
//   forward(in, temperature, tau, options, weights, stats, fused_grad)
//              the statistics [kStatRows][N] (the column ones when symmetric) and, with
//              weights defined (dLoss/dr_i of a unit upstream gradient), the fused student
//              gradient [N][D]
//   backward(in, temperature, tau, options, terms, grad_student, grad_teacher)
//              the gradients whose pointer is not null, in their input's dtype
//   argmax(in, options, argmax)   each row's first maximal column
// tau is checked_temperature's value (NaN for a temperature on the device).

constexpr const char* kContrastiveLossFn = "cifops.contrastive_loss";
constexpr const char* kContrastiveAccuracyFn = "cifops.contrastive_accuracy";

// The scalar arguments of every contrastive op.
struct ContrastiveOptions {
  bool normalize = true;
  bool symmetric = false;
  int64_t ignore_index = -100;
  ContrastiveReduction reduction = ContrastiveReduction::kMean;
};

// The inputs as a backend's kernels read them, contiguous, targets as int64. With
// `on_host` (the Backend's kOnHost: the CPU) in the compute dtype and with the target
// values checked; else in their own dtype and the targets' values unread (CUDA makes no
// sync).
struct ContrastiveInputs {
  at::Tensor student, teacher;
  std::optional<at::Tensor> targets;
  at::Tensor counted;      // rows that count, bool [N]
  at::ScalarType dtype;    // the inputs' dtype (of the gradients)
  at::ScalarType compute;  // the compute dtype (of the statistics)
  ScalarKind kind;         // student's and teacher's here
  int64_t N, M, D;
  ContrastiveInputs(const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& tg,
                    int64_t ignore_index, bool on_host, const char* fn)
      : dtype(s.scalar_type()), compute(compute_type(s.scalar_type())) {
    const at::ScalarType kernel_dtype = on_host ? compute : dtype;
    student = s.to(kernel_dtype).contiguous();
    teacher = t.to(kernel_dtype).contiguous();
    kind = scalar_kind(kernel_dtype);
    N = s.size(0);
    M = t.size(0);
    D = s.size(1);
    targets = to_long(tg);
    if (on_host && targets.has_value()) check_target_values(*targets, M, ignore_index, fn);
    counted = counted_rows(targets, N, ignore_index, student.options());
  }
};

// What the loss's forward and backward ops do first: check the arguments, read the
// options and the temperature's value, then take the Backend for the call and the inputs
// as its kernels read them.
template <typename Backend>
struct ContrastiveLossCall {
  ContrastiveOptions opt;
  double tau;
  Backend backend;
  ContrastiveInputs in;
  ContrastiveLossCall(const at::Tensor& student, const at::Tensor& teacher,
                      const std::optional<at::Tensor>& targets, const at::Tensor& temperature,
                      bool normalize, bool symmetric, c10::string_view reduction,
                      int64_t ignore_index)
      : opt(checked_options(student, teacher, targets, temperature, normalize, symmetric, reduction,
                            ignore_index)),
        tau(checked_temperature(temperature, kContrastiveLossFn)),
        backend(student.device()),
        in(student, teacher, targets, ignore_index, Backend::kOnHost, kContrastiveLossFn) {}

 private:
  static ContrastiveOptions checked_options(const at::Tensor& student, const at::Tensor& teacher,
                                            const std::optional<at::Tensor>& targets,
                                            const at::Tensor& temperature, bool normalize,
                                            bool symmetric, c10::string_view reduction,
                                            int64_t ignore_index) {
    check_contrastive_args(student, teacher, targets, &temperature, symmetric, kContrastiveLossFn);
    return {normalize, symmetric, ignore_index, parse_reduction(reduction, kContrastiveLossFn)};
  }
};

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward_op(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& targets,
    const at::Tensor& temperature, bool normalize, bool symmetric, c10::string_view reduction,
    int64_t ignore_index, bool fuse_student_grad) {
  const ContrastiveLossCall<Backend> call(student, teacher, targets, temperature, normalize,
                                          symmetric, reduction, ignore_index);
  const ContrastiveOptions& opt = call.opt;
  const ContrastiveInputs& in = call.in;
  // The gradient can only be finished inside the row pass when every term of G is a
  // row-softmax term (not symmetric) and the upstream gradient is one scalar.
  const bool fuse = contrastive_fuses_student_grad(fuse_student_grad, opt.reduction, symmetric);
  const auto acc_opts = in.student.options().dtype(in.compute);
  at::Tensor stats = at::zeros({kStatRows, in.N}, acc_opts);
  at::Tensor fused_grad = at::empty({fuse ? in.N : 0, fuse ? in.D : 0}, acc_opts);
  at::Tensor weights;  // dLoss/dr_i for a loss gradient of 1
  if (fuse) weights = row_weights(at::ones({}, acc_opts), in.counted, opt.reduction, in.compute);
  call.backend.forward(in, temperature, call.tau, opt, weights, stats, fused_grad);
  const at::Tensor loss = loss_from_stats(stats, in.counted, symmetric, opt.reduction);
  return {loss.to(student.scalar_type()), stats, fused_grad};
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_backward_op(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& targets, const at::Tensor& temperature,
    const at::Tensor& stats, const at::Tensor& fused_grad, bool normalize, bool symmetric,
    c10::string_view reduction, int64_t ignore_index, bool need_student, bool need_teacher,
    bool need_temperature) {
  const ContrastiveLossCall<Backend> call(student, teacher, targets, temperature, normalize,
                                          symmetric, reduction, ignore_index);
  const ContrastiveOptions& opt = call.opt;
  const ContrastiveInputs& in = call.in;
  const bool has_fused =
      check_backward_tensors(grad_loss, stats, fused_grad, in.student, in.N, opt.reduction);
  const at::ScalarType ct = in.compute;
  const BackwardTerms terms(grad_loss, stats, in.counted, opt.reduction, ct, symmetric, in.targets);

  at::Tensor grad_student = at::empty({0}, student.options());
  at::Tensor grad_teacher = at::empty({0}, teacher.options());
  at::Tensor grad_temperature = at::empty({0}, temperature.options());
  if (need_student && has_fused)
    grad_student = (fused_grad.to(ct) * grad_loss.to(ct).reshape({})).to(student.scalar_type());
  const bool student_pass = need_student && !has_fused;
  if (student_pass || need_teacher)
    call.backend.backward(in, temperature, call.tau, opt, terms,
                          student_pass ? &grad_student : nullptr,
                          need_teacher ? &grad_teacher : nullptr);
  if (need_temperature)
    grad_temperature = temperature_grad(terms.stats, terms.w, in.counted, symmetric, temperature);
  return {grad_student, grad_teacher, grad_temperature};
}

template <typename Backend>
at::Tensor contrastive_accuracy_op(const at::Tensor& student, const at::Tensor& teacher,
                                   const std::optional<at::Tensor>& targets, bool normalize,
                                   int64_t ignore_index) {
  const char* fn = kContrastiveAccuracyFn;
  check_contrastive_args(student, teacher, targets, nullptr, false, fn);
  const Backend backend(student.device());
  const ContrastiveInputs in(student, teacher, targets, ignore_index, Backend::kOnHost, fn);
  ContrastiveOptions opt;
  opt.normalize = normalize;
  opt.ignore_index = ignore_index;
  at::Tensor argmax = at::empty({in.N}, student.options().dtype(at::kLong));
  backend.argmax(in, opt, argmax);
  return accuracy_from_argmax(argmax, in.targets, in.counted, in.compute);
}

}  // namespace cifops
