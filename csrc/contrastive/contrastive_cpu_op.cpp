// CPU implementation of the cifops::contrastive_forward / contrastive_backward /
// contrastive_accuracy ops: the CPU backend (ContrastiveCpu) of the op bodies in
// contrastive_host.h, on the torch-free kernels in contrastive_cpu.cpp (unit copies,
// then row and grad passes). float16/bfloat16 inputs are computed in float32 and the
// results cast back.
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "contrastive_host.h"
#include "common/cpu_parallel.h"

namespace cifops {
namespace {

// One side (student or teacher) as the kernels read it: unit rows, optionally the
// packed column panels, and the inverse norms. Rows padded, see contrastive.h.
struct CpuSide {
  at::Tensor unit, packed, inv_norm;
  CpuSide(const at::Tensor& x, bool normalize, bool with_packed) {
    ContrastiveSideParams p;
    p.kind = scalar_kind(x.scalar_type());
    p.rows = x.size(0);
    p.dim = x.size(1);
    p.normalize = normalize;
    p.x = x.data_ptr();
    const int64_t rows_padded = contrastive_cpu_padded_rows(p.rows);
    const int64_t dim_padded = contrastive_cpu_padded_dim(p.kind, p.dim);
    unit = at::empty({rows_padded, dim_padded}, x.options());
    if (with_packed) packed = at::empty({rows_padded * dim_padded}, x.options());
    inv_norm = at::empty({p.rows}, x.options().dtype(at::kDouble));
    p.unit = unit.data_ptr();
    p.packed = with_packed ? packed.data_ptr() : nullptr;
    p.inv_norm = inv_norm.data_ptr<double>();
    contrastive_prepare_cpu(p, kAtenParallelFor);
  }
  const double* inv_norm_ptr() const { return inv_norm.data_ptr<double>(); }
};

// The parameters of a pass of side `a` (rows) against side `b` (columns): sizes and
// scalars, and the sides' unit copies; the caller names its inputs and outputs.
ContrastiveCpuParams pass_params(const ContrastiveInputs& in, const CpuSide& a, const CpuSide& b,
                                 double inv_temperature, const ContrastiveOptions& opt) {
  ContrastiveCpuParams p;
  p.kind = in.kind;
  p.pass.rows = a.inv_norm.size(0);
  p.pass.cols = b.inv_norm.size(0);
  p.pass.dim = in.D;
  p.pass.dim_padded = a.unit.size(1);
  p.pass.inv_temperature = inv_temperature;
  p.pass.ignore_index = opt.ignore_index;
  p.a_unit = a.unit.data_ptr();
  p.a_inv_norm = a.inv_norm_ptr();
  p.normalize = opt.normalize;
  p.b_packed = b.packed.defined() ? b.packed.data_ptr() : nullptr;
  p.b_unit = b.unit.data_ptr();
  return p;
}

// dLoss/dx [R, D] of side a (rows) against side b (columns), in x's dtype.
at::Tensor grad_pass(const ContrastiveInputs& in, const CpuSide& a, const CpuSide& b,
                     const SoftmaxTerm& row_term, const SoftmaxTerm& col_term,
                     double inv_temperature, const ContrastiveOptions& opt) {
  at::Tensor grad = at::empty({a.inv_norm.size(0), in.D}, in.student.options());
  ContrastiveCpuParams p = pass_params(in, a, b, inv_temperature, opt);
  p.row_term = row_term;
  p.col_term = col_term;
  p.grad_x = grad.data_ptr();
  contrastive_grad_pass_cpu(p, kAtenParallelFor);
  return grad.to(in.dtype);
}

struct ContrastiveCpu {
  static constexpr bool kOnHost = true;

  explicit ContrastiveCpu(c10::Device) {}

  void forward(const ContrastiveInputs& in, const at::Tensor&, double tau,
               const ContrastiveOptions& opt, const at::Tensor& weights, at::Tensor& stats,
               at::Tensor& fused_grad) const {
    const CpuSide s_side(in.student, opt.normalize, /*with_packed=*/opt.symmetric);
    const CpuSide t_side(in.teacher, opt.normalize, /*with_packed=*/true);
    ContrastiveCpuParams rows = pass_params(in, s_side, t_side, 1.0 / tau, opt);
    rows.target = maybe_ptr(in.targets);
    rows.lse = stats[kStatLse].data_ptr();
    rows.expect = stats[kStatExpect].data_ptr();
    rows.target_logit = stats[kStatTarget].data_ptr();
    if (weights.defined()) {
      rows.fused_weight = weights.data_ptr();
      rows.fused_grad = fused_grad.data_ptr();
    }
    contrastive_row_pass_cpu(rows, kAtenParallelFor);
    if (opt.symmetric) {  // column statistics: the row pass of (teacher, student)
      ContrastiveCpuParams cols = pass_params(in, t_side, s_side, 1.0 / tau, opt);
      cols.lse = stats[kStatColLse].data_ptr();
      cols.expect = stats[kStatColExpect].data_ptr();
      cols.target_logit = stats[kStatColTarget].data_ptr();
      contrastive_row_pass_cpu(cols, kAtenParallelFor);
    }
  }

  void backward(const ContrastiveInputs& in, const at::Tensor&, double tau,
                const ContrastiveOptions& opt, const BackwardTerms& terms, at::Tensor* grad_student,
                at::Tensor* grad_teacher) const {
    if (grad_student != nullptr) {
      const CpuSide s_side(in.student, opt.normalize, false);
      const CpuSide t_side(in.teacher, opt.normalize, true);
      *grad_student = grad_pass(in, s_side, t_side, terms.row, terms.col, 1.0 / tau, opt);
    }
    if (grad_teacher != nullptr) {
      const CpuSide t_side(in.teacher, opt.normalize, false);
      const CpuSide s_side(in.student, opt.normalize, true);
      // roles swapped: the teacher is the A side, so the column term of the student
      // pass is its row term and vice versa
      *grad_teacher = grad_pass(in, t_side, s_side, terms.col, terms.row, 1.0 / tau, opt);
    }
  }

  void argmax(const ContrastiveInputs& in, const ContrastiveOptions& opt,
              at::Tensor& argmax) const {
    const CpuSide s_side(in.student, opt.normalize, false);
    const CpuSide t_side(in.teacher, opt.normalize, true);
    ContrastiveCpuParams p = pass_params(in, s_side, t_side, 1.0, opt);
    p.argmax = argmax.data_ptr<int64_t>();
    contrastive_row_pass_cpu(p, kAtenParallelFor);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(cifops, CPU, m) {
  m.impl("contrastive_forward", &contrastive_forward_op<ContrastiveCpu>);
  m.impl("contrastive_backward", &contrastive_backward_op<ContrastiveCpu>);
  m.impl("contrastive_accuracy", &contrastive_accuracy_op<ContrastiveCpu>);
}

}  // namespace cifops
