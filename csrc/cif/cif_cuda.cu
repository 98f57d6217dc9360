// CUDA kernels of the CIF op (the math is in cif.h). Free of torch headers:
// raw pointers, sizes and a stream come in, a cudaError_t goes out.
//
// Parallelisation
//   scan      one block per utterance. The block stages the utterance's alphas in
//             shared memory, tile by tile, with coalesced loads, and validates them in
//             parallel (the first bad frame is a block-wide minimum). One thread runs
//             only the float64 additions that must happen in frame order to round as
//             the CPU does (the alpha sum, and the prefix sums over the products that
//             the whole block computed with __dmul_rn: product and sum rounded
//             separately, never fused), one __dadd_rn per frame out of shared memory
//             (benchmarks/sass_report.py prints that loop). The block then computes
//             every frame's fire count on its own (the count of boundaries at or below
//             its prefix sum, which is what the CPU's running count reaches, since
//             prefix sums never decrease), checks the 2^53 limit from the tile's last
//             prefix (a block-wide minimum finds the offending frame), and writes the
//             prefix sums and fire counts with coalesced stores: the same fire decisions
//             as the CPU, bit for bit. The forward op returns this workspace, autograd
//             saves it, and the backward reads it: one scan per forward+backward.
//   forward   one warp per output row (b, k): the token's frame span [fire[k-1], fire[k]]
//             from a 32-ary warp search of token_after (two or three loads instead of
//             log2 T), then 16-byte loads of the hidden rows (float4, 8 x half),
//             w[t][k] * h[t] accumulated in registers (float32 for half/float inputs,
//             float64 for double). Each token row is written once, so no atomics and
//             no zero-fill pass.
//   backward  one warp per frame row (b, t): dh[t] over the (usually one or two)
//             tokens the frame feeds, with 16-byte loads and stores, and the two dot
//             products D1[t], D0[t], reduced across lanes with a fixed shuffle tree;
//             then one block per utterance turns them into dLoss/dalpha with a
//             fixed-order block-wide float64 reverse scan (deterministic run to run,
//             no atomics).
// Everything is launched on the caller's stream; there is no host sync here.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "cif.h"
#include "common/cuda_common.cuh"

