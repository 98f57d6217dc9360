// CUDA kernels of the CIF op (the math is in cif.h). Free of torch headers:
// raw pointers, sizes and a stream come in, a cudaError_t goes out.
//
// Parallelisation
//   scan      one thread per utterance runs the O(T) float64 recursion of
//             cif_scan_row, exactly as the CPU does, so both backends make the
//             same fire decisions bit for bit.
//   forward   one warp per output row (b, k): it finds the token's frame span
//             [fire[k-1], fire[k]] by binary search on token_after, and the 32
//             lanes stride over D accumulating w[t][k] * h[t] in registers
//             (float32 for half/float inputs, float64 for double). Each token
//             row is written exactly once, so no atomics and no zero-fill pass.
//   backward  one warp per frame row (b, t): dh[t] over the (usually one or two)
//             tokens the frame feeds, and the two dot products D1[t], D0[t],
//             reduced across lanes with a fixed shuffle tree (deterministic);
//             then one thread per utterance runs cif_alpha_grad_row.
// Everything is launched on the caller's stream; there is no host sync here.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cif.h"

namespace cifops {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;   // 128 threads: many rows per SM in flight
constexpr int kPerLane = 8;         // D elements per lane per pass: 256 per warp pass
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride beyond this

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(typename AccType<T>::type x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

int64_t blocks_for(int64_t items, int64_t per_block) {
  int64_t blocks = (items + per_block - 1) / per_block;
  return blocks < kMaxBlocks ? blocks : kMaxBlocks;
}

template <typename alpha_t>
__global__ void scan_kernel(const alpha_t* __restrict__ alphas, const int64_t* __restrict__ lengths,
                            const int64_t* __restrict__ target, CifConfig cfg, CifWorkspace ws,
                            int64_t* __restrict__ token_lengths, alpha_t* __restrict__ alpha_sum) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= cfg.batch) return;
  const int64_t T = cfg.frames;
  int64_t* info = ws.row_info + b * kRowInfo;
  double* real = ws.row_real + b * kRowReal;
  cif_scan_row(alphas + b * T, lengths ? lengths + b : nullptr, target ? target + b : nullptr, cfg,
               ws.prefix + b * (T + 1), ws.token_after + b * T, info, real);
  if (token_lengths)
    token_lengths[b] = cfg.max_tokens >= 0 ? cif_emitted(info, cfg.max_tokens) : info[kInfoTotal];
  if (alpha_sum) alpha_sum[b] = static_cast<alpha_t>(real[kRealAlphaSum]);
}

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ hidden, CifConfig cfg, int64_t n_out,
                               CifWorkspace ws, scalar_t* __restrict__ embeds,
                               int64_t* __restrict__ fire_frames) {
  using acc_t = typename AccType<scalar_t>::type;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t T = cfg.frames, D = cfg.dim;
  const double beta = cfg.threshold;
  const int64_t rows = cfg.batch * n_out;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = warp; row < rows; row += warp_stride) {
    const int64_t b = row / n_out, k = row % n_out;
    const int64_t* info = ws.row_info + b * kRowInfo;
    const int64_t* token_after = ws.token_after + b * T;
    const double* P = ws.prefix + b * (T + 1);
    scalar_t* out = embeds + row * D;
    if (k >= cif_emitted(info, n_out)) {
      for (int64_t d = lane; d < D; d += kWarpSize) out[d] = from_acc<scalar_t>(acc_t(0));
      if (lane == 0) fire_frames[row] = -1;
      continue;
    }
    const int64_t first = k == 0 ? 0 : cif_fire_frame(token_after, info, k - 1);
    const int64_t last = cif_fire_frame(token_after, info, k);
    if (lane == 0) fire_frames[row] = last;
    // The tail's beta / r scale multiplies the float64 weights (no 0 * inf in float32).
    const double tail_scale = k == info[kInfoComplete] ? ws.row_real[b * kRowReal + kRealTailScale]
                                                       : 1.0;
    for (int64_t d0 = 0; d0 < D; d0 += kWarpSize * kPerLane) {
      acc_t acc[kPerLane];
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[i] = acc_t(0);
      for (int64_t t = first; t <= last; ++t) {
        const acc_t w = static_cast<acc_t>(cif_overlap(P[t], P[t + 1], k, beta) * tail_scale);
        const scalar_t* h = hidden + (b * T + t) * D;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int64_t d = d0 + i * kWarpSize + lane;
          if (d < D) acc[i] += w * to_acc(h[d]);
        }
      }
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int64_t d = d0 + i * kWarpSize + lane;
        if (d < D) out[d] = from_acc<scalar_t>(acc[i]);
      }
    }
  }
}

