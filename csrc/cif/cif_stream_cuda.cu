// CUDA kernels of the streaming CIF step (the math is in cif.h). Chunks are short
// (tens of frames), so the work is small and the kernels are simple:
//   scan    one thread per utterance runs cif_stream_scan_row (float64 additions in
//           frame order: the fire decisions of the CPU and of the whole-input scan);
//   embed   one block per utterance, its threads over D, runs cif_stream_embed_row:
//           every thread walks the chunk's frames and tokens for its own dimensions,
//           so partial sums need no communication and no atomics.
#include <cuda_runtime.h>

#include <cstdint>

#include "cif.h"
#include "common/cuda_common.cuh"

namespace cifops {
namespace {

constexpr int kScanBlock = 128;
constexpr int kEmbedThreads = 128;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride beyond this

template <typename alpha_t>
__global__ void __launch_bounds__(kScanBlock) stream_scan_kernel(CifStreamParams p) {
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < p.cfg.batch;
       b += int64_t(gridDim.x) * blockDim.x)
    cif_stream_scan_row<alpha_t>(p, b);
}

template <typename acc_t>
__global__ void __launch_bounds__(kEmbedThreads) stream_embed_kernel(CifStreamParams p) {
  for (int64_t b = blockIdx.x; b < p.cfg.batch; b += gridDim.x)
    cif_stream_embed_row<acc_t>(p, b, threadIdx.x, blockDim.x);
}

}  // namespace

int cif_stream_scan_cuda(const CifStreamParams& p, void* stream) {
  if (p.cfg.batch == 0) return cudaSuccess;
  return dispatch(
      CudaAccTypes{}, p.alpha_kind,
      [&](auto tag) {
        using alpha_t = decltype(tag);
        CIFOPS_LAUNCH(grid_for(p.cfg.batch, kScanBlock, kMaxBlocks), kScanBlock, 0,
                      static_cast<cudaStream_t>(stream), stream_scan_kernel<alpha_t>)(p);
        return static_cast<int>(cudaGetLastError());
      },
      cuda_unsupported);
}

// hidden is in the compute dtype (the binding converts float16/bfloat16 to float32).
int cif_stream_embed_cuda(const CifStreamParams& p, void* stream) {
  if (p.cfg.batch == 0) return cudaSuccess;
  return dispatch(
      CudaAccTypes{}, p.hidden_kind,
      [&](auto tag) {
        using acc_t = decltype(tag);
        CIFOPS_LAUNCH(grid_for(p.cfg.batch, 1, kMaxBlocks), kEmbedThreads, 0,
                      static_cast<cudaStream_t>(stream), stream_embed_kernel<acc_t>)(p);
        return static_cast<int>(cudaGetLastError());
      },
      cuda_unsupported);
}

}  // namespace cifops
