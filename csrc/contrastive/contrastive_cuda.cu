// CUDA kernels of the fused contrastive loss (the math is in contrastive.h).
// Free of torch headers: raw pointers, sizes and a stream come in, a cudaError_t
// goes out. Everything runs on the caller's stream; there is no host sync.
//
// The CUDA op (contrastive_cuda_op.cpp) computes the loss the way production fused
// losses do: per chunk of rows of A, the logit block A_chunk . B^T by cuBLAS (ATen
// matmul, float32 output for float16/bfloat16 inputs), then one kernel here reads each
// logit row and writes the row's statistics and, when a gradient is wanted, the G row
// of contrastive.h in the operand dtype; cuBLAS then forms G . B (and G^T . A for the
// other side). The chunk is sized from a workspace bound, so memory stays
// O((N + M) D) plus a fixed workspace whatever N is. The kernels here:
//   prepare        one warp per row: max |x|, the sum of squares of x / max|x| in
//                  double (a fixed shuffle tree), then the unit row in the input dtype
//                  (the matmul operand) and 1 / max(||x||, eps) in double.
//   softmax rows   one warp per logit row, 8 rows per block, 16-byte loads issued two
//                  at a time per lane: an online pass (running max, sum of exp, sum of
//                  exp * z, first argmax) per lane over a strided share of the columns,
//                  merged in a fixed shuffle tree (deterministic), writes lse / E /
//                  positive logit / argmax; a second pass over the same row writes
//                  G_rc = a_r (exp(z_rc - lse_r) - [c == t_r]) + b_c (exp(z_rc - clse_c)
//                  - [r == c]), times an optional scale that keeps float16 G in range.
//   unit backward  one warp per row: 1/tau (and the scale) applied to sum_c G_rc B_c
//                  and the backward of the normalisation, with the unit row recomputed
//                  in float32 from the input and its inverse norm.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

#include "common/cuda_common.cuh"
#include "contrastive.h"

