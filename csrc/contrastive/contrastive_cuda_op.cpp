// CUDA implementation of the cifops::contrastive_forward / contrastive_backward /
// contrastive_accuracy ops: the CUDA backend (ContrastiveCuda) of the op bodies in
// contrastive_host.h: the chunk loop, and launches on the current stream.
//
// Per chunk of rows of A (student rows, or teacher rows for the symmetric column
// statistics), the logits A_chunk . B^T come from cuBLAS through ATen (float32 output
// for float16/bfloat16 inputs via mm's out_dtype; float32 inputs follow torch's matmul
// precision setting, full float32 by default), one kernel (contrastive_cuda.cu) turns
// each logit row into its statistics and, when a gradient is wanted, the G row, and
// cuBLAS forms G . B for this side and accumulates G^T . A_chunk for the other. The
// chunk's rows are sized so that the whole op stays within 1 GiB of extra memory
// (chunk_workspace_bytes), so memory is O((N + M) D) plus a bounded chunk, whatever N
// is. Every reduction runs in a fixed order: the results are identical run to run for
// the same shapes (which fix the chunk size) and cuBLAS settings.
//
// For a scalar, non-symmetric loss the forward also finishes the student gradient
// (fused_grad, as on the CPU): the backward of the frozen-teacher case only scales it,
// so forward + backward is two products.
//
// No device-to-host copy happens (the op can be captured in a CUDA graph), so two
// value checks the CPU makes are not made here: targets outside [0, M) give that row
// a NaN loss, and a temperature tensor on the GPU is not checked for > 0 (a CPU
// temperature, or a Python float, is).
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "common/cuda_check.h"
#include "contrastive_host.h"

namespace cifops {
namespace {

// One side: the unit rows in the input dtype (the matmul operand) and 1 / max(||x||, eps).
struct CudaSide {
  at::Tensor x, unit, inv_norm;
  ContrastiveSideParams params;  // x, unit and inv_norm; the unit backward adds its own
  CudaSide(const at::Tensor& x_, bool normalize, void* stream)
      : x(x_),
        unit(at::empty_like(x_)),
        inv_norm(at::empty({x_.size(0)}, x_.options().dtype(at::kDouble))) {
    params.kind = scalar_kind(x.scalar_type());
    params.rows = x.size(0);
    params.dim = x.size(1);
    params.normalize = normalize;
    params.x = x.data_ptr();
    params.unit = unit.data_ptr();
    params.inv_norm = inv_norm.data_ptr<double>();
    CIFOPS_CUDA_CHECK(contrastive_prepare_cuda(params, stream));
  }
};

// out [rows][cols] (acc_t) = a . b^T, or += when accumulate; half operands give
// float32 out through mm's out_dtype.
void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b_t, bool accumulate) {
  const bool mixed = out.scalar_type() != a.scalar_type();
  if (accumulate) {
    if (mixed)
      at::addmm_out(out, out, a, b_t, out.scalar_type(), 1, 1);
    else
      at::addmm_out(out, out, a, b_t, 1, 1);
  } else {
    if (mixed)
      at::mm_out(out, a, b_t, out.scalar_type());
    else
      at::mm_out(out, a, b_t);
  }
}

// 1 / temperature as a 0-dim compute-dtype tensor on the device (no sync); tau is
// checked_temperature's value of a CPU temperature.
at::Tensor inverse_temperature(const at::Tensor& temperature, double tau, const at::Tensor& like,
                               at::ScalarType compute) {
  const auto opts = like.options().dtype(compute);
  if (temperature.device().is_cpu()) return at::full({}, 1.0 / tau, opts);
  return at::reciprocal(temperature.to(compute).reshape({})).contiguous();
}

// The op's extra memory: at most kExtraBudget for everything it allocates, whatever N
// and M are, as far as the chunk's floor of 128 rows allows.
constexpr int64_t kExtraBudget = int64_t{1} << 30;
constexpr int64_t kMinWorkspace = int64_t{64} << 20;

// The chunk workspace bound in bytes (logits and G of one chunk): the budget less what
// the op holds besides the chunk, an upper bound of (N + M) D elements in the input dtype
// (the unit rows of both sides) and twice in the compute dtype (their gradients and the
// gradient outputs), and at least kMinWorkspace. At N = M = 32768, D = 768 bfloat16:
// 1 GiB - 480 MiB = 544 MiB, chunks of 2816 rows (logits and G: 6 bytes a column), so
// the G . B product (K = M) has 22 x 6 output tiles of 128 x 128, enough for the SMs
// without split-K, and the teacher is re-read 12 times instead of 128.
// CIFOPS_CONTRASTIVE_CHUNK_MIB sets the bound instead (a tuning knob for benchmarks).
int64_t chunk_workspace_bytes(const ContrastiveInputs& in) {
  if (const char* env = std::getenv("CIFOPS_CONTRASTIVE_CHUNK_MIB")) {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && v >= 1 && v <= (1 << 20),
                "cifops: CIFOPS_CONTRASTIVE_CHUNK_MIB must be an integer in [1, 1048576], got '",
                env, "'");
    return static_cast<int64_t>(v) << 20;
  }
  const int64_t per_element =
      in.student.element_size() + 2 * static_cast<int64_t>(c10::elementSize(in.compute));
  const int64_t held = (in.N + in.M) * in.D * per_element;
  return std::max(kMinWorkspace, kExtraBudget - held);
}