template <typename scalar_t>
__global__ void backward_frame_kernel(const scalar_t* __restrict__ grad_embeds,
                                      const scalar_t* __restrict__ hidden, CifConfig cfg,
                                      int64_t n_out, CifWorkspace ws, double* __restrict__ dots,
                                      scalar_t* __restrict__ grad_hidden) {
  using acc_t = typename AccType<scalar_t>::type;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t T = cfg.frames, D = cfg.dim;
  const double beta = cfg.threshold;
  const int64_t rows = cfg.batch * T;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = warp; row < rows; row += warp_stride) {
    const int64_t b = row / T, t = row % T;
    const int64_t* info = ws.row_info + b * kRowInfo;
    const int64_t* token_after = ws.token_after + b * T;
    const double* P = ws.prefix + b * (T + 1);
    scalar_t* dh = grad_hidden + row * D;
    const int64_t emitted = cif_emitted(info, n_out);
    if (t >= info[kInfoLength] || emitted == 0) {
      for (int64_t d = lane; d < D; d += kWarpSize) dh[d] = from_acc<scalar_t>(acc_t(0));
      if (lane == 0) { dots[2 * row] = 0.0; dots[2 * row + 1] = 0.0; }
      continue;
    }
    const int64_t k_in = t == 0 ? 0 : token_after[t - 1];
    const int64_t k_out = token_after[t];
    const int64_t k_last = k_out < emitted - 1 ? k_out : emitted - 1;
    const bool in_open = t > 0 && P[t] > cif_boundary(k_in - 1, beta);  // dw/dP[t] = -1
    const double tail_scale = ws.row_real[b * kRowReal + kRealTailScale];
    const scalar_t* h = hidden + row * D;
    acc_t d1 = acc_t(0), d0 = acc_t(0);
    for (int64_t c0 = 0; c0 < D; c0 += kWarpSize * kPerLane) {
      acc_t hv[kPerLane], acc[kPerLane];
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int64_t d = c0 + i * kWarpSize + lane;
        hv[i] = d < D ? to_acc(h[d]) : acc_t(0);
        acc[i] = acc_t(0);
      }
      for (int64_t k = k_in; k <= k_last; ++k) {
        const double ts = k == info[kInfoComplete] ? tail_scale : 1.0;
        const acc_t w = static_cast<acc_t>(cif_overlap(P[t], P[t + 1], k, beta) * ts);
        const scalar_t* g = grad_embeds + (b * n_out + k) * D;
        acc_t dot = acc_t(0);
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int64_t d = c0 + i * kWarpSize + lane;
          const acc_t gv = d < D ? to_acc(g[d]) : acc_t(0);
          acc[i] += w * gv;
          dot += gv * hv[i];
        }
        if (k == k_out) d1 += static_cast<acc_t>(ts) * dot;
        if (k == k_in && in_open) d0 += static_cast<acc_t>(ts) * dot;
      }
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int64_t d = c0 + i * kWarpSize + lane;
        if (d < D) dh[d] = from_acc<scalar_t>(acc[i]);
      }
    }
    d1 = warp_sum(d1);
    d0 = warp_sum(d0);
    if (lane == 0) {
      dots[2 * row] = static_cast<double>(d1);
      dots[2 * row + 1] = static_cast<double>(d0);
    }
  }
}

template <typename alpha_t>
__global__ void backward_alpha_kernel(const alpha_t* __restrict__ alphas,
                                      const alpha_t* __restrict__ grad_alpha_sum, CifConfig cfg,
                                      int64_t n_out, CifWorkspace ws, double* __restrict__ dots,
                                      alpha_t* __restrict__ grad_alphas) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= cfg.batch) return;
  const int64_t T = cfg.frames;
  cif_alpha_grad_row(alphas + b * T, grad_alpha_sum ? grad_alpha_sum + b : nullptr, cfg, n_out,
                     ws.prefix + b * (T + 1), ws.token_after + b * T, ws.row_info + b * kRowInfo,
                     ws.row_real + b * kRowReal, dots + 2 * b * T, grad_alphas + b * T);
}

