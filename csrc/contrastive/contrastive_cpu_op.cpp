// CPU implementation of the cifops::contrastive_forward / contrastive_backward /
// contrastive_accuracy ops: checks, allocation of the unit copies and dispatch to
// the torch-free kernels in contrastive_cpu.cpp. float16/bfloat16 inputs are
// computed in float32 and the results cast back.
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "contrastive_host.h"
#include "common/cpu_parallel.h"

namespace cifops {
namespace {

constexpr const char* kLossFn = "cifops.contrastive_loss";
constexpr const char* kAccuracyFn = "cifops.contrastive_accuracy";

// One side (student or teacher) as the kernels read it: unit rows, optionally the
// packed column panels, and the inverse norms. Rows padded, see contrastive.h.
struct CpuSide {
  at::Tensor unit, packed, inv_norm;
  CpuSide(const at::Tensor& x, bool normalize, bool with_packed) {
    const ScalarKind kind = scalar_kind(x.scalar_type());
    const int64_t rows = x.size(0), dim = x.size(1);
    const int64_t rows_padded = contrastive_cpu_padded_rows(rows);
    const int64_t dim_padded = contrastive_cpu_padded_dim(kind, dim);
    unit = at::empty({rows_padded, dim_padded}, x.options());
    if (with_packed) packed = at::empty({rows_padded * dim_padded}, x.options());
    inv_norm = at::empty({rows}, x.options().dtype(at::kDouble));
    contrastive_prepare_cpu(x.data_ptr(), kind, rows, dim, normalize, unit.data_ptr(),
                            with_packed ? packed.data_ptr() : nullptr,
                            inv_norm.data_ptr<double>(), kAtenParallelFor);
  }
  const double* inv_norm_ptr() const { return inv_norm.data_ptr<double>(); }
};

// The parameters of a pass of side `a` (rows) against side `b` (columns): sizes and
// scalars, and the sides' unit copies; the caller names its inputs and outputs.
ContrastiveCpuParams pass_params(ScalarKind kind, const CpuSide& a, const CpuSide& b,
                                 int64_t dim, double inv_temperature, int64_t ignore_index,
                                 bool normalize) {
  ContrastiveCpuParams p;
  p.kind = kind;
  p.pass.rows = a.inv_norm.size(0);
  p.pass.cols = b.inv_norm.size(0);
  p.pass.dim = dim;
  p.pass.dim_padded = a.unit.size(1);
  p.pass.inv_temperature = inv_temperature;
  p.pass.ignore_index = ignore_index;
  p.a_unit = a.unit.data_ptr();
  p.a_inv_norm = a.inv_norm_ptr();
  p.normalize = normalize;
  p.b_packed = b.packed.defined() ? b.packed.data_ptr() : nullptr;
  p.b_unit = b.unit.data_ptr();
  return p;
}

// The inputs in the compute dtype, targets as int64, checked.
struct CpuInputs {
  at::Tensor student, teacher;
  std::optional<at::Tensor> targets;
  at::Tensor counted;
  ScalarKind kind;
  int64_t N, M, D;
  CpuInputs(const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& tg,
            int64_t ignore_index, const char* fn) {
    const at::ScalarType ct = compute_type(s.scalar_type());
    student = s.to(ct).contiguous();
    teacher = t.to(ct).contiguous();
    kind = scalar_kind(ct);
    N = s.size(0);
    M = t.size(0);
    D = s.size(1);
    targets = to_long(tg);
    if (targets.has_value()) check_target_values(*targets, M, ignore_index, fn);
    counted = counted_rows(targets, N, ignore_index, student.options());
  }
};

// dLoss/dx [R, D] of side a (rows) against side b (columns), in the compute dtype.
at::Tensor grad_pass(const CpuInputs& in, const CpuSide& a, const CpuSide& b,
                     const SoftmaxTerm& row_term, const SoftmaxTerm& col_term,
                     double inv_temperature, int64_t ignore_index, bool normalize) {
  at::Tensor grad = at::empty({a.inv_norm.size(0), in.D}, in.student.options());
  ContrastiveCpuParams p =
      pass_params(in.kind, a, b, in.D, inv_temperature, ignore_index, normalize);
  p.row_term = row_term;
  p.col_term = col_term;
  p.grad_x = grad.data_ptr();
  contrastive_grad_pass_cpu(p, kAtenParallelFor);
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward_cpu_op(
    const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& targets, const at::Tensor& temperature, bool normalize,
    bool symmetric, c10::string_view reduction, int64_t ignore_index, bool fuse_student_grad) {
  check_contrastive_args(student, teacher, targets, &temperature, symmetric, kLossFn);
  const ContrastiveReduction red = parse_reduction(reduction, kLossFn);
  const double tau = checked_temperature(temperature, kLossFn);
  const CpuInputs in(student, teacher, targets, ignore_index, kLossFn);
  // The gradient can only be finished inside the row pass when every term of G is
  // a row-softmax term (not symmetric) and the upstream gradient is one scalar.
  const bool fused = contrastive_fuses_student_grad(fuse_student_grad, red, symmetric);
  const CpuSide s_side(in.student, normalize, /*with_packed=*/symmetric);
  const CpuSide t_side(in.teacher, normalize, /*with_packed=*/true);
  at::Tensor stats = at::zeros({kStatRows, in.N}, in.student.options());
  at::Tensor fused_grad = at::empty({fused ? in.N : 0, fused ? in.D : 0}, in.student.options());
  at::Tensor weights;  // dLoss/dl_i for a loss gradient of 1
  if (fused)
    weights = row_weights(at::ones({}, in.student.options()), in.counted, red,
                          in.student.scalar_type());
  ContrastiveCpuParams rows = pass_params(in.kind, s_side, t_side, in.D, 1.0 / tau,
                                          ignore_index, normalize);
  rows.target = maybe_ptr(in.targets);
  rows.lse = stats[kStatLse].data_ptr();
  rows.expect = stats[kStatExpect].data_ptr();
  rows.target_logit = stats[kStatTarget].data_ptr();
  if (fused) {
    rows.fused_weight = weights.data_ptr();
    rows.fused_grad = fused_grad.data_ptr();
  }
  contrastive_row_pass_cpu(rows, kAtenParallelFor);
  if (symmetric) {  // column statistics: the row pass of (teacher, student)
    ContrastiveCpuParams cols = pass_params(in.kind, t_side, s_side, in.D, 1.0 / tau,
                                            ignore_index, normalize);
    cols.lse = stats[kStatColLse].data_ptr();
    cols.expect = stats[kStatColExpect].data_ptr();
    cols.target_logit = stats[kStatColTarget].data_ptr();
    contrastive_row_pass_cpu(cols, kAtenParallelFor);
  }
  const at::Tensor loss = loss_from_stats(stats, in.counted, symmetric, red);
  return {loss.to(student.scalar_type()), stats, fused_grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_backward_cpu_op(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& targets, const at::Tensor& temperature,
    const at::Tensor& stats, const at::Tensor& fused_grad, bool normalize, bool symmetric,
    c10::string_view reduction, int64_t ignore_index, bool need_student, bool need_teacher,
    bool need_temperature) {
  check_contrastive_args(student, teacher, targets, &temperature, symmetric, kLossFn);
  const ContrastiveReduction red = parse_reduction(reduction, kLossFn);
  const double tau = checked_temperature(temperature, kLossFn);
  const CpuInputs in(student, teacher, targets, ignore_index, kLossFn);
  const at::ScalarType ct = in.student.scalar_type();
  const bool has_fused =
      check_backward_tensors(grad_loss, stats, fused_grad, in.student, in.N, red);
  const BackwardTerms terms(grad_loss, stats, in.counted, red, ct, symmetric, in.targets);

  at::Tensor grad_student = at::empty({0}, student.options());
  at::Tensor grad_teacher = at::empty({0}, teacher.options());
  at::Tensor grad_temperature = at::empty({0}, temperature.options());
  if (need_student && has_fused) {
    grad_student = (fused_grad.to(ct) * grad_loss.to(ct).reshape({})).to(student.scalar_type());
  } else if (need_student) {
    const CpuSide s_side(in.student, normalize, false);
    const CpuSide t_side(in.teacher, normalize, true);
    grad_student = grad_pass(in, s_side, t_side, terms.row, terms.col, 1.0 / tau, ignore_index,
                             normalize)
                       .to(student.scalar_type());
  }
  if (need_teacher) {
    const CpuSide t_side(in.teacher, normalize, false);
    const CpuSide s_side(in.student, normalize, true);
    // roles swapped: the teacher is the A side, so the column term of the student
    // pass is its row term and vice versa
    grad_teacher = grad_pass(in, t_side, s_side, terms.col, terms.row, 1.0 / tau, ignore_index,
                             normalize)
                       .to(teacher.scalar_type());
  }
  if (need_temperature)
    grad_temperature = temperature_grad(terms.stats, terms.w, in.counted, symmetric, temperature);
  return {grad_student, grad_teacher, grad_temperature};
}

at::Tensor contrastive_accuracy_cpu_op(const at::Tensor& student, const at::Tensor& teacher,
                                       const std::optional<at::Tensor>& targets, bool normalize,
                                       int64_t ignore_index) {
  check_contrastive_args(student, teacher, targets, nullptr, false, kAccuracyFn);
  const CpuInputs in(student, teacher, targets, ignore_index, kAccuracyFn);
  const CpuSide s_side(in.student, normalize, false);
  const CpuSide t_side(in.teacher, normalize, true);
  at::Tensor argmax = at::empty({in.N}, student.options().dtype(at::kLong));
  ContrastiveCpuParams p =
      pass_params(in.kind, s_side, t_side, in.D, 1.0, ignore_index, normalize);
  p.argmax = argmax.data_ptr<int64_t>();
  contrastive_row_pass_cpu(p, kAtenParallelFor);
  return accuracy_from_argmax(argmax, in.targets, in.counted, in.student.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(cifops, CPU, m) {
  m.impl("contrastive_forward", &contrastive_forward_cpu_op);
  m.impl("contrastive_backward", &contrastive_backward_cpu_op);
  m.impl("contrastive_accuracy", &contrastive_accuracy_cpu_op);
}

}  // namespace cifops