namespace cifops {
namespace {

constexpr int kRowsPerWarpBlock = 8;  // prepare / unit backward: one warp per row
constexpr int kSoftmaxWarps = 8;      // softmax rows: one warp per row, 8 rows per block
constexpr int kLoadsAhead = 2;  // softmax rows: 16-byte loads per lane issued at once (4: spills)
constexpr int64_t kMaxBlocks = 1 << 20;

template <typename T>
__device__ __forceinline__ T from_double(double x);
template <>
__device__ __forceinline__ float from_double<float>(double x) {
  return static_cast<float>(x);
}
template <>
__device__ __forceinline__ double from_double<double>(double x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_double<__half>(double x) {
  return __float2half(static_cast<float>(x));
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_double<__nv_bfloat16>(double x) {
  return __float2bfloat16(static_cast<float>(x));
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() {
  return -CUDART_INF_F;
}
template <>
__device__ __forceinline__ double neg_inf<double>() {
  return -CUDART_INF;
}
template <typename T>
__device__ __forceinline__ T quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() {
  return CUDART_NAN_F;
}
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return CUDART_NAN;
}

// --- prepare ---------------------------------------------------------------------------

// One warp per row: the unit row in the input dtype, and 1 / max(||x||, eps).
template <typename scalar_t>
__global__ void prepare_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t dim,
                               bool normalize, scalar_t* __restrict__ unit,
                               double* __restrict__ inv_norm) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kRowsPerWarpBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerWarpBlock + threadIdx.x / kWarpSize;
       r < rows; r += stride) {
    const scalar_t* xr = x + r * dim;
    double inv = 1.0;
    if (normalize) {  // contrastive_row_norm, with the two sums spread over the lanes
      double amax = 0.0;
      for (int64_t d = lane; d < dim; d += kWarpSize)
        amax = fmax(amax, fabs(static_cast<double>(to_acc(xr[d]))));
      amax = warp_max(amax);
      double norm = amax;
      if (amax > 0.0 && amax - amax == 0.0) {
        const double scale = 1.0 / amax;
        double sum = 0.0;
        for (int64_t d = lane; d < dim; d += kWarpSize) {
          const double e = static_cast<double>(to_acc(xr[d])) * scale;
          sum += e * e;
        }
        norm = amax * sqrt(warp_sum(sum));
      }
      inv = contrastive_inv_norm(norm);
    }
    if (lane == 0) inv_norm[r] = inv;
    scalar_t* o = unit + r * dim;
    for (int64_t d = lane; d < dim; d += kWarpSize)
      o[d] = from_double<scalar_t>(static_cast<double>(to_acc(xr[d])) * inv);
  }
}

// --- softmax rows ------------------------------------------------------------------------

// Online softmax state of a set of columns: max m, sum l of exp(z - m), sum e of
// exp(z - m) z, and the first column where z == m.
template <typename acc_t>
struct Online {
  acc_t m, l, e;
  int64_t idx;
};

template <typename acc_t>
__device__ __forceinline__ Online<acc_t> online_merge(const Online<acc_t>& a,
                                                      const Online<acc_t>& b) {
  if (b.idx < 0) return a;  // an empty side (no column seen)
  if (a.idx < 0) return b;
  Online<acc_t> r;
  r.m = a.m > b.m ? a.m : b.m;
  if (!(r.m > neg_inf<acc_t>())) r.m = a.m;  // both -inf (or NaN): no rescaling
  const acc_t fa = a.m == r.m ? acc_t(1) : exp_acc(a.m - r.m);
  const acc_t fb = b.m == r.m ? acc_t(1) : exp_acc(b.m - r.m);
  r.l = a.l * fa + b.l * fb;
  r.e = a.e * fa + b.e * fb;
  r.idx = a.m > b.m ? a.idx : (b.m > a.m ? b.idx : (a.idx < b.idx ? a.idx : b.idx));
  return r;
}

template <typename acc_t>
__device__ __forceinline__ Online<acc_t> online_shfl(const Online<acc_t>& v, int o) {
  Online<acc_t> r;
  r.m = __shfl_xor_sync(kFullMask, v.m, o);
  r.l = __shfl_xor_sync(kFullMask, v.l, o);
  r.e = __shfl_xor_sync(kFullMask, v.e, o);
  r.idx = __shfl_xor_sync(kFullMask, v.idx, o);
  return r;
}

template <typename acc_t, typename g_t>
struct SoftmaxRowsArgs {
  const acc_t* logits = nullptr;  // [rows][cols] raw products of unit rows (not / tau)
  int64_t rows = 0, cols = 0;
  int64_t row0 = 0;  // absolute index of the chunk's first row
  const acc_t* inv_tau = nullptr;
  int64_t ignore_index = -100;
  const int64_t* target = nullptr;  // absolute-indexed; null: the identity
  // statistics, absolute-indexed; each may be null
  acc_t* lse = nullptr;
  acc_t* expect = nullptr;
  acc_t* target_logit = nullptr;
  int64_t* argmax = nullptr;
  // G [rows][cols]; null: not wanted
  g_t* grad = nullptr;
  const acc_t* grad_scale = nullptr;  // one device value multiplying G; null: 1
  const acc_t* row_weight = nullptr;  // a, absolute-indexed; null: no row term
  const acc_t* row_lse = nullptr;     // the row term's lse; null: the one computed here
  const acc_t* col_weight = nullptr;  // b [cols]; null: no column term
  const acc_t* col_lse = nullptr;     // clse [cols]
};

// V elements of T moved as one aligned access (16 bytes of logits: V = 16 / sizeof(acc_t)).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Adds logit v of column c to the online state.
template <typename acc_t>
__device__ __forceinline__ void online_add(Online<acc_t>& st, acc_t v, int64_t c) {
  if (st.idx < 0) {
    st = Online<acc_t>{v, acc_t(1), v, c};
  } else if (v > st.m) {
    const acc_t f = exp_acc(st.m - v);
    st.l = st.l * f + acc_t(1);
    st.e = st.e * f + v;
    st.m = v;
    st.idx = c;
  } else {
    const acc_t p = exp_acc(v - st.m);
    st.l += p;
    st.e += p * v;
  }
}

// One warp per logit row, kSoftmaxWarps rows per block (no shared memory, no block
// barrier). Each lane reads its columns as V-element packs (16 bytes of float32 or
// float64 logits), kLoadsAhead packs issued before any of them is used, in two passes
// over the row: the online statistics (merged across the lanes in a fixed shuffle
// tree: deterministic), then the G row, written as V-element packs of g_t.
template <typename acc_t, typename g_t, int V>
__global__ void __launch_bounds__(kSoftmaxWarps* kWarpSize)
    softmax_rows_kernel(SoftmaxRowsArgs<acc_t, g_t> args) {
  using pack_t = Pack<acc_t, V>;
  using gpack_t = Pack<g_t, V>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t C = args.cols, packs = C / V;
  const acc_t inv_tau = *args.inv_tau;
  const bool want_stats = args.lse || args.argmax;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kSoftmaxWarps;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kSoftmaxWarps + threadIdx.x / kWarpSize;
       r < args.rows; r += warp_stride) {
    const int64_t ar = args.row0 + r;
    const acc_t* z = args.logits + r * C;
    const pack_t* zp = reinterpret_cast<const pack_t*>(z);
    acc_t lse = acc_t(0);
    if (want_stats || (args.grad && args.row_weight && !args.row_lse)) {
      Online<acc_t> st{neg_inf<acc_t>(), acc_t(0), acc_t(0), -1};
      for (int64_t i0 = lane; i0 < packs; i0 += kWarpSize * kLoadsAhead) {
        pack_t zv[kLoadsAhead];
#pragma unroll
        for (int u = 0; u < kLoadsAhead; ++u) {
          const int64_t i = i0 + u * kWarpSize;
          if (i < packs) zv[u] = zp[i];
        }
#pragma unroll
        for (int u = 0; u < kLoadsAhead; ++u) {
          const int64_t i = i0 + u * kWarpSize;
          if (i < packs) {
#pragma unroll
            for (int j = 0; j < V; ++j) online_add(st, zv[u].v[j] * inv_tau, i * V + j);
          }
        }
      }
      for (int o = kWarpSize / 2; o > 0; o /= 2) st = online_merge(st, online_shfl(st, o));
      // lane 0's state is the row's (the merges of other lanes may differ only on NaN)
      lse = st.m + log_acc(st.l);
      if (lane == 0) {
        if (args.lse) args.lse[ar] = lse;
        if (args.expect) args.expect[ar] = st.e / st.l;
        if (args.argmax) args.argmax[ar] = st.idx;
        if (args.target_logit) {  // 0 for an ignored row, NaN for a target outside [0, C)
          const int64_t t = args.target ? args.target[ar] : ar;
          acc_t zt = acc_t(0);
          if (!(args.target && t == args.ignore_index))
            zt = t >= 0 && t < C ? z[t] * inv_tau : quiet_nan<acc_t>();
          args.target_logit[ar] = zt;
        }
      }
      lse = __shfl_sync(kFullMask, lse, 0);
    }
    if (!args.grad) continue;
    const acc_t scale = args.grad_scale ? *args.grad_scale : acc_t(1);
    acc_t a = acc_t(0), lse_r = acc_t(0);
    int64_t t = -1;
    if (args.row_weight) {
      a = args.row_weight[ar] * scale;
      lse_r = args.row_lse ? args.row_lse[ar] : lse;
      t = contrastive_target(args.target, ar, args.ignore_index);
    }
    gpack_t* g = reinterpret_cast<gpack_t*>(args.grad + r * C);
    for (int64_t i0 = lane; i0 < packs; i0 += kWarpSize * kLoadsAhead) {
      pack_t zv[kLoadsAhead];
#pragma unroll
      for (int u = 0; u < kLoadsAhead; ++u) {
        const int64_t i = i0 + u * kWarpSize;
        if (i < packs) zv[u] = zp[i];
      }
#pragma unroll
      for (int u = 0; u < kLoadsAhead; ++u) {
        const int64_t i = i0 + u * kWarpSize;
        if (i >= packs) continue;
        gpack_t out;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int64_t c = i * V + j;
          const acc_t v = zv[u].v[j] * inv_tau;
          acc_t x = acc_t(0);
          if (a != acc_t(0)) x = a * (exp_acc(v - lse_r) - (c == t ? acc_t(1) : acc_t(0)));
          if (args.col_weight) {
            const acc_t b = args.col_weight[c] * scale;
            if (b != acc_t(0))
              x += b * (exp_acc(v - args.col_lse[c]) - (c == ar ? acc_t(1) : acc_t(0)));
          }
          out.v[j] = from_acc<g_t>(x);
        }
        g[i] = out;
      }
    }
  }
}