namespace cifops {
namespace {

constexpr int kRowWarps = 8;      // warps per block of the row kernels
constexpr int kPacksPerLane = 2;  // 16-byte packs per lane per pass over D
// The backward's packs per lane: one for 2- and 8-byte types, whose pass over two packs
// needs more than the 80 registers of 37.5% occupancy (88 and 94: benchmarks/sass_report.py).
template <typename scalar_t>
constexpr int kBackwardPacks = sizeof(scalar_t) == 4 ? kPacksPerLane : 1;
constexpr int kRowMinBlocks = 3;         // resident row-kernel blocks per SM: 37.5% occupancy
constexpr int kScanThreads = 256;        // block of the scan and the alpha gradient
constexpr int kScanTile = 1024;          // frames staged in shared memory at a time
constexpr int kChain = 8;                // frames per step of the scan's serial loop
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride beyond this
static_assert(kScanTile % kScanThreads == 0, "the scan's reset relies on it");
static_assert(kScanTile % kChain == 0, "16-byte aligned steps of the serial loop");

// V elements of T moved as one aligned access (16 bytes when V = 16 / sizeof(T)).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// First t in [0, L) with token_after[t] > k, for a token k that fires (so
// token_after[L - 1] > k). token_after is non-decreasing. All lanes of the warp
// call it and get the same answer: each round probes 32 evenly spaced frames and
// keeps the interval where the predicate turns true.
__device__ __forceinline__ int64_t warp_fire_frame(const int64_t* __restrict__ token_after,
                                                   int64_t L, int64_t k, int lane) {
  int64_t lo = 0, hi = L - 1;  // the answer is in [lo, hi]
  while (true) {
    const int64_t n = hi - lo + 1;
    // lane 31 probes at or beyond hi: step = ceil((n - 1) / 31)
    const int64_t step = n <= kWarpSize ? 1 : (n - 1 + kWarpSize - 2) / (kWarpSize - 1);
    const int64_t probe = lo + lane * step;
    const bool pred = probe > hi || token_after[probe] > k;
    const unsigned ballot = __ballot_sync(kFullMask, pred);
    const int j = __ffs(ballot) - 1;  // lane 31 probes >= hi, where pred holds
    if (step == 1 || j == 0) return lo + j * step;
    const int64_t new_hi = lo + j * step;
    lo = lo + (j - 1) * step + 1;
    hi = new_hi < hi ? new_hi : hi;
  }
}

// ---------------------------------------------------------------------------
// The scan

// Block-wide minimum of an int64 (fixed order; every thread gets the result).
__device__ int64_t block_min(int64_t v, int64_t* shared) {
  v = warp_min(v);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = shared[0];
  for (int w = 1; w < kScanThreads / kWarpSize; ++w) v = shared[w] < v ? shared[w] : v;
  return v;
}

// 2^53: from this quotient p / beta on, token counts stop being exact (cif_scan_row).
constexpr double kTwo53 = 9007199254740992.0;

// Tokens fired once the prefix sum reaches p, given `fired` tokens at an earlier, smaller
// prefix: what cif_scan_row's frame step computes (settle only when a fire is pending).
// Because prefix sums never decrease and cif_boundary never decreases in k, the answer
// is #{k : cif_boundary(k) <= p} whatever `fired` is (any count reached at an earlier
// prefix), so every frame's count can be computed on its own, in parallel.
__device__ __forceinline__ int64_t fires_at(double p, int64_t fired, double beta) {
  return cif_boundary(fired, beta) <= p ? cif_settle_fires(p, fired, beta) : fired;
}

// p + s[0] + ... + s[n - 1], one __dadd_rn after the other in this order (the CPU's
// rounding), on one thread; with kPrefix, out[i] gets the sum through s[i]. The terms of
// the next kChain frames are loaded from shared memory while the current ones are added,
// so the loop runs at the latency of the dependent adds. s has kChain elements of
// padding past n: the last step's early loads read it, and it is never added.
template <bool kPrefix>
__device__ __forceinline__ double serial_sum(const double* s, int n, double p, double* out) {
  double v[kChain];
#pragma unroll
  for (int j = 0; j < kChain; ++j) v[j] = s[j];
  const double* const steps_end = s + (n - n % kChain);
#pragma unroll 2
  for (; s != steps_end; s += kChain, out += kChain) {
    double next[kChain];
#pragma unroll
    for (int j = 0; j < kChain; ++j) next[j] = s[kChain + j];
#pragma unroll
    for (int j = 0; j < kChain; ++j) v[j] = p = __dadd_rn(p, v[j]);
#pragma unroll
    for (int j = 0; j < kChain; ++j) {
      if (kPrefix) out[j] = v[j];
      v[j] = next[j];
    }
  }
  for (int j = 0; j < n % kChain; ++j) {
    p = __dadd_rn(p, s[j]);
    if (kPrefix) out[j] = p;
  }
  return p;
}

// Stage alphas [t0, t0 + n) of the row into s as float64 (coalesced), between barriers.
template <typename alpha_t>
__device__ __forceinline__ void stage_alphas(const alpha_t* __restrict__ a, int64_t t0, int n,
                                             double* s) {
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += kScanThreads) s[i] = static_cast<double>(a[t0 + i]);
  __syncthreads();
}

// The scan, cif_scan_row in parallel. Only the float64 additions, which must happen one
// after the other in frame order to round as the CPU rounds, run on one thread: the
// alpha sum (with target_lengths) and the prefix sums, each a loop of one __dadd_rn per
// frame out of shared memory. Everything else is done by the whole block: the
// validation (the first bad frame is a block-wide minimum), the scaled alphas (each
// product rounded on its own, __dmul_rn, never fused into the add), the fire counts of
// every frame (fires_at), the 2^53 check (the block reads the tile's last prefix; only
// when that one is over, the first offending frame is found with block-wide minima) and
// the coalesced stores. The division of the scaling runs once per utterance.
template <typename alpha_t>
__global__ void __launch_bounds__(kScanThreads)
    scan_kernel(const alpha_t* __restrict__ alphas, const int64_t* __restrict__ lengths,
                const int64_t* __restrict__ target, CifConfig cfg, CifWorkspace ws,
                int64_t* __restrict__ token_lengths, alpha_t* __restrict__ alpha_sum) {
  __shared__ __align__(16) double s_alpha[kScanTile + kChain];  // alphas, then scaled in place
  __shared__ __align__(16) double s_prefix[kScanTile];          // the tile's prefix sums
  __shared__ int64_t s_red[kScanThreads / kWarpSize];
  __shared__ double s_real[2];  // thread 0's results: the scale, then the final prefix
  __shared__ int s_flag;        // zero sum with a positive target
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t T = cfg.frames;
  const double beta = cfg.threshold;
  const alpha_t* a = alphas + b * T;
  double* P = ws.prefix + b * (T + 1);
  int64_t* after = ws.token_after + b * T;
  CifRowInfo& info = ws.row_info[b];
  CifRowReal& real = ws.row_real[b];

  const int64_t length = lengths ? lengths[b] : T;
  const bool bad_length = length < 0 || length > T;
  const bool bad_target = !bad_length && target && target[b] < 0;
  // Parallel validation: the first frame with a negative, NaN or infinite alpha.
  int64_t first_bad = T;
  if (!bad_length && !bad_target) {
    for (int64_t t = tid; t < length; t += kScanThreads) {
      const double v = static_cast<double>(a[t]);
      if ((!(v >= 0.0) || v - v != 0.0) && t < first_bad) first_bad = t;
    }
  }
  first_bad = block_min(first_bad, s_red);
  const bool ok = !bad_length && !bad_target && first_bad == T;

  // The alpha sum, sequentially in frame order (needed first only for the scaling;
  // without it the prefix sums below end on the same sum). The last tile stays staged:
  // the prefix pass of an utterance of one tile does not load it again.
  int64_t staged = -1;  // the first frame of the tile in s_alpha, if any
  double sum = 0.0, scale = 1.0;
  bool zero_sum_target = false;
  if (ok && target) {
    for (int64_t t0 = 0; t0 < length; t0 += kScanTile) {
      const int n = static_cast<int>(length - t0 < kScanTile ? length - t0 : kScanTile);
      stage_alphas(a, t0, n, s_alpha);
      staged = t0;
      if (tid == 0) sum = serial_sum<false>(s_alpha, n, sum, nullptr);
    }
    if (tid == 0) {
      // (beta * target + eps) / sum, each operation rounded on its own as on the CPU
      if (sum > 0.0)
        scale = __ddiv_rn(__dadd_rn(__dmul_rn(beta, static_cast<double>(target[b])), cfg.scale_eps),
                          sum);
      else if (target[b] == 0)
        scale = 0.0;
      else
        zero_sum_target = true;
      s_real[0] = scale;
      s_flag = zero_sum_target ? 1 : 0;
    }
    __syncthreads();
    scale = s_real[0];
    zero_sum_target = s_flag != 0;
  }
  const bool run = ok && !zero_sum_target;
  const int64_t L = run ? length : 0;

  // The prefix pass, tile by tile. Frames >= L carry the final prefix and count.
  double p = 0.0;     // thread 0: the running prefix sum
  int64_t fired = 0;  // every thread: tokens fired before the tile (cif_scan_row's count)
  bool too_many = false;
  int64_t too_many_at = -1;
  for (int64_t t0 = 0; t0 < L; t0 += kScanTile) {
    const int n = static_cast<int>(L - t0 < kScanTile ? L - t0 : kScanTile);
    if (staged != t0) stage_alphas(a, t0, n, s_alpha);
    staged = -1;   // scaled in place below
    if (target) {  // a * 1.0 == a: without target_lengths the alphas are the terms
      for (int i = tid; i < n; i += kScanThreads) s_alpha[i] = __dmul_rn(s_alpha[i], scale);
      __syncthreads();
    }
    // The serial part: one add per frame. After an overflow only the sum goes on (it is
    // alpha_sum without target_lengths).
    if (tid == 0) p = serial_sum<true>(s_alpha, n, p, s_prefix);
    __syncthreads();
    if (too_many) continue;
    // Prefix sums never decrease, so the 2^53 check of the whole tile is its last one's.
    int first_big = n;      // the tile's first frame with p / beta >= 2^53
    int64_t fired_big = 0;  // the tokens fired before it
    if (s_prefix[n - 1] / beta >= kTwo53) {
      int64_t first = n;
      for (int i = tid; i < n; i += kScanThreads)
        if (s_prefix[i] / beta >= kTwo53 && i < first) first = i;
      first_big = static_cast<int>(block_min(first, s_red));
      fired_big = first_big == 0 ? fired : fires_at(s_prefix[first_big - 1], fired, beta);
      // From there on every fire is an overflow (cif_scan_row stops at the first one),
      // and no count changes before it.
      int64_t first_fire = n;
      for (int i = tid; i < n; i += kScanThreads)
        if (i >= first_big && cif_boundary(fired_big, beta) <= s_prefix[i] && i < first_fire)
          first_fire = i;
      first_fire = block_min(first_fire, s_red);
      if (first_fire < n) {  // the same on every thread
        too_many = true;
        too_many_at = t0 + first_fire;
        continue;
      }
    }
    for (int i = tid; i < n; i += kScanThreads) {
      const double pi = s_prefix[i];
      P[t0 + i + 1] = pi;
      after[t0 + i] = i < first_big ? fires_at(pi, fired, beta) : fired_big;
    }
    fired = first_big == n ? fires_at(s_prefix[n - 1], fired, beta) : fired_big;
  }
  __syncthreads();  // every thread has read the scale out of s_real
  if (tid == 0) s_real[1] = p;
  __syncthreads();
  const double p_end = too_many ? 0.0 : s_real[1];
  const int64_t fired_end = too_many ? 0 : fired;
  // After an overflow every frame is rewritten (an invalid utterance's workspace is all
  // zero), each frame by the thread that wrote it (kScanTile % kScanThreads == 0).
  const int64_t fill_from = too_many ? 0 : L;
  if (tid == 0) P[0] = 0.0;
  for (int64_t t = fill_from + tid; t < T; t += kScanThreads) {
    P[t + 1] = p_end;
    after[t] = fired_end;
  }
  if (tid != 0) return;

  // Per-utterance results, as cif_scan_row writes them.
  info = CifRowInfo{};
  info.scaled = target ? 1 : 0;
  real = CifRowReal{};
  if (bad_length)
    info.status = kCifBadLength;
  else if (bad_target)
    info.status = kCifBadTarget;
  else if (first_bad < T) {
    info.status = kCifBadAlpha;
    info.where = first_bad;
  } else {
    real.alpha_sum = target ? sum : p;  // unscaled: without target_lengths P[L] is the sum
    if (zero_sum_target) {
      info.status = kCifZeroSumTarget;
    } else if (too_many) {
      info.status = kCifTooManyTokens;
      info.where = too_many_at;
      real.scale = scale;
    } else {
      cif_row_finish(cfg, L, fired, scale,
                     __dadd_rn(p, -__dmul_rn(static_cast<double>(fired), beta)), info, real);
    }
  }
  if (token_lengths)
    token_lengths[b] = cfg.max_tokens >= 0 ? cif_emitted(info, cfg.max_tokens) : info.total;
  if (alpha_sum) alpha_sum[b] = static_cast<alpha_t>(real.alpha_sum);
}

// A row of packs set to zero by the warp.
template <typename scalar_t, int V>
__device__ __forceinline__ void warp_zero_row(Pack<scalar_t, V>* row, int64_t packs, int lane) {
  Pack<scalar_t, V> zero;
#pragma unroll
  for (int j = 0; j < V; ++j) zero.v[j] = from_acc<scalar_t>(typename AccType<scalar_t>::type(0));
  for (int64_t i = lane; i < packs; i += kWarpSize) row[i] = zero;
}

// The lane's P packs of a row, accumulated in acc_t from pack i0 on, stored
// in scalar_t (packs past the row's end are not written).
template <typename scalar_t, int V, int P, typename acc_t>
__device__ __forceinline__ void warp_store_packs(Pack<scalar_t, V>* row, const acc_t (&acc)[P][V],
                                                 int64_t i0, int64_t packs, int lane) {
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int64_t idx = i0 + i * kWarpSize + lane;
    if (idx < packs) {
      Pack<scalar_t, V> o;
#pragma unroll
      for (int j = 0; j < V; ++j) o.v[j] = from_acc<scalar_t>(acc[i][j]);
      row[idx] = o;
    }
  }
}