template <typename F>
int dispatch_alpha(ScalarKind kind, F&& f) {
  if (kind == ScalarKind::kFloat32) return f(float{});
  if (kind == ScalarKind::kFloat64) return f(double{});
  return static_cast<int>(cudaErrorInvalidValue);
}

template <typename F>
int dispatch_hidden(ScalarKind kind, F&& f) {
  switch (kind) {
    case ScalarKind::kFloat16: return f(__half{});
    case ScalarKind::kBFloat16: return f(__nv_bfloat16{});
    case ScalarKind::kFloat32: return f(float{});
    case ScalarKind::kFloat64: return f(double{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

constexpr int kScanThreads = 64;

}  // namespace

int cif_scan_cuda(const void* alphas, ScalarKind alpha_kind, const int64_t* lengths,
                  const int64_t* target, const CifConfig& cfg, CifWorkspace ws,
                  int64_t* token_lengths, void* alpha_sum, void* stream) {
  if (cfg.batch == 0) return cudaSuccess;
  return dispatch_alpha(alpha_kind, [&](auto tag) {
    using alpha_t = decltype(tag);
    const int blocks = static_cast<int>((cfg.batch + kScanThreads - 1) / kScanThreads);
    scan_kernel<alpha_t><<<blocks, kScanThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const alpha_t*>(alphas), lengths, target, cfg, ws, token_lengths,
        static_cast<alpha_t*>(alpha_sum));
    return static_cast<int>(cudaGetLastError());
  });
}

int cif_forward_cuda(const void* hidden, ScalarKind hidden_kind, const CifConfig& cfg,
                     int64_t n_out, CifWorkspace ws, void* embeds, int64_t* fire_frames,
                     void* stream) {
  const int64_t rows = cfg.batch * n_out;
  if (rows == 0) return cudaSuccess;
  return dispatch_hidden(hidden_kind, [&](auto tag) {
    using scalar_t = decltype(tag);
    const int64_t blocks = blocks_for(rows, kWarpsPerBlock);
    forward_kernel<scalar_t><<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarpSize, 0,
                               static_cast<cudaStream_t>(stream)>>>(
        static_cast<const scalar_t*>(hidden), cfg, n_out, ws, static_cast<scalar_t*>(embeds),
        fire_frames);
    return static_cast<int>(cudaGetLastError());
  });
}

int cif_backward_cuda(const void* grad_embeds, const void* grad_alpha_sum, const void* hidden,
                      ScalarKind hidden_kind, const void* alphas, ScalarKind alpha_kind,
                      const CifConfig& cfg, int64_t n_out, CifWorkspace ws, double* dots,
                      void* grad_hidden, void* grad_alphas, void* stream) {
  if (cfg.batch == 0 || cfg.frames == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int err = dispatch_hidden(hidden_kind, [&](auto tag) {
    using scalar_t = decltype(tag);
    const int64_t blocks = blocks_for(cfg.batch * cfg.frames, kWarpsPerBlock);
    backward_frame_kernel<scalar_t><<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarpSize,
                                      0, s>>>(static_cast<const scalar_t*>(grad_embeds),
                                              static_cast<const scalar_t*>(hidden), cfg, n_out,
                                              ws, dots, static_cast<scalar_t*>(grad_hidden));
    return static_cast<int>(cudaGetLastError());
  });
  if (err != cudaSuccess) return err;
  return dispatch_alpha(alpha_kind, [&](auto tag) {
    using alpha_t = decltype(tag);
    const int blocks = static_cast<int>((cfg.batch + kScanThreads - 1) / kScanThreads);
    backward_alpha_kernel<alpha_t><<<blocks, kScanThreads, 0, s>>>(
        static_cast<const alpha_t*>(alphas), static_cast<const alpha_t*>(grad_alpha_sum), cfg,
        n_out, ws, dots, static_cast<alpha_t*>(grad_alphas));
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace cifops
