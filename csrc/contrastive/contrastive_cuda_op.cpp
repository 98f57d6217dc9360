// CUDA implementation of the cifops::contrastive_forward / contrastive_backward /
// contrastive_accuracy ops: checks, allocation of the unit copies and launches of
// the torch-free kernels in contrastive_cuda.cu on the current stream.
//
// No device-to-host copy happens (the op can be captured in a CUDA graph), so two
// value checks the CPU makes are not made here: targets outside [0, M) give that
// row a NaN loss, and a temperature tensor on the GPU is not checked for > 0 (a
// CPU temperature, or a Python float, is). The forward never fuses the student
// gradient on CUDA: fused_grad is always empty and the backward recomputes tiles.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "contrastive_host.h"

namespace cifops {
namespace {

#define CIFOPS_CUDA_CHECK(expr) C10_CUDA_CHECK(static_cast<cudaError_t>(expr))

constexpr const char* kLossFn = "cifops.contrastive_loss";
constexpr const char* kAccuracyFn = "cifops.contrastive_accuracy";

// One side as the kernels read it: unit rows in the input dtype (op), in float32
// for half inputs (val; the op copy otherwise), and the inverse norms.
struct CudaSide {
  at::Tensor op, val, inv_norm;
  CudaSide(const at::Tensor& x, bool normalize, void* stream) {
    const ScalarKind kind = scalar_kind(x.scalar_type());
    const int64_t rows = x.size(0), dim = x.size(1);
    const int64_t rows_padded = contrastive_cuda_padded_rows(kind, rows);
    const int64_t dim_padded = contrastive_cuda_padded_dim(kind, dim);
    op = at::empty({rows_padded, dim_padded}, x.options());
    val = at::isReducedFloatingType(x.scalar_type())
              ? at::empty({rows_padded, dim_padded}, x.options().dtype(at::kFloat))
              : op;
    inv_norm = at::empty({rows}, x.options().dtype(at::kDouble));
    CIFOPS_CUDA_CHECK(contrastive_prepare_cuda(
        x.data_ptr(), kind, rows, dim, normalize, op.data_ptr(),
        at::isReducedFloatingType(x.scalar_type()) ? val.data_ptr() : nullptr, inv_norm.data_ptr<double>(),
        stream));
  }
};

ContrastivePass make_pass(int64_t rows, int64_t cols, const CudaSide& a, int64_t dim,
                          int64_t ignore_index) {
  ContrastivePass pass;
  pass.rows = rows;
  pass.cols = cols;
  pass.dim = dim;
  pass.dim_padded = a.op.size(1);
  pass.ignore_index = ignore_index;  // inv_temperature: read from the device
  return pass;
}

const int64_t* maybe_ptr(const std::optional<at::Tensor>& x) {
  return x.has_value() ? x->data_ptr<int64_t>() : nullptr;
}

// 1 / temperature as a 0-dim compute-dtype tensor on the device (no sync).
at::Tensor inverse_temperature(const at::Tensor& temperature, const at::Tensor& like,
                               at::ScalarType compute, const char* fn) {
  const auto opts = like.options().dtype(compute);
  if (temperature.device().is_cpu())
    return at::full({}, 1.0 / checked_temperature(temperature, fn), opts);
  return at::reciprocal(temperature.to(compute).reshape({})).contiguous();
}

struct CudaInputs {
  at::Tensor student, teacher, counted;
  std::optional<at::Tensor> targets;
  ScalarKind kind;
  at::ScalarType compute;
  int64_t N, M, D;
  CudaInputs(const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& tg,
             int64_t ignore_index)
      : student(s.contiguous()), teacher(t.contiguous()), targets(targets_long(tg)) {
    kind = scalar_kind(s.scalar_type());
    compute = contrastive_compute_type(s.scalar_type());
    N = s.size(0);
    M = t.size(0);
    D = s.size(1);
    counted = counted_rows(targets, N, ignore_index, student.options());
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward_cuda_op(
    const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& targets, const at::Tensor& temperature, bool normalize,
    bool symmetric, c10::string_view reduction, int64_t ignore_index,
    bool /*fuse_student_grad: CPU only*/) {
  check_contrastive_args(student, teacher, targets, &temperature, symmetric, kLossFn);
  const ContrastiveReduction red = parse_reduction(reduction, kLossFn);
  const c10::cuda::CUDAGuard guard(student.device());
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const CudaInputs in(student, teacher, targets, ignore_index);
  const at::Tensor inv_tau = inverse_temperature(temperature, in.student, in.compute, kLossFn);
  const auto acc_opts = in.student.options().dtype(in.compute);
  at::Tensor stats = at::zeros({kStatRows, in.N}, acc_opts);
  const CudaSide s_side(in.student, normalize, stream);
  const CudaSide t_side(in.teacher, normalize, stream);
  const ContrastivePass pass = make_pass(in.N, in.M, s_side, in.D, ignore_index);
  CIFOPS_CUDA_CHECK(contrastive_row_pass_cuda(
      in.kind, pass, s_side.op.data_ptr(), t_side.op.data_ptr(), inv_tau.data_ptr(),
      maybe_ptr(in.targets), stats[kStatLse].data_ptr(), stats[kStatExpect].data_ptr(),
      stats[kStatTarget].data_ptr(), nullptr, stream));
  if (symmetric) {  // column statistics: the row pass of (teacher, student)
    const ContrastivePass cpass = make_pass(in.M, in.N, t_side, in.D, ignore_index);
    CIFOPS_CUDA_CHECK(contrastive_row_pass_cuda(
        in.kind, cpass, t_side.op.data_ptr(), s_side.op.data_ptr(), inv_tau.data_ptr(), nullptr,
        stats[kStatColLse].data_ptr(), stats[kStatColExpect].data_ptr(),
        stats[kStatColTarget].data_ptr(), nullptr, stream));
  }
  const at::Tensor loss = loss_from_stats(stats, in.counted, symmetric, red);
  return {loss.to(student.scalar_type()), stats, at::empty({0, 0}, acc_opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_backward_cuda_op(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& targets, const at::Tensor& temperature,
    const at::Tensor& stats, const at::Tensor& fused_grad, bool normalize, bool symmetric,
    c10::string_view reduction, int64_t ignore_index, bool need_student, bool need_teacher,
    bool need_temperature) {
  check_contrastive_args(student, teacher, targets, &temperature, symmetric, kLossFn);
  const ContrastiveReduction red = parse_reduction(reduction, kLossFn);
  const c10::cuda::CUDAGuard guard(student.device());
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const CudaInputs in(student, teacher, targets, ignore_index);
  TORCH_CHECK(grad_loss.device() == student.device() && stats.device() == student.device(),
              "cifops.contrastive_backward: grad_loss and stats must be on ", student.device());
  const bool has_fused =
      check_backward_tensors(grad_loss, stats, fused_grad, in.student, in.N, red);
  const at::ScalarType ct = in.compute;
  const BackwardTerms terms(grad_loss, stats, in.counted, red, ct, symmetric, in.targets);

  at::Tensor grad_student = at::empty({0}, student.options());
  at::Tensor grad_teacher = at::empty({0}, teacher.options());
  at::Tensor grad_temperature = at::empty({0}, temperature.options());
  if (need_student && has_fused)
    grad_student = (fused_grad.to(ct) * grad_loss.to(ct).reshape({})).to(student.scalar_type());
  const bool student_pass = need_student && !has_fused;
  if (student_pass || need_teacher) {
    const at::Tensor inv_tau = inverse_temperature(temperature, in.student, ct, kLossFn);
    const CudaSide s_side(in.student, normalize, stream);
    const CudaSide t_side(in.teacher, normalize, stream);
    const auto run = [&](const CudaSide& a_side, const CudaSide& b_side, int64_t rows,
                         int64_t cols, const SoftmaxTerm& row_term, const SoftmaxTerm& col_term,
                         const at::Tensor& like) {
      const int64_t stride = contrastive_cuda_grad_stride(in.kind, in.D);
      at::Tensor grad_unit = at::empty({a_side.op.size(0), stride}, like.options().dtype(ct));
      at::Tensor grad_x = at::empty({rows, in.D}, like.options());
      const ContrastivePass pass = make_pass(rows, cols, a_side, in.D, ignore_index);
      CIFOPS_CUDA_CHECK(contrastive_grad_pass_cuda(
          in.kind, pass, a_side.op.data_ptr(), a_side.val.data_ptr(), b_side.op.data_ptr(),
          b_side.val.data_ptr(), inv_tau.data_ptr(), row_term, col_term,
          a_side.inv_norm.data_ptr<double>(), normalize, grad_unit.data_ptr(),
          grad_x.data_ptr(), stream));
      return grad_x;
    };
    if (student_pass)
      grad_student = run(s_side, t_side, in.N, in.M, terms.row, terms.col, in.student);
    if (need_teacher)  // roles swapped: the column term of the student pass is its row term
      grad_teacher = run(t_side, s_side, in.M, in.N, terms.col, terms.row, in.teacher);
  }
  if (need_temperature)
    grad_temperature = temperature_grad(terms.stats, terms.w, in.counted, symmetric, temperature);
  return {grad_student, grad_teacher, grad_temperature};
}

at::Tensor contrastive_accuracy_cuda_op(const at::Tensor& student, const at::Tensor& teacher,
                                        const std::optional<at::Tensor>& targets,
                                        bool normalize, int64_t ignore_index) {
  check_contrastive_args(student, teacher, targets, nullptr, false, kAccuracyFn);
  const c10::cuda::CUDAGuard guard(student.device());
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const CudaInputs in(student, teacher, targets, ignore_index);
  const at::Tensor one = at::full({}, 1.0, in.student.options().dtype(in.compute));
  const CudaSide s_side(in.student, normalize, stream);
  const CudaSide t_side(in.teacher, normalize, stream);
  at::Tensor argmax = at::empty({in.N}, student.options().dtype(at::kLong));
  const ContrastivePass pass = make_pass(in.N, in.M, s_side, in.D, ignore_index);
  CIFOPS_CUDA_CHECK(contrastive_row_pass_cuda(in.kind, pass, s_side.op.data_ptr(),
                                              t_side.op.data_ptr(), one.data_ptr(), nullptr,
                                              nullptr, nullptr, nullptr,
                                              argmax.data_ptr<int64_t>(), stream));
  return accuracy_from_argmax(argmax, in.targets, in.counted, in.compute);
}

}  // namespace

TORCH_LIBRARY_IMPL(cifops, CUDA, m) {
  m.impl("contrastive_forward", &contrastive_forward_cuda_op);
  m.impl("contrastive_backward", &contrastive_backward_cuda_op);
  m.impl("contrastive_accuracy", &contrastive_accuracy_cuda_op);
}

}  // namespace cifops