// ---------------------------------------------------------------------------
// The embedding kernels. V elements per pack; V = 1 when the rows are not 16-byte
// aligned (odd D, offset views).

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kRowWarps* kWarpSize, kRowMinBlocks)
    forward_kernel(const scalar_t* __restrict__ hidden, CifConfig cfg, int64_t n_out,
                   CifWorkspace ws, scalar_t* __restrict__ embeds,
                   int64_t* __restrict__ fire_frames) {
  using acc_t = typename AccType<scalar_t>::type;
  using pack_t = Pack<scalar_t, V>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t T = cfg.frames, D = cfg.dim, packs = D / V;
  const double beta = cfg.threshold;
  const int64_t rows = cfg.batch * n_out;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarpSize;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kRowWarps;
  for (int64_t row = warp; row < rows; row += warp_stride) {
    const int64_t b = row / n_out, k = row % n_out;
    const CifRowInfo& info = ws.row_info[b];
    const int64_t* __restrict__ token_after = ws.token_after + b * T;
    const double* __restrict__ P = ws.prefix + b * (T + 1);
    pack_t* out = reinterpret_cast<pack_t*>(embeds + row * D);
    const int64_t L = info.length, complete = info.complete;
    if (k >= cif_emitted(info, n_out)) {
      warp_zero_row(out, packs, lane);
      if (lane == 0) fire_frames[row] = -1;
      continue;
    }
    // The tail token (k == complete) spans to L - 1; complete tokens end where they fire.
    const int64_t first = k == 0 ? 0 : warp_fire_frame(token_after, L, k - 1, lane);
    const int64_t last = k >= complete ? L - 1 : warp_fire_frame(token_after, L, k, lane);
    if (lane == 0) fire_frames[row] = last;
    // The tail's beta / r scale multiplies the float64 weights (no 0 * inf in float32).
    const double tail_scale = k == complete ? ws.row_real[b].tail_scale : 1.0;
    const pack_t* h = reinterpret_cast<const pack_t*>(hidden + b * T * D);
    for (int64_t i0 = 0; i0 < packs; i0 += kWarpSize * kPacksPerLane) {
      acc_t acc[kPacksPerLane][V];
#pragma unroll
      for (int i = 0; i < kPacksPerLane; ++i)
#pragma unroll
        for (int j = 0; j < V; ++j) acc[i][j] = acc_t(0);
      for (int64_t t = first; t <= last; ++t) {
        const acc_t w = static_cast<acc_t>(cif_overlap(P[t], P[t + 1], k, beta) * tail_scale);
        pack_t hv[kPacksPerLane];
#pragma unroll
        for (int i = 0; i < kPacksPerLane; ++i) {
          const int64_t idx = i0 + i * kWarpSize + lane;
          if (idx < packs) hv[i] = h[t * packs + idx];
        }
#pragma unroll
        for (int i = 0; i < kPacksPerLane; ++i)
#pragma unroll
          for (int j = 0; j < V; ++j) acc[i][j] += w * to_acc(hv[i].v[j]);
      }
      warp_store_packs(out, acc, i0, packs, lane);
    }
  }
}