// --- unit backward -----------------------------------------------------------------------

// One warp per row: u = scale * grad_unit_r (scale = 1/tau times the G scale's
// inverse), then dL/dx = (u - s (s . u)) / max(||x||, eps) with s the unit row, or
// u / eps for a clamped row, or u without normalisation.
template <typename scalar_t, typename out_t>
__global__ void unit_backward_kernel(const typename AccType<scalar_t>::type* __restrict__ grad_unit,
                                     const scalar_t* __restrict__ x,
                                     const double* __restrict__ inv_norm,
                                     const typename AccType<scalar_t>::type* __restrict__ out_scale,
                                     int64_t rows, int64_t dim, bool normalize,
                                     out_t* __restrict__ grad_x) {
  using acc_t = typename AccType<scalar_t>::type;
  const int lane = threadIdx.x % kWarpSize;
  const acc_t scale = *out_scale;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kRowsPerWarpBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerWarpBlock + threadIdx.x / kWarpSize;
       r < rows; r += stride) {
    const acc_t* g = grad_unit + r * dim;
    const scalar_t* xr = x + r * dim;
    out_t* out = grad_x + r * dim;
    const double inv = inv_norm[r];
    const acc_t inv_acc = static_cast<acc_t>(inv);
    const bool project = normalize && !contrastive_norm_clamped(inv);
    acc_t sg = 0;
    if (project) {
      for (int64_t d = lane; d < dim; d += kWarpSize) sg += to_acc(xr[d]) * inv_acc * g[d] * scale;
      sg = warp_sum(sg);
    }
    const acc_t norm_scale = normalize ? inv_acc : acc_t(1);
    for (int64_t d = lane; d < dim; d += kWarpSize) {
      const acc_t gd = g[d] * scale;
      const acc_t s = project ? to_acc(xr[d]) * inv_acc : acc_t(0);
      out[d] = from_acc<out_t>((gd - s * sg) * norm_scale);
    }
  }
}

}  // namespace

