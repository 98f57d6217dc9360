// CUDA implementation of the cifops::cif_forward, cif_backward and cif_stream_step ops:
// the CUDA backend (CifCuda) of the op bodies in cif_host.h and cif_stream_host.h, whose
// kernels (cif_cuda.cu, cif_stream_cuda.cu) are launched on the current stream. With
// max_tokens given there is no device-to-host copy (value errors in the inputs then
// surface as utterances with no tokens, since raising would need a sync); without it the
// per-utterance token counts and statuses are copied back once, and errors are raised
// like on the CPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cif_host.h"
#include "cif_stream_host.h"
#include "common/cuda_check.h"

namespace cifops {
namespace {

class CifCuda {
 public:
  static constexpr bool kStatusOnHost = false;
  static constexpr bool kHalfHidden = true;

  explicit CifCuda(c10::Device device)
      : guard_(device), stream_(c10::cuda::getCurrentCUDAStream().stream()) {}

  at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) const {
    return at::empty(sizes, options);
  }

  void scan(const CifParams& p) const { CIFOPS_CUDA_CHECK(cif_scan_cuda(p, stream_)); }
  void forward(const CifParams& p) const { CIFOPS_CUDA_CHECK(cif_forward_cuda(p, stream_)); }
  void backward(const CifParams& p) const { CIFOPS_CUDA_CHECK(cif_backward_cuda(p, stream_)); }
  void stream_scan(const CifStreamParams& p) const {
    CIFOPS_CUDA_CHECK(cif_stream_scan_cuda(p, stream_));
  }
  void stream_embed(const CifStreamParams& p) const {
    CIFOPS_CUDA_CHECK(cif_stream_embed_cuda(p, stream_));
  }

 private:
  const c10::cuda::CUDAGuard guard_;
  void* const stream_;
};

}  // namespace

TORCH_LIBRARY_IMPL(cifops, CUDA, m) {
  m.impl("cif_forward", &cif_forward_op<CifCuda>);
  m.impl("cif_backward", &cif_backward_op<CifCuda>);
  m.impl("cif_stream_step", &cif_stream_step_op<CifCuda>);
}

}  // namespace cifops