template <typename scalar_t, int V, int kPacks>
__global__ void __launch_bounds__(kRowWarps* kWarpSize, kRowMinBlocks)
    backward_frame_kernel(const scalar_t* __restrict__ grad_embeds,
                          const scalar_t* __restrict__ hidden, CifConfig cfg, int64_t n_out,
                          CifWorkspace ws, double* __restrict__ dots,
                          scalar_t* __restrict__ grad_hidden) {
  using acc_t = typename AccType<scalar_t>::type;
  using pack_t = Pack<scalar_t, V>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t T = cfg.frames, D = cfg.dim, packs = D / V;
  const double beta = cfg.threshold;
  const int64_t rows = cfg.batch * T;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarpSize;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kRowWarps;
  for (int64_t row = warp; row < rows; row += warp_stride) {
    const int64_t b = row / T, t = row % T;
    const CifRowInfo& info = ws.row_info[b];
    const int64_t* __restrict__ token_after = ws.token_after + b * T;
    const double* __restrict__ P = ws.prefix + b * (T + 1);
    pack_t* dh = reinterpret_cast<pack_t*>(grad_hidden + row * D);
    const int64_t emitted = cif_emitted(info, n_out);
    if (t >= info.length || emitted == 0) {
      warp_zero_row(dh, packs, lane);
      if (lane == 0) {
        dots[2 * row] = 0.0;
        dots[2 * row + 1] = 0.0;
      }
      continue;
    }
    const int64_t k_in = t == 0 ? 0 : token_after[t - 1];
    const int64_t k_out = token_after[t];
    const int64_t k_last = k_out < emitted - 1 ? k_out : emitted - 1;
    const double p0 = P[t], p1 = P[t + 1];
    const bool in_open = t > 0;  // dw[t][k_in]/dP[t] = -1, right-hand at P[t] == k_in beta
    const int64_t complete = info.complete;
    const double tail_scale = ws.row_real[b].tail_scale;
    const pack_t* h = reinterpret_cast<const pack_t*>(hidden + row * D);
    // D1, D0 in double: beta / r of a normalised tail can exceed float's range
    double d1 = 0.0, d0 = 0.0;
    for (int64_t i0 = 0; i0 < packs; i0 += kWarpSize * kPacks) {
      pack_t hv[kPacks];
      acc_t acc[kPacks][V];
#pragma unroll
      for (int i = 0; i < kPacks; ++i) {
        const int64_t idx = i0 + i * kWarpSize + lane;
        if (idx < packs) hv[i] = h[idx];
#pragma unroll
        for (int j = 0; j < V; ++j) acc[i][j] = acc_t(0);
      }
      for (int64_t k = k_in; k <= k_last; ++k) {
        const double ts = k == complete ? tail_scale : 1.0;
        const acc_t w = static_cast<acc_t>(cif_overlap(p0, p1, k, beta) * ts);
        const pack_t* g = reinterpret_cast<const pack_t*>(grad_embeds + (b * n_out + k) * D);
        acc_t dot = acc_t(0);
#pragma unroll
        for (int i = 0; i < kPacks; ++i) {
          const int64_t idx = i0 + i * kWarpSize + lane;
          if (idx < packs) {
            const pack_t gv = g[idx];
#pragma unroll
            for (int j = 0; j < V; ++j) {
              const acc_t x = to_acc(gv.v[j]);
              acc[i][j] += w * x;
              dot += x * to_acc(hv[i].v[j]);
            }
          }
        }
        if (k == k_out) d1 += ts * static_cast<double>(dot);
        if (k == k_in && in_open) d0 += ts * static_cast<double>(dot);
      }
      warp_store_packs(dh, acc, i0, packs, lane);
    }
    d1 = warp_sum(d1);
    d0 = warp_sum(d0);
    if (lane == 0) {
      dots[2 * row] = d1;
      dots[2 * row + 1] = d0;
    }
  }
}