// Rows per chunk for `cols` columns at `bytes` per logit element (logits plus G): a
// multiple of 128 (the matmul tile) within the workspace bound, at least 128.
int64_t chunk_rows(int64_t rows, int64_t cols, int64_t bytes, int64_t workspace) {
  if (rows == 0) return 1;
  int64_t r = cols > 0 ? workspace / (cols * bytes) : rows;
  r = r / 128 * 128;
  if (r < 128) r = 128;
  return r < rows ? r : rows;
}

// G's scale and the matching output scale. float16 cannot hold a G of small weights
// (a 1/N mean times probabilities near 1/M underflows), so for float16 inputs G is
// written divided by the largest weight (as a device value, no sync) and the products
// are multiplied back in the unit backward: out_scale = (1/tau) * wmax. bfloat16 has
// float32's exponent range and needs no rescaling (nor the kernels that compute it).
// Without rescaling, grad_scale is undefined and out_scale is 1/tau.
struct GradScale {
  at::Tensor grad_scale, out_scale;
  GradScale(const ContrastiveInputs& in, const at::Tensor& weights, const at::Tensor& inv_tau) {
    if (in.student.scalar_type() != at::kHalf) {
      out_scale = inv_tau;
      return;
    }
    const at::Tensor wmax = at::amax(at::abs(weights)).reshape({});
    const at::Tensor positive = wmax > 0;
    grad_scale = at::where(positive, at::reciprocal(at::where(positive, wmax, 1.0)), 0.0)
                     .to(in.compute)
                     .contiguous();
    out_scale = (inv_tau * wmax).to(in.compute).contiguous();
  }
  const void* grad_ptr() const { return grad_scale.defined() ? grad_scale.data_ptr() : nullptr; }
};

