// CUDA implementation of the cifops::cif_stream_step op (host side in cif_stream_host.h,
// kernels in cif_stream_cuda.cu), on the current stream. With max_tokens given there is
// no device-to-host copy (a chunk with bad values then emits nothing and leaves its
// utterance's state as it was); without it the counts and statuses are copied back once.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cif_stream_host.h"
#include "common/cuda_check.h"

namespace cifops {
namespace {

CifStreamOutputs cif_stream_step_cuda_op(const at::Tensor& hidden, const at::Tensor& alphas,
                                         const std::optional<at::Tensor>& lengths,
                                         const at::Tensor& prefix, const at::Tensor& tokens,
                                         const at::Tensor& frames, const at::Tensor& partial,
                                         double threshold, int64_t max_tokens) {
  // checked before the guard: a CPU hidden with a CUDA state must get the message that
  // names the argument, not the guard's
  check_cif_stream_args(hidden, alphas, lengths, prefix, tokens, frames, partial, threshold,
                        max_tokens);
  const c10::cuda::CUDAGuard guard(hidden.device());
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  return cif_stream_step_impl(
      hidden, alphas, lengths, prefix, tokens, frames, partial, threshold, max_tokens,
      [stream](const at::Tensor& a, const std::optional<at::Tensor>& len,
               const CifStreamConfig& cfg, CifStreamState st, CifStreamWorkspace ws,
               at::Tensor& token_lengths) {
        CIFOPS_CUDA_CHECK(cif_stream_scan_cuda(a.data_ptr(), scalar_kind(a.scalar_type()),
                                               maybe_ptr(len), cfg, st, ws,
                                               token_lengths.data_ptr<int64_t>(), stream));
      },
      [stream](const at::Tensor& h, const CifStreamConfig& cfg, CifStreamState st,
               CifStreamWorkspace ws, at::Tensor& embeds, at::Tensor& fire_frames) {
        CIFOPS_CUDA_CHECK(cif_stream_embed_cuda(h.data_ptr(), scalar_kind(h.scalar_type()), cfg,
                                                st, ws, embeds.data_ptr(),
                                                fire_frames.data_ptr<int64_t>(), stream));
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(cifops, CUDA, m) { m.impl("cif_stream_step", &cif_stream_step_cuda_op); }

}  // namespace cifops
