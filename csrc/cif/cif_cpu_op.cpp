// CPU implementation of the cifops::cif_forward / cif_backward ops: checks,
// allocation and dispatch to the torch-free kernels in cif_cpu.cpp.
// float16/bfloat16 inputs are computed in float32 and cast back.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <cstdlib>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cif_host.h"
#include "common/cpu_parallel.h"

namespace cifops {
namespace {

// A CPU tensor for a large output (embeds, grad_hidden), backed by transparent huge
// pages where the kernel allows them (THP "madvise" or "always"). Fresh outputs of tens
// of MB are otherwise first-touched 4 KiB page by page: on the 2-core CI VM that costs
// 35 ms for a 39 MB grad_hidden, against 7.5 ms with 2 MiB pages, more than the kernel
// itself. Small outputs, and any failure, fall back to at::empty.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__)
  constexpr size_t kHugePage = size_t(2) << 20;
  const size_t nbytes = static_cast<size_t>(c10::multiply_integers(sizes)) *
                        c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  void* data = nullptr;
  if (nbytes >= 4 * kHugePage && posix_memalign(&data, kHugePage, nbytes) == 0) {
    madvise(data, nbytes / kHugePage * kHugePage, MADV_HUGEPAGE);  // a hint; may be ignored
    return at::from_blob(data, sizes, [](void* ptr) { std::free(ptr); }, options);
  }
#endif
  return at::empty(sizes, options);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cif_forward_cpu_op(const at::Tensor& hidden, const at::Tensor& alphas,
                   const std::optional<at::Tensor>& lengths,
                   const std::optional<at::Tensor>& target_lengths, double threshold,
                   double scale_eps, std::optional<double> tail_threshold, bool tail_normalize,
                   int64_t max_tokens) {
  check_cif_args(hidden, alphas, lengths, target_lengths, threshold, scale_eps, tail_threshold);
  check_max_tokens(max_tokens, hidden);
  const CifConfig cfg =
      make_cif_config(hidden, threshold, scale_eps, tail_threshold, tail_normalize, max_tokens);
  const at::Tensor h = to_compute(hidden), a = to_compute(alphas);
  const auto len = to_long(lengths), tgt = to_long(target_lengths);
  CifWorkspaceTensors ws(cfg.batch, cfg.frames, hidden.options());
  at::Tensor token_lengths = at::empty({cfg.batch}, hidden.options().dtype(at::kLong));
  at::Tensor alpha_sum = at::empty({cfg.batch}, a.options());
  CifParams params = cif_scan_params(cfg, ws, a, len, tgt, token_lengths, alpha_sum);
  cif_scan_cpu(params, kAtenParallelFor);
  const int64_t max_total = check_scan_status(ws.row_info(), alphas, len, tgt);
  const int64_t n_out = max_tokens >= 0 ? max_tokens : max_total;
  at::Tensor embeds = empty_large({cfg.batch, n_out, cfg.dim}, h.options());
  at::Tensor fire_frames = at::empty({cfg.batch, n_out}, hidden.options().dtype(at::kLong));
  cif_set_forward_params(params, n_out, h, embeds, fire_frames);
  cif_forward_cpu(params, kAtenParallelFor);
  return {embeds.to(hidden.scalar_type()), token_lengths, fire_frames,
          alpha_sum.to(compute_type(alphas.scalar_type())), ws.real, ws.ints};
}

std::tuple<at::Tensor, at::Tensor> cif_backward_cpu_op(
    const at::Tensor& grad_embeds, const std::optional<at::Tensor>& grad_alpha_sum,
    const at::Tensor& hidden, const at::Tensor& alphas, const at::Tensor& scan_real,
    const at::Tensor& scan_int, double threshold, double scale_eps,
    std::optional<double> tail_threshold, bool tail_normalize) {
  check_cif_args(hidden, alphas, std::nullopt, std::nullopt, threshold, scale_eps,
                 tail_threshold);
  check_cif_backward_args(grad_embeds, grad_alpha_sum, hidden);
  const CifWorkspaceTensors ws(scan_real, scan_int, hidden);
  const int64_t n_out = grad_embeds.size(1);
  const CifConfig cfg =
      make_cif_config(hidden, threshold, scale_eps, tail_threshold, tail_normalize, n_out);
  const at::Tensor h = to_compute(hidden), a = to_compute(alphas);
  const at::Tensor g = grad_embeds.to(h.scalar_type()).contiguous();
  std::optional<at::Tensor> gs;
  if (grad_alpha_sum.has_value()) gs = grad_alpha_sum->to(a.scalar_type()).contiguous();
  at::Tensor dots = at::empty({cfg.batch, cfg.frames, 2}, hidden.options().dtype(at::kDouble));
  at::Tensor grad_hidden = empty_large(h.sizes(), h.options());
  at::Tensor grad_alphas = at::empty_like(a);
  const CifParams params =
      cif_backward_params(cfg, ws, g, gs, h, a, dots, grad_hidden, grad_alphas);
  cif_backward_cpu(params, kAtenParallelFor);
  return {grad_hidden.to(hidden.scalar_type()), grad_alphas.to(alphas.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(cifops, CPU, m) {
  m.impl("cif_forward", &cif_forward_cpu_op);
  m.impl("cif_backward", &cif_backward_cpu_op);
}

}  // namespace cifops