// The chunk loop over the rows of `a` against all rows of `b`. Per chunk, logits, then
// the softmax kernel with `proto` (its statistics pointers and terms; row0, rows, cols
// and the buffers filled in here), then, with a G: grad_a rows += nothing, = G . b, and
// grad_b += G^T . a_chunk (each may be undefined: not wanted).
void chunk_loop(const ContrastiveInputs& in, const at::Tensor& a_unit, const at::Tensor& b_unit,
                ContrastiveChunk proto, bool with_grad, at::Tensor* grad_a, at::Tensor* grad_b,
                void* stream) {
  const int64_t R = a_unit.size(0), C = b_unit.size(0);
  if (R == 0) return;
  const int64_t acc_bytes = static_cast<int64_t>(c10::elementSize(in.compute));
  const int64_t g_bytes = with_grad ? a_unit.element_size() : 0;
  const int64_t rc = chunk_rows(R, C, acc_bytes + g_bytes, chunk_workspace_bytes(in));
  at::Tensor logits_buf = at::empty({rc * C}, a_unit.options().dtype(in.compute));
  at::Tensor g_buf = with_grad ? at::empty({rc * C}, a_unit.options()) : at::Tensor();
  const at::Tensor b_t = b_unit.t();
  for (int64_t r0 = 0; r0 < R; r0 += rc) {
    const int64_t rows = R - r0 < rc ? R - r0 : rc;
    const at::Tensor a_chunk = a_unit.narrow(0, r0, rows);
    at::Tensor logits = logits_buf.narrow(0, 0, rows * C).view({rows, C});
    matmul_into(logits, a_chunk, b_t, false);
    ContrastiveChunk chunk = proto;
    chunk.logits = logits.data_ptr();
    chunk.rows = rows;
    chunk.cols = C;
    chunk.row0 = r0;
    at::Tensor g;
    if (with_grad) {
      g = g_buf.narrow(0, 0, rows * C).view({rows, C});
      chunk.grad = g.data_ptr();
    }
    CIFOPS_CUDA_CHECK(contrastive_softmax_rows_cuda(in.kind, chunk, stream));
    if (!with_grad) continue;
    if (grad_a != nullptr && grad_a->defined()) {
      at::Tensor out = grad_a->narrow(0, r0, rows);
      matmul_into(out, g, b_unit, false);
    }
    if (grad_b != nullptr && grad_b->defined()) matmul_into(*grad_b, g.t(), a_chunk, true);
  }
}

// grad_x, dL/dx of one side (in x's dtype, or in acc_t), from its grad_unit (acc_t [R][D]).
void unit_backward(const CudaSide& side, const at::Tensor& grad_unit, const at::Tensor& out_scale,
                   at::Tensor& grad_x, void* stream) {
  ContrastiveSideParams p = side.params;
  p.grad_unit = grad_unit.data_ptr();
  p.out_scale = out_scale.data_ptr();
  p.out_acc = grad_x.scalar_type() != side.x.scalar_type();
  p.grad_x = grad_x.data_ptr();
  CIFOPS_CUDA_CHECK(contrastive_unit_backward_cuda(p, stream));
}

class ContrastiveCuda {
 public:
  static constexpr bool kOnHost = false;

  explicit ContrastiveCuda(c10::Device device)
      : guard_(device), stream_(c10::cuda::getCurrentCUDAStream().stream()) {}

  void forward(const ContrastiveInputs& in, const at::Tensor& temperature, double tau,
               const ContrastiveOptions& opt, const at::Tensor& weights, at::Tensor& stats,
               at::Tensor& fused_grad) const {
    const at::Tensor inv_tau = inverse_temperature(temperature, tau, in.student, in.compute);
    const CudaSide s_side(in.student, opt.normalize, stream_);
    const CudaSide t_side(in.teacher, opt.normalize, stream_);
    ContrastiveChunk proto;
    proto.inv_temperature = inv_tau.data_ptr();
    proto.ignore_index = opt.ignore_index;
    proto.target = maybe_ptr(in.targets);
    proto.lse = stats[kStatLse].data_ptr();
    proto.expect = stats[kStatExpect].data_ptr();
    proto.target_logit = stats[kStatTarget].data_ptr();
    if (weights.defined()) {  // the student gradient of the loss for grad_loss = 1
      const GradScale scale(in, weights, inv_tau);
      proto.row = SoftmaxTerm{weights.data_ptr(), nullptr, maybe_ptr(in.targets)};
      proto.grad_scale = scale.grad_ptr();
      at::Tensor grad_unit = at::empty({in.N, in.D}, stats.options());
      chunk_loop(in, s_side.unit, t_side.unit, proto, true, &grad_unit, nullptr, stream_);
      unit_backward(s_side, grad_unit, scale.out_scale, fused_grad, stream_);
    } else {
      chunk_loop(in, s_side.unit, t_side.unit, proto, false, nullptr, nullptr, stream_);
    }
    if (opt.symmetric) {  // column statistics: the row statistics of (teacher, student)
      ContrastiveChunk cproto;
      cproto.inv_temperature = inv_tau.data_ptr();
      cproto.ignore_index = opt.ignore_index;
      cproto.lse = stats[kStatColLse].data_ptr();
      cproto.expect = stats[kStatColExpect].data_ptr();
      cproto.target_logit = stats[kStatColTarget].data_ptr();
      chunk_loop(in, t_side.unit, s_side.unit, cproto, false, nullptr, nullptr, stream_);
    }
  }

