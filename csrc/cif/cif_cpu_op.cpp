// CPU implementation of the cifops::cif_forward, cif_backward and cif_stream_step ops:
// the CPU backend (CifCpu) of the op bodies in cif_host.h and cif_stream_host.h, on the
// torch-free kernels in cif_cpu.cpp and cif_stream_cpu.cpp. float16/bfloat16 inputs are
// computed in float32 and cast back.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <cstdlib>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cif_host.h"
#include "cif_stream_host.h"
#include "common/cpu_parallel.h"

namespace cifops {
namespace {

struct CifCpu {
  static constexpr bool kStatusOnHost = true;
  static constexpr bool kHalfHidden = false;

  explicit CifCpu(c10::Device) {}

  // A CPU tensor for a large output (embeds, grad_hidden), backed by transparent huge
  // pages where the kernel allows them (THP "madvise" or "always"). Fresh outputs of tens
  // of MB are otherwise first-touched 4 KiB page by page: on the 2-core CI VM that costs
  // 35 ms for a 39 MB grad_hidden, against 7.5 ms with 2 MiB pages, more than the kernel
  // itself. Small outputs, and any failure, fall back to at::empty.
  at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) const {
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

  void scan(const CifParams& p) const { cif_scan_cpu(p, kAtenParallelFor); }
  void forward(const CifParams& p) const { cif_forward_cpu(p, kAtenParallelFor); }
  void backward(const CifParams& p) const { cif_backward_cpu(p, kAtenParallelFor); }
  void stream_scan(const CifStreamParams& p) const { cif_stream_scan_cpu(p, kAtenParallelFor); }
  void stream_embed(const CifStreamParams& p) const { cif_stream_embed_cpu(p, kAtenParallelFor); }
};

}  // namespace

TORCH_LIBRARY_IMPL(cifops, CPU, m) {
  m.impl("cif_forward", &cif_forward_op<CifCpu>);
  m.impl("cif_backward", &cif_backward_op<CifCpu>);
  m.impl("cif_stream_step", &cif_stream_step_op<CifCpu>);
}

}  // namespace cifops