int contrastive_prepare_cuda(const ContrastiveSideParams& side, void* stream) {
  if (side.rows == 0) return cudaSuccess;
  return dispatch(
      CudaTypes{}, side.kind,
      [&](auto tag) {
        using scalar_t = decltype(tag);
        const unsigned grid = grid_for(side.rows, kRowsPerWarpBlock, kMaxBlocks);
        cudaStream_t st = static_cast<cudaStream_t>(stream);
        CIFOPS_LAUNCH(grid, kRowsPerWarpBlock * kWarpSize, 0, st, prepare_kernel<scalar_t>)(
            static_cast<const scalar_t*>(side.x), side.rows, side.dim, side.normalize,
            static_cast<scalar_t*>(side.unit), side.inv_norm);
        return static_cast<int>(cudaGetLastError());
      },
      cuda_unsupported);
}

int contrastive_softmax_rows_cuda(ScalarKind kind, const ContrastiveChunk& chunk, void* stream) {
  if (chunk.rows == 0) return cudaSuccess;
  return dispatch(
      CudaTypes{}, kind,
      [&](auto tag) {
        using g_t = decltype(tag);
        using acc_t = typename AccType<g_t>::type;
        SoftmaxRowsArgs<acc_t, g_t> args;
        args.logits = static_cast<const acc_t*>(chunk.logits);
        args.rows = chunk.rows;
        args.cols = chunk.cols;
        args.row0 = chunk.row0;
        args.inv_tau = static_cast<const acc_t*>(chunk.inv_temperature);
        args.ignore_index = chunk.ignore_index;
        args.target = chunk.target;
        args.lse = static_cast<acc_t*>(chunk.lse);
        args.expect = static_cast<acc_t*>(chunk.expect);
        args.target_logit = static_cast<acc_t*>(chunk.target_logit);
        args.argmax = chunk.argmax;
        args.grad = static_cast<g_t*>(chunk.grad);
        args.grad_scale = static_cast<const acc_t*>(chunk.grad_scale);
        args.row_weight = static_cast<const acc_t*>(chunk.row.weight);
        args.row_lse = static_cast<const acc_t*>(chunk.row.lse);
        args.col_weight = static_cast<const acc_t*>(chunk.col.weight);
        args.col_lse = static_cast<const acc_t*>(chunk.col.lse);
        const unsigned grid = grid_for(chunk.rows, kSoftmaxWarps, kMaxBlocks);
        cudaStream_t st = static_cast<cudaStream_t>(stream);
        // 16-byte packs when every row starts on a 16-byte boundary (the chunk buffers are
        // fresh allocations: when cols is a multiple of V)
        constexpr int V = 16 / sizeof(acc_t);
        const bool packed = chunk.cols % V == 0 &&
                            reinterpret_cast<uintptr_t>(chunk.logits) % 16 == 0 &&
                            reinterpret_cast<uintptr_t>(chunk.grad) % (V * sizeof(g_t)) == 0;
        if (packed)
          CIFOPS_LAUNCH(grid, kSoftmaxWarps * kWarpSize, 0, st,
                        softmax_rows_kernel<acc_t, g_t, V>)(args);
        else
          CIFOPS_LAUNCH(grid, kSoftmaxWarps * kWarpSize, 0, st,
                        softmax_rows_kernel<acc_t, g_t, 1>)(args);
        return static_cast<int>(cudaGetLastError());
      },
      cuda_unsupported);
}