  void backward(const ContrastiveInputs& in, const at::Tensor& temperature, double tau,
                const ContrastiveOptions& opt, const BackwardTerms& terms, at::Tensor* grad_student,
                at::Tensor* grad_teacher) const {
    const at::Tensor inv_tau = inverse_temperature(temperature, tau, in.student, in.compute);
    const CudaSide s_side(in.student, opt.normalize, stream_);
    const CudaSide t_side(in.teacher, opt.normalize, stream_);
    const GradScale scale(in, terms.a, inv_tau);
    const auto acc_opts = in.student.options().dtype(in.compute);
    ContrastiveChunk proto;
    proto.inv_temperature = inv_tau.data_ptr();
    proto.ignore_index = opt.ignore_index;
    proto.target = maybe_ptr(in.targets);
    proto.grad_scale = scale.grad_ptr();
    proto.row = terms.row;
    proto.col = terms.col;
    at::Tensor grad_unit_s = grad_student ? at::empty({in.N, in.D}, acc_opts) : at::Tensor();
    at::Tensor grad_unit_t = grad_teacher ? at::zeros({in.M, in.D}, acc_opts) : at::Tensor();
    chunk_loop(in, s_side.unit, t_side.unit, proto, true, &grad_unit_s, &grad_unit_t, stream_);
    if (grad_student != nullptr) {
      *grad_student = at::empty_like(in.student);
      unit_backward(s_side, grad_unit_s, scale.out_scale, *grad_student, stream_);
    }
    if (grad_teacher != nullptr) {
      *grad_teacher = at::empty_like(in.teacher);
      unit_backward(t_side, grad_unit_t, scale.out_scale, *grad_teacher, stream_);
    }
  }

  void argmax(const ContrastiveInputs& in, const ContrastiveOptions& opt,
              at::Tensor& argmax) const {
    const at::Tensor one = at::full({}, 1.0, in.student.options().dtype(in.compute));
    const CudaSide s_side(in.student, opt.normalize, stream_);
    const CudaSide t_side(in.teacher, opt.normalize, stream_);
    ContrastiveChunk proto;
    proto.inv_temperature = one.data_ptr();
    proto.ignore_index = opt.ignore_index;
    proto.argmax = argmax.data_ptr<int64_t>();
    chunk_loop(in, s_side.unit, t_side.unit, proto, false, nullptr, nullptr, stream_);
  }

 private:
  const c10::cuda::CUDAGuard guard_;
  void* const stream_;
};

}  // namespace

TORCH_LIBRARY_IMPL(cifops, CUDA, m) {
  m.impl("contrastive_forward", &contrastive_forward_op<ContrastiveCuda>);
  m.impl("contrastive_backward", &contrastive_backward_op<ContrastiveCuda>);
  m.impl("contrastive_accuracy", &contrastive_accuracy_op<ContrastiveCuda>);
}

}  // namespace cifops
