// CPU implementation of the cifops::cif_stream_step op (host side in cif_stream_host.h,
// kernels in cif_stream_cpu.cpp). float16/bfloat16 inputs are computed in float32.
#include <torch/library.h>

#include "cif_stream_host.h"
#include "common/cpu_parallel.h"

namespace cifops {
namespace {

CifStreamOutputs cif_stream_step_cpu_op(const at::Tensor& hidden, const at::Tensor& alphas,
                                        const std::optional<at::Tensor>& lengths,
                                        const at::Tensor& prefix, const at::Tensor& tokens,
                                        const at::Tensor& frames, const at::Tensor& partial,
                                        double threshold, int64_t max_tokens) {
  check_cif_stream_args(hidden, alphas, lengths, prefix, tokens, frames, partial, threshold,
                        max_tokens);
  return cif_stream_step_impl(
      hidden, alphas, lengths, prefix, tokens, frames, partial, threshold, max_tokens,
      [](const at::Tensor& a, const std::optional<at::Tensor>& len, const CifStreamConfig& cfg,
         CifStreamState st, CifStreamWorkspace ws, at::Tensor& token_lengths) {
        cif_stream_scan_cpu(a.data_ptr(), scalar_kind(a.scalar_type()), maybe_ptr(len), cfg, st,
                            ws, token_lengths.data_ptr<int64_t>(), kAtenParallelFor);
      },
      [](const at::Tensor& h, const CifStreamConfig& cfg, CifStreamState st,
         CifStreamWorkspace ws, at::Tensor& embeds, at::Tensor& fire_frames) {
        cif_stream_embed_cpu(h.data_ptr(), scalar_kind(h.scalar_type()), cfg, st, ws,
                             embeds.data_ptr(), fire_frames.data_ptr<int64_t>(),
                             kAtenParallelFor);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(cifops, CPU, m) { m.impl("cif_stream_step", &cif_stream_step_cpu_op); }

}  // namespace cifops
