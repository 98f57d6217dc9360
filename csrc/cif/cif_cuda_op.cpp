// CUDA implementation of the cifops::cif_forward / cif_backward ops: checks,
// allocation and launches of the torch-free kernels in cif_cuda.cu on the
// current stream. With max_tokens given there is no device-to-host copy (value
// errors in the inputs then surface as utterances with no tokens, since raising
// would need a sync); without it the per-utterance token counts and statuses
// are copied back once, and errors are raised like on the CPU. The scan's
// workspace is returned with the outputs, and the backward reads it (no second scan).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cif_host.h"
#include "common/cuda_check.h"

namespace cifops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cif_forward_cuda_op(const at::Tensor& hidden, const at::Tensor& alphas,
                    const std::optional<at::Tensor>& lengths,
                    const std::optional<at::Tensor>& target_lengths, double threshold,
                    double scale_eps, std::optional<double> tail_threshold, bool tail_normalize,
                    int64_t max_tokens) {
  check_cif_args(hidden, alphas, lengths, target_lengths, threshold, scale_eps, tail_threshold);
  check_max_tokens(max_tokens, hidden);
  const c10::cuda::CUDAGuard guard(hidden.device());
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const CifConfig cfg =
      make_cif_config(hidden, threshold, scale_eps, tail_threshold, tail_normalize, max_tokens);
  const at::Tensor h = hidden.contiguous(), a = to_compute(alphas);  // hidden in its own dtype
  const auto len = to_long(lengths), tgt = to_long(target_lengths);
  CifWorkspaceTensors ws(cfg.batch, cfg.frames, hidden.options());
  at::Tensor token_lengths = at::empty({cfg.batch}, hidden.options().dtype(at::kLong));
  at::Tensor alpha_sum = at::empty({cfg.batch}, a.options());
  CifParams params = cif_scan_params(cfg, ws, a, len, tgt, token_lengths, alpha_sum);
  CIFOPS_CUDA_CHECK(cif_scan_cuda(params, stream));
  const int64_t n_out =
      max_tokens >= 0 ? max_tokens : check_scan_status(ws.row_info().cpu(), alphas, len, tgt);
  at::Tensor embeds = at::empty({cfg.batch, n_out, cfg.dim}, h.options());
  at::Tensor fire_frames = at::empty({cfg.batch, n_out}, hidden.options().dtype(at::kLong));
  cif_set_forward_params(params, n_out, h, embeds, fire_frames);
  CIFOPS_CUDA_CHECK(cif_forward_cuda(params, stream));
  return {embeds, token_lengths, fire_frames,
          alpha_sum.to(compute_type(alphas.scalar_type())), ws.real, ws.ints};
}

std::tuple<at::Tensor, at::Tensor> cif_backward_cuda_op(
    const at::Tensor& grad_embeds, const std::optional<at::Tensor>& grad_alpha_sum,
    const at::Tensor& hidden, const at::Tensor& alphas, const at::Tensor& scan_real,
    const at::Tensor& scan_int, double threshold, double scale_eps,
    std::optional<double> tail_threshold, bool tail_normalize) {
  check_cif_args(hidden, alphas, std::nullopt, std::nullopt, threshold, scale_eps,
                 tail_threshold);
  check_cif_backward_args(grad_embeds, grad_alpha_sum, hidden);
  const CifWorkspaceTensors ws(scan_real, scan_int, hidden);
  const c10::cuda::CUDAGuard guard(hidden.device());
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t n_out = grad_embeds.size(1);
  const CifConfig cfg =
      make_cif_config(hidden, threshold, scale_eps, tail_threshold, tail_normalize, n_out);
  const at::Tensor h = hidden.contiguous(), a = to_compute(alphas);
  const at::Tensor g = grad_embeds.to(h.scalar_type()).contiguous();
  std::optional<at::Tensor> gs;
  if (grad_alpha_sum.has_value()) gs = grad_alpha_sum->to(a.scalar_type()).contiguous();
  at::Tensor dots = at::empty({cfg.batch, cfg.frames, 2}, hidden.options().dtype(at::kDouble));
  at::Tensor grad_hidden = at::empty_like(h);
  at::Tensor grad_alphas = at::empty_like(a);
  const CifParams params =
      cif_backward_params(cfg, ws, g, gs, h, a, dots, grad_hidden, grad_alphas);
  CIFOPS_CUDA_CHECK(cif_backward_cuda(params, stream));
  return {grad_hidden, grad_alphas.to(alphas.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(cifops, CUDA, m) {
  m.impl("cif_forward", &cif_forward_cuda_op);
  m.impl("cif_backward", &cif_backward_cuda_op);
}

}  // namespace cifops
