// Host side of the cifops::cif_forward / cif_backward ops, shared by their CPU and CUDA
// bindings: argument checks with messages that name the argument, workspace allocation,
// the translation of per-utterance scan statuses into errors, and the op bodies
// themselves (cif_forward_op, cif_backward_op), written once for both backends.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "cif.h"
#include "common/host.h"

namespace cifops {

// Checks shared by cif_forward and cif_backward. Only metadata is checked here;
// values (negative alphas, lengths > T, ...) are checked by the scan.
inline void check_cif_args(const at::Tensor& hidden, const at::Tensor& alphas,
                           const std::optional<at::Tensor>& lengths,
                           const std::optional<at::Tensor>& target_lengths, double threshold,
                           double scale_eps, std::optional<double> tail_threshold) {
  TORCH_CHECK(hidden.dim() == 3, "cifops.cif: hidden must be a 3-D tensor [B, T, D], got shape ",
              hidden.sizes());
  TORCH_CHECK(is_supported_float(hidden.scalar_type()),
              "cifops.cif: hidden must be " CIFOPS_FLOAT_DTYPES ", got ", hidden.scalar_type());
  TORCH_CHECK(alphas.dim() == 2, "cifops.cif: alphas must be a 2-D tensor [B, T], got shape ",
              alphas.sizes());
  TORCH_CHECK(is_supported_float(alphas.scalar_type()),
              "cifops.cif: alphas must be " CIFOPS_FLOAT_DTYPES ", got ", alphas.scalar_type());
  TORCH_CHECK(alphas.size(0) == hidden.size(0) && alphas.size(1) == hidden.size(1),
              "cifops.cif: alphas must have shape [B, T] = [", hidden.size(0), ", ", hidden.size(1),
              "] to match hidden, got ", alphas.sizes());
  check_same_device(alphas, "alphas", hidden, "hidden", "cifops.cif");
  auto check_lengths = [&](const std::optional<at::Tensor>& x, const char* name) {
    if (!x.has_value()) return;
    TORCH_CHECK(x->dim() == 1 && x->size(0) == hidden.size(0), "cifops.cif: ", name,
                " must be a 1-D tensor [B] = [", hidden.size(0), "], got shape ", x->sizes());
    TORCH_CHECK(at::isIntegralType(x->scalar_type(), /*includeBool=*/false), "cifops.cif: ", name,
                " must be an integer tensor, got ", x->scalar_type());
    check_same_device(*x, name, hidden, "hidden", "cifops.cif");
  };
  check_lengths(lengths, "lengths");
  check_lengths(target_lengths, "target_lengths");
  TORCH_CHECK(std::isfinite(threshold) && threshold > 0,
              "cifops.cif: threshold must be a finite number > 0, got ", threshold);
  // scale_eps is used only by the target-length scaling, so only checked with targets
  // (cif_backward passes no targets: the forward checked it, and the saved scale is used)
  if (target_lengths.has_value())
    TORCH_CHECK(std::isfinite(scale_eps) && scale_eps >= 0 && scale_eps < threshold,
                "cifops.cif: scale_eps must be in [0, threshold) = [0, ", threshold,
                ") when target_lengths is given, got ", scale_eps);
  if (tail_threshold.has_value())
    TORCH_CHECK(std::isfinite(*tail_threshold) && *tail_threshold >= 0,
                "cifops.cif: tail_threshold must be a finite number >= 0 or None, got ",
                *tail_threshold);
}

// Checks of cif_backward's own arguments, on top of check_cif_args.
inline void check_cif_backward_args(const at::Tensor& grad_embeds,
                                    const std::optional<at::Tensor>& grad_alpha_sum,
                                    const at::Tensor& hidden) {
  TORCH_CHECK(grad_embeds.dim() == 3 && grad_embeds.size(0) == hidden.size(0) &&
                  grad_embeds.size(2) == hidden.size(2),
              "cifops.cif_backward: grad_embeds must have shape [B, N, D] with B = ",
              hidden.size(0), ", D = ", hidden.size(2), ", got ", grad_embeds.sizes());
  check_same_device(grad_embeds, "grad_embeds", hidden, "hidden", "cifops.cif_backward");
  if (grad_alpha_sum.has_value()) {
    TORCH_CHECK(grad_alpha_sum->dim() == 1 && grad_alpha_sum->size(0) == hidden.size(0),
                "cifops.cif_backward: grad_alpha_sum must have shape [B], got ",
                grad_alpha_sum->sizes());
    check_same_device(*grad_alpha_sum, "grad_alpha_sum", hidden, "hidden", "cifops.cif_backward");
  }
}

// max_tokens: -1 (the batch's largest token count) or an output width N whose outputs
// embeds [B, N, D] and fire_frames [B, N] int64 have a size that fits in int64 bytes.
inline void check_max_tokens(int64_t max_tokens, const at::Tensor& hidden,
                             const char* fn = "cifops.cif") {
  TORCH_CHECK(max_tokens >= -1, fn, ": max_tokens must be >= 0 or None, got ", max_tokens);
  if (max_tokens <= 0) return;
  const int64_t B = hidden.size(0), D = hidden.size(2);
  int64_t elements = 0, embeds_bytes = 0, fire_bytes = 0;
  const bool overflow = c10::mul_overflows(B, max_tokens, &elements) ||
                        c10::mul_overflows(elements, int64_t(sizeof(int64_t)), &fire_bytes) ||
                        c10::mul_overflows(elements, D, &elements) ||
                        c10::mul_overflows(elements, int64_t(hidden.element_size()), &embeds_bytes);
  TORCH_CHECK(!overflow, fn, ": max_tokens = ", max_tokens,
              " is too large: the outputs embeds [B, N, D] = [", B, ", ", max_tokens, ", ", D,
              "] and fire_frames [B, N] would exceed 2^63 bytes; use None (the batch's largest ",
              "token count) or a width that fits in memory");
}

inline CifConfig make_cif_config(const at::Tensor& hidden, double threshold, double scale_eps,
                                 std::optional<double> tail_threshold, bool tail_normalize,
                                 int64_t max_tokens) {
  CifConfig cfg;
  cfg.batch = hidden.size(0);
  cfg.frames = hidden.size(1);
  cfg.dim = hidden.size(2);
  cfg.max_tokens = max_tokens;
  cfg.threshold = threshold;
  cfg.scale_eps = scale_eps;
  cfg.has_tail_threshold = tail_threshold.has_value();
  cfg.tail_threshold = tail_threshold.value_or(0.0);
  cfg.tail_normalize = tail_normalize;
  return cfg;
}

// The scan's workspace as two flat tensors. The forward op returns them as its last
// two outputs and autograd saves them, so the backward runs no second scan:
//   scan_real  float64 [B (T + 1) + B kRowReal]  prefix sums P [B][T+1], then B CifRowReal
//   scan_int   int64   [B T + B kRowInfo]         token_after [B][T], then B CifRowInfo
// (sizes: cif_workspace_size in cif.h).

struct CifWorkspaceTensors {
  int64_t batch, frames;
  at::Tensor real, ints;
  CifWorkspaceTensors(int64_t B, int64_t T, const at::TensorOptions& opts)
      : batch(B),
        frames(T),
        real(at::empty({cif_workspace_size(B, T).real}, opts.dtype(at::kDouble))),
        ints(at::empty({cif_workspace_size(B, T).ints}, opts.dtype(at::kLong))) {}
  // The saved workspace of a forward (cif_backward's scan_real / scan_int).
  CifWorkspaceTensors(const at::Tensor& scan_real, const at::Tensor& scan_int,
                      const at::Tensor& hidden)
      : batch(hidden.size(0)), frames(hidden.size(1)), real(scan_real), ints(scan_int) {
    const char* fn = "cifops.cif_backward: ";
    const CifWorkspaceSize size = cif_workspace_size(batch, frames);
    TORCH_CHECK(real.scalar_type() == at::kDouble && real.dim() == 1 && real.size(0) == size.real &&
                    real.is_contiguous(),
                fn, "scan_real must be the forward's contiguous float64 [", size.real,
                "] workspace, got ", real.scalar_type(), " ", real.sizes());
    TORCH_CHECK(ints.scalar_type() == at::kLong && ints.dim() == 1 && ints.size(0) == size.ints &&
                    ints.is_contiguous(),
                fn, "scan_int must be the forward's contiguous int64 [", size.ints,
                "] workspace, got ", ints.scalar_type(), " ", ints.sizes());
    check_same_device(real, "scan_real", hidden, "hidden", "cifops.cif_backward");
    check_same_device(ints, "scan_int", hidden, "hidden", "cifops.cif_backward");
  }
  CifWorkspace view() const {
    return cif_workspace(real.data_ptr<double>(), ints.data_ptr<int64_t>(), batch, frames);
  }
  // The B CifRowInfo records as an int64 [B][kRowInfo] tensor (for check_scan_status).
  at::Tensor row_info() const {
    return ints.narrow(0, cif_workspace_size(batch, frames).token_after, batch * kRowInfo)
        .view({batch, kRowInfo});
  }
};

// The CifParams of a forward's scan (both backends): alphas in the compute dtype, the
// optional lengths as int64, and the token_lengths / alpha_sum outputs it writes.
inline CifParams cif_scan_params(const CifConfig& cfg, const CifWorkspaceTensors& ws,
                                 const at::Tensor& alphas, const std::optional<at::Tensor>& lengths,
                                 const std::optional<at::Tensor>& target_lengths,
                                 at::Tensor& token_lengths, at::Tensor& alpha_sum) {
  CifParams p;
  p.cfg = cfg;
  p.ws = ws.view();
  p.alpha_kind = scalar_kind(alphas.scalar_type());
  p.alphas = alphas.data_ptr();
  p.lengths = maybe_ptr(lengths);
  p.target_lengths = maybe_ptr(target_lengths);
  p.token_lengths = token_lengths.data_ptr<int64_t>();
  p.alpha_sum = alpha_sum.data_ptr();
  return p;
}

// Adds the forward's fields to the scan's params, once the width N is known.
inline void cif_set_forward_params(CifParams& p, int64_t n_out, const at::Tensor& hidden,
                                   at::Tensor& embeds, at::Tensor& fire_frames) {
  p.n_out = n_out;
  p.hidden_kind = scalar_kind(hidden.scalar_type());
  p.hidden = hidden.data_ptr();
  p.embeds = embeds.data_ptr();
  p.fire_frames = fire_frames.data_ptr<int64_t>();
}

// The CifParams of a backward (both backends), every tensor dense and in the compute
// dtype the binding chose.
inline CifParams cif_backward_params(const CifConfig& cfg, const CifWorkspaceTensors& ws,
                                     const at::Tensor& grad_embeds,
                                     const std::optional<at::Tensor>& grad_alpha_sum,
                                     const at::Tensor& hidden, const at::Tensor& alphas,
                                     at::Tensor& dots, at::Tensor& grad_hidden,
                                     at::Tensor& grad_alphas) {
  CifParams p;
  p.cfg = cfg;
  p.n_out = grad_embeds.size(1);
  p.ws = ws.view();
  p.hidden_kind = scalar_kind(hidden.scalar_type());
  p.alpha_kind = scalar_kind(alphas.scalar_type());
  p.grad_embeds = grad_embeds.data_ptr();
  p.grad_alpha_sum = grad_alpha_sum.has_value() ? grad_alpha_sum->data_ptr() : nullptr;
  p.hidden = hidden.data_ptr();
  p.alphas = alphas.data_ptr();
  p.dots = dots.data_ptr<double>();
  p.grad_hidden = grad_hidden.data_ptr();
  p.grad_alphas = grad_alphas.data_ptr();
  return p;
}

// Raise the first per-utterance error found by the scan. row_info is on the CPU.
// Returns the largest token count (complete + tail) over the batch.
inline int64_t check_scan_status(const at::Tensor& row_info_cpu, const at::Tensor& alphas,
                                 const std::optional<at::Tensor>& lengths,
                                 const std::optional<at::Tensor>& target_lengths) {
  const auto* info = reinterpret_cast<const CifRowInfo*>(row_info_cpu.data_ptr<int64_t>());
  int64_t max_total = 0;
  for (int64_t b = 0; b < row_info_cpu.size(0); ++b) {
    const CifRowInfo& row = info[b];
    const int64_t where = row.where;
    switch (row.status) {
      case kCifOk:
        break;
      case kCifBadAlpha:
        TORCH_CHECK(false, "cifops.cif: alphas must be finite and >= 0, got alphas[", b, ", ",
                    where, "] = ", alphas.select(0, b).select(0, where).item<double>());
      case kCifBadLength:
        TORCH_CHECK(false, "cifops.cif: lengths must be in [0, T] = [0, ", alphas.size(1),
                    "], got lengths[", b, "] = ", lengths->select(0, b).item<int64_t>());
      case kCifBadTarget:
        TORCH_CHECK(false, "cifops.cif: target_lengths must be >= 0, got target_lengths[", b,
                    "] = ", target_lengths->select(0, b).item<int64_t>());
      case kCifZeroSumTarget:
        TORCH_CHECK(false, "cifops.cif: target_lengths[", b,
                    "] = ", target_lengths->select(0, b).item<int64_t>(),
                    " but the valid alphas of utterance ", b,
                    " sum to zero, so no scaling can reach the target");
      case kCifTooManyTokens:
        TORCH_CHECK(false, "cifops.cif: the alphas of utterance ", b, " integrate to more than ",
                    "2^53 thresholds by frame ", where, "; token counts would not be exact");
      default:
        TORCH_CHECK(false, "cifops.cif: internal error, unknown scan status");
    }
    if (row.total > max_total) max_total = row.total;
  }
  return max_total;
}

// ----------------------------------------------------------------------------
// The op bodies, written once: the Backend (CifCpu in cif_cpu_op.cpp, CifCuda in
// cif_cuda_op.cpp) is the only difference. One is constructed from hidden's device for
// the call, after the argument checks (CUDA: the device guard and the current stream),
// and provides
//   kStatusOnHost     the scan's statuses can be read without a device-to-host copy, so
//                     they are always checked (the CPU); else only without max_tokens
//   kHalfHidden       the forward and backward kernels read float16/bfloat16 hidden as it
//                     is (CUDA); else hidden is converted to the compute dtype and the
//                     results are cast back
//   empty_large(sizes, options)   a large output (embeds, grad_hidden)
//   scan(p), forward(p), backward(p)   the kernels on CifParams; they raise on an error
// and, for cif_stream_step (cif_stream_host.h), stream_scan(p) and stream_embed(p).

using CifForwardOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// hidden as the Backend's forward and backward kernels read it, contiguous.
template <typename Backend>
at::Tensor cif_kernel_hidden(const at::Tensor& hidden) {
  return Backend::kHalfHidden ? hidden.contiguous() : to_compute(hidden);
}

// cifops::cif_forward. With max_tokens given, a backend without kStatusOnHost makes no
// device-to-host copy (value errors in the inputs then surface as utterances with no
// tokens, since raising would need a sync); without it the per-utterance statuses are
// copied back once, and errors are raised as on the CPU. The scan's workspace is returned
// with the outputs, and the backward reads it (no second scan).
template <typename Backend>
CifForwardOutputs cif_forward_op(const at::Tensor& hidden, const at::Tensor& alphas,
                                 const std::optional<at::Tensor>& lengths,
                                 const std::optional<at::Tensor>& target_lengths, double threshold,
                                 double scale_eps, std::optional<double> tail_threshold,
                                 bool tail_normalize, int64_t max_tokens) {
  check_cif_args(hidden, alphas, lengths, target_lengths, threshold, scale_eps, tail_threshold);
  check_max_tokens(max_tokens, hidden);
  const Backend backend(hidden.device());
  const CifConfig cfg =
      make_cif_config(hidden, threshold, scale_eps, tail_threshold, tail_normalize, max_tokens);
  const at::Tensor h = cif_kernel_hidden<Backend>(hidden), a = to_compute(alphas);
  const auto len = to_long(lengths), tgt = to_long(target_lengths);
  CifWorkspaceTensors ws(cfg.batch, cfg.frames, hidden.options());
  at::Tensor token_lengths = at::empty({cfg.batch}, hidden.options().dtype(at::kLong));
  at::Tensor alpha_sum = at::empty({cfg.batch}, a.options());
  CifParams params = cif_scan_params(cfg, ws, a, len, tgt, token_lengths, alpha_sum);
  backend.scan(params);
  int64_t n_out = max_tokens;
  if (max_tokens < 0 || Backend::kStatusOnHost) {
    const at::Tensor info = Backend::kStatusOnHost ? ws.row_info() : ws.row_info().cpu();
    const int64_t max_total = check_scan_status(info, alphas, len, tgt);
    if (max_tokens < 0) n_out = max_total;
  }
  at::Tensor embeds = backend.empty_large({cfg.batch, n_out, cfg.dim}, h.options());
  at::Tensor fire_frames = at::empty({cfg.batch, n_out}, hidden.options().dtype(at::kLong));
  cif_set_forward_params(params, n_out, h, embeds, fire_frames);
  backend.forward(params);
  return {embeds.to(hidden.scalar_type()),
          token_lengths,
          fire_frames,
          alpha_sum.to(compute_type(alphas.scalar_type())),
          ws.real,
          ws.ints};
}

// cifops::cif_backward, from the forward's saved scan workspace.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> cif_backward_op(
    const at::Tensor& grad_embeds, const std::optional<at::Tensor>& grad_alpha_sum,
    const at::Tensor& hidden, const at::Tensor& alphas, const at::Tensor& scan_real,
    const at::Tensor& scan_int, double threshold, double scale_eps,
    std::optional<double> tail_threshold, bool tail_normalize) {
  check_cif_args(hidden, alphas, std::nullopt, std::nullopt, threshold, scale_eps, tail_threshold);
  check_cif_backward_args(grad_embeds, grad_alpha_sum, hidden);
  const CifWorkspaceTensors ws(scan_real, scan_int, hidden);
  const Backend backend(hidden.device());
  const int64_t n_out = grad_embeds.size(1);
  const CifConfig cfg =
      make_cif_config(hidden, threshold, scale_eps, tail_threshold, tail_normalize, n_out);
  const at::Tensor h = cif_kernel_hidden<Backend>(hidden), a = to_compute(alphas);
  const at::Tensor g = grad_embeds.to(h.scalar_type()).contiguous();
  std::optional<at::Tensor> gs;
  if (grad_alpha_sum.has_value()) gs = grad_alpha_sum->to(a.scalar_type()).contiguous();
  at::Tensor dots = at::empty({cfg.batch, cfg.frames, 2}, hidden.options().dtype(at::kDouble));
  at::Tensor grad_hidden = backend.empty_large(h.sizes(), h.options());
  at::Tensor grad_alphas = at::empty_like(a);
  const CifParams params =
      cif_backward_params(cfg, ws, g, gs, h, a, dots, grad_hidden, grad_alphas);
  backend.backward(params);
  return {grad_hidden.to(hidden.scalar_type()), grad_alphas.to(alphas.scalar_type())};
}

}  // namespace cifops
