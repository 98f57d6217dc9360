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
__global__ void __launch_bounds__(kScanBlock)
    stream_scan_kernel(const alpha_t* __restrict__ alphas, const int64_t* __restrict__ lengths,
                       CifStreamConfig cfg, CifStreamState st, CifStreamWorkspace ws,
                       int64_t* __restrict__ token_lengths) {
  const int64_t T = cfg.frames;
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < cfg.batch;
       b += int64_t(gridDim.x) * blockDim.x)
    cif_stream_scan_row(alphas + b * T, lengths ? lengths + b : nullptr, cfg, st.prefix[b],
                        st.tokens[b], st.frames[b], ws.prefix + b * (T + 1),
                        ws.token_after + b * T, ws.info[b], st.new_prefix + b,
                        st.new_tokens + b, st.new_frames + b, token_lengths + b);
}

template <typename acc_t>
__global__ void __launch_bounds__(kEmbedThreads)
    stream_embed_kernel(const acc_t* __restrict__ hidden, CifStreamConfig cfg,
                        CifStreamState st, CifStreamWorkspace ws, acc_t* __restrict__ embeds,
                        int64_t* __restrict__ fire_frames) {
  const int64_t T = cfg.frames, D = cfg.dim, N = cfg.n_out;
  acc_t* partial = static_cast<acc_t*>(st.new_partial);
  for (int64_t b = blockIdx.x; b < cfg.batch; b += gridDim.x)
    cif_stream_embed_row(hidden + b * T * D, cfg, st.tokens[b], st.frames[b],
                         ws.prefix + b * (T + 1), ws.token_after + b * T,
                         ws.info[b], partial + b * D, embeds + b * N * D,
                         fire_frames + b * N, threadIdx.x, blockDim.x);
}

}  // namespace

int cif_stream_scan_cuda(const void* alphas, ScalarKind alpha_kind, const int64_t* lengths,
                         const CifStreamConfig& cfg, CifStreamState st, CifStreamWorkspace ws,
                         int64_t* token_lengths, void* stream) {
  if (cfg.batch == 0) return cudaSuccess;
  return dispatch(CudaAccTypes{}, alpha_kind, [&](auto tag) {
    using alpha_t = decltype(tag);
    CIFOPS_LAUNCH(grid_for(cfg.batch, kScanBlock, kMaxBlocks), kScanBlock, 0,
                  static_cast<cudaStream_t>(stream), stream_scan_kernel<alpha_t>)(
        static_cast<const alpha_t*>(alphas), lengths, cfg, st, ws, token_lengths);
    return static_cast<int>(cudaGetLastError());
  }, cuda_unsupported);
}

// hidden is in the compute dtype (the binding converts float16/bfloat16 to float32).
int cif_stream_embed_cuda(const void* hidden, ScalarKind hidden_kind, const CifStreamConfig& cfg,
                          CifStreamState st, CifStreamWorkspace ws, void* embeds,
                          int64_t* fire_frames, void* stream) {
  if (cfg.batch == 0) return cudaSuccess;
  return dispatch(CudaAccTypes{}, hidden_kind, [&](auto tag) {
    using acc_t = decltype(tag);
    CIFOPS_LAUNCH(grid_for(cfg.batch, 1, kMaxBlocks), kEmbedThreads, 0,
                  static_cast<cudaStream_t>(stream), stream_embed_kernel<acc_t>)(
        static_cast<const acc_t*>(hidden), cfg, st, ws, static_cast<acc_t*>(embeds),
        fire_frames);
    return static_cast<int>(cudaGetLastError());
  }, cuda_unsupported);
}

}  // namespace cifops