// ---------------------------------------------------------------------------
// dLoss/dalpha, one block per utterance (cif_alpha_grad_row in parallel).

// Block-wide inclusive scan of one double per thread, in thread order (fixed
// shuffle and shared-memory order: deterministic). Returns the inclusive prefix;
// *total gets the block's sum.
__device__ double block_inclusive_scan(double v, double* shared, double* total) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const double o = __shfl_up_sync(kFullMask, v, offset);
    if (lane >= offset) v += o;
  }
  __syncthreads();
  if (lane == kWarpSize - 1) shared[warp] = v;
  __syncthreads();
  double before = 0.0, all = 0.0;
  for (int w = 0; w < kScanThreads / kWarpSize; ++w) {
    if (w < warp) before += shared[w];
    all += shared[w];
  }
  *total = all;
  return before + v;
}

// Block-wide sum in a fixed order.
__device__ double block_sum(double v, double* shared) {
  double total;
  block_inclusive_scan(v, shared, &total);
  return total;
}

template <typename alpha_t>
__global__ void __launch_bounds__(kScanThreads)
    backward_alpha_kernel(const alpha_t* __restrict__ alphas,
                          const alpha_t* __restrict__ grad_alpha_sum, CifConfig cfg, int64_t n_out,
                          CifWorkspace ws, const double* __restrict__ dots,
                          alpha_t* __restrict__ grad_alphas) {
  __shared__ double s_red[kScanThreads / kWarpSize];
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t T = cfg.frames;
  const double beta = cfg.threshold;
  const CifRowInfo& info = ws.row_info[b];
  const CifRowReal& real = ws.row_real[b];
  const double* P = ws.prefix + b * (T + 1);
  const double* dt = dots + 2 * b * T;
  const alpha_t* a = alphas + b * T;
  alpha_t* ga = grad_alphas + b * T;
  const int64_t L = info.length;
  const int64_t n = info.complete;
  // Tail normalisation: dLoss/dr = -(1/r) sum_t w[t][n] D1[t] over the tail's frames
  // (the overlap with token n is zero on every other frame).
  double tail_term = 0.0;
  if (info.has_tail && cfg.tail_normalize && n < n_out) {
    double part = 0.0;
    for (int64_t t = tid; t < L; t += kScanThreads)
      part += cif_overlap(P[t], P[t + 1], n, beta) * dt[2 * t];
    tail_term = -block_sum(part, s_red) / real.residual;
  }
  // dp[t] = D1[t] - D0[t + 1] (+ the tail term at t = L - 1); G[j] = sum_{t >= j} dp[t].
  // Thread c owns the contiguous frames [c * chunk, (c + 1) * chunk), in reverse:
  // thread 0 the last chunk, so that an inclusive scan in thread order is the
  // suffix sum over chunks.
  const int64_t chunk = (L + kScanThreads - 1) / kScanThreads;
  const int64_t hi = L - static_cast<int64_t>(tid) * chunk;  // frames [lo, hi), descending
  const int64_t lo = hi - chunk > 0 ? hi - chunk : 0;
  auto dp = [&](int64_t t) {
    double v = dt[2 * t] - (t + 1 < L ? dt[2 * (t + 1) + 1] : 0.0);
    if (t == L - 1) v += tail_term;
    return v;
  };
  double local = 0.0;
  for (int64_t t = hi - 1; t >= lo; --t) local += dp(t);
  double total;
  const double incl = block_inclusive_scan(hi > lo ? local : 0.0, s_red, &total);
  double running = incl - (hi > lo ? local : 0.0);  // the frames after this chunk
  double weighted = 0.0;
  // G[t] is recomputed in the second pass from the same running sums.
  for (int64_t t = hi - 1; t >= lo; --t) {
    running += dp(t);
    weighted += static_cast<double>(a[t]) * running;
  }
  weighted = block_sum(weighted, s_red);
  const double scale = real.scale;
  const double sum = real.alpha_sum;
  const double extra = grad_alpha_sum ? static_cast<double>(grad_alpha_sum[b]) : 0.0;
  const bool scaled = info.scaled != 0;
  running = incl - (hi > lo ? local : 0.0);
  for (int64_t t = hi - 1; t >= lo; --t) {
    running += dp(t);
    double g;
    if (!scaled)
      g = running;
    else
      g = sum > 0.0 ? scale * (running - weighted / sum) : 0.0;
    ga[t] = static_cast<alpha_t>(g + extra);
  }
  for (int64_t t = L + tid; t < T; t += kScanThreads) ga[t] = static_cast<alpha_t>(0.0);
}