int contrastive_unit_backward_cuda(const ContrastiveSideParams& side, void* stream) {
  if (side.rows == 0 || side.dim == 0) return cudaSuccess;
  return dispatch(
      CudaTypes{}, side.kind,
      [&](auto tag) {
        using scalar_t = decltype(tag);
        using acc_t = typename AccType<scalar_t>::type;
        const unsigned grid = grid_for(side.rows, kRowsPerWarpBlock, kMaxBlocks);
        const auto* g = static_cast<const acc_t*>(side.grad_unit);
        const auto* xs = static_cast<const scalar_t*>(side.x);
        const auto* sc = static_cast<const acc_t*>(side.out_scale);
        cudaStream_t st = static_cast<cudaStream_t>(stream);
        if (side.out_acc)
          CIFOPS_LAUNCH(grid, kRowsPerWarpBlock * kWarpSize, 0, st,
                        unit_backward_kernel<scalar_t, acc_t>)(g, xs, side.inv_norm, sc, side.rows,
                                                               side.dim, side.normalize,
                                                               static_cast<acc_t*>(side.grad_x));
        else
          CIFOPS_LAUNCH(grid, kRowsPerWarpBlock * kWarpSize, 0, st,
                        unit_backward_kernel<scalar_t, scalar_t>)(
              g, xs, side.inv_norm, sc, side.rows, side.dim, side.normalize,
              static_cast<scalar_t*>(side.grad_x));
        return static_cast<int>(cudaGetLastError());
      },
      cuda_unsupported);
}

}  // namespace cifops