// Whether rows of D elements of `bytes` each, at these base pointers, can move as
// 16-byte packs. Otherwise the row kernels run with V = 1 (one element per load and
// store, still coalesced across the warp): when D * itemsize is not a multiple of 16
// (odd D; bfloat16/float16 D not a multiple of 8) or when hidden or grad_embeds is a view
// that starts off a 16-byte boundary (outputs are fresh allocations, always aligned). No
// head/tail peeling: each row of such a view is misaligned by its own amount, and the
// backward's three row pointers by three different amounts. Cost (predicted,
// benchmarks/RESULTS.md): the same bytes with 4-8x the load instructions, ~1.1-1.3x the kernel time
// for float32 and ~1.5-2x for 2-byte types; hidden.contiguous() at a 16-byte offset avoids it.
bool packable(int64_t D, int bytes, std::initializer_list<const void*> ptrs) {
  if ((D * bytes) % 16 != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

}  // namespace

int cif_scan_cuda(const CifParams& p, void* stream) {
  if (p.cfg.batch == 0) return cudaSuccess;
  return dispatch(
      CudaAccTypes{}, p.alpha_kind,
      [&](auto tag) {
        using alpha_t = decltype(tag);
        const unsigned blocks = static_cast<unsigned>(p.cfg.batch);
        cudaStream_t s = static_cast<cudaStream_t>(stream);
        CIFOPS_LAUNCH(blocks, kScanThreads, 0, s, scan_kernel<alpha_t>)(
            static_cast<const alpha_t*>(p.alphas), p.lengths, p.target_lengths, p.cfg, p.ws,
            p.token_lengths, static_cast<alpha_t*>(p.alpha_sum));
        return static_cast<int>(cudaGetLastError());
      },
      cuda_unsupported);
}

int cif_forward_cuda(const CifParams& p, void* stream) {
  const int64_t rows = p.cfg.batch * p.n_out;
  if (rows == 0) return cudaSuccess;
  return dispatch(
      CudaTypes{}, p.hidden_kind,
      [&](auto tag) {
        using scalar_t = decltype(tag);
        constexpr int V = 16 / sizeof(scalar_t);
        const unsigned blocks = grid_for(rows, kRowWarps, kMaxBlocks);
        cudaStream_t s = static_cast<cudaStream_t>(stream);
        const auto* h = static_cast<const scalar_t*>(p.hidden);
        auto* e = static_cast<scalar_t*>(p.embeds);
        if (packable(p.cfg.dim, sizeof(scalar_t), {p.hidden, p.embeds}))
          CIFOPS_LAUNCH(blocks, kRowWarps * kWarpSize, 0, s, forward_kernel<scalar_t, V>)(
              h, p.cfg, p.n_out, p.ws, e, p.fire_frames);
        else
          CIFOPS_LAUNCH(blocks, kRowWarps * kWarpSize, 0, s, forward_kernel<scalar_t, 1>)(
              h, p.cfg, p.n_out, p.ws, e, p.fire_frames);
        return static_cast<int>(cudaGetLastError());
      },
      cuda_unsupported);
}

int cif_backward_cuda(const CifParams& p, void* stream) {
  if (p.cfg.batch == 0 || p.cfg.frames == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int err = dispatch(
      CudaTypes{}, p.hidden_kind,
      [&](auto tag) {
        using scalar_t = decltype(tag);
        constexpr int V = 16 / sizeof(scalar_t);
        const unsigned blocks = grid_for(p.cfg.batch * p.cfg.frames, kRowWarps, kMaxBlocks);
        const auto* g = static_cast<const scalar_t*>(p.grad_embeds);
        const auto* h = static_cast<const scalar_t*>(p.hidden);
        auto* gh = static_cast<scalar_t*>(p.grad_hidden);
        if (packable(p.cfg.dim, sizeof(scalar_t), {p.grad_embeds, p.hidden, p.grad_hidden}))
          CIFOPS_LAUNCH(blocks, kRowWarps * kWarpSize, 0, s,
                        backward_frame_kernel<scalar_t, V, kBackwardPacks<scalar_t>>)(
              g, h, p.cfg, p.n_out, p.ws, p.dots, gh);
        else
          CIFOPS_LAUNCH(blocks, kRowWarps * kWarpSize, 0, s,
                        backward_frame_kernel<scalar_t, 1, kPacksPerLane>)(g, h, p.cfg, p.n_out,
                                                                           p.ws, p.dots, gh);
        return static_cast<int>(cudaGetLastError());
      },
      cuda_unsupported);
  if (err != cudaSuccess) return err;
  return dispatch(
      CudaAccTypes{}, p.alpha_kind,
      [&](auto tag) {
        using alpha_t = decltype(tag);
        const unsigned blocks = static_cast<unsigned>(p.cfg.batch);
        CIFOPS_LAUNCH(blocks, kScanThreads, 0, s, backward_alpha_kernel<alpha_t>)(
            static_cast<const alpha_t*>(p.alphas), static_cast<const alpha_t*>(p.grad_alpha_sum),
            p.cfg, p.n_out, p.ws, p.dots, static_cast<alpha_t*>(p.grad_alphas));
        return static_cast<int>(cudaGetLastError());
      },
      cuda_unsupported);
}

}  // namespace cifops
