// CUDA kernels of the fused contrastive loss (the math is in contrastive.h).
// Free of torch headers: raw pointers, sizes and a stream come in, a cudaError_t
// goes out. Everything runs on the caller's stream; there is no host sync.
//
// Parallelisation
//   prepare    one warp per row: max |x|, the sum of squares of x / max|x| in
//              double (a fixed shuffle tree), then the unit row written in the input
//              dtype ("op", the logit operand) and, for float16/bfloat16, in float32
//              ("val", the gradient operand); padding rows and columns are zeroed.
//   row pass   flash-style: one block per 64 rows of A (32 for float64). For each
//              tile of 64 columns of B, the logit tile A_blk . B_tile^T is built in
//              registers over chunks of D staged in shared memory, stored to a shared
//              tile, and 4 threads per row (8 for float64) update the row's online
//              max, sum of exp and sum of exp * z, reduced with width-4 shuffles.
//              The log-sum-exp, expected logit, positive logit and argmax of each row
//              are written once at the end. Nothing N x M is stored.
//   grad pass  one block per (64 rows of A, 128 columns of D): for each tile of 32
//              columns of B it recomputes the logit tile as above, turns it into the
//              G tile in shared memory (both softmax terms, from the saved log-sum-
//              exps), and accumulates G . B_val[:, d-chunk] in registers. The logits
//              are recomputed once per D chunk (ceil(D / 128) times); in exchange no
//              block ever writes a row another block writes: no atomics, and the
//              gradient is deterministic. A last kernel, one warp per row, applies
//              1/tau and the backward of the normalisation.
//   Products   float16/bfloat16: logits with tensor-core WMMA m16n16k16, float32
//              accumulation; G . B with TF32 WMMA m16n16k8 (G is a float32 tile, and
//              TF32 keeps float32's exponent so small weights do not underflow as they
//              would in float16), float32 accumulation. float32 and float64: plain
//              FMA in their own precision (no TF32). 256 threads per block.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <mma.h>

#include <cstdint>

#include "contrastive.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define CIFOPS_CONTRASTIVE_WMMA 1  // bf16 and tf32 WMMA need sm_80
#else
#define CIFOPS_CONTRASTIVE_WMMA 0
#endif

namespace cifops {
namespace {

constexpr int kWarpSize = 32;
constexpr int kThreads = 256;  // 8 warps per block for the tile kernels
constexpr int kRowsPerPrepBlock = 8;  // prepare / unit-backward: one warp per row

// --- types -------------------------------------------------------------------------

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
// The gradient-product operand: float32 (TF32 MMA) for half inputs, else the input.
template <typename T> struct ValType { using type = T; };
template <> struct ValType<__half> { using type = float; };
template <> struct ValType<__nv_bfloat16> { using type = float; };
template <typename T> constexpr bool kIsHalf = false;
template <> constexpr bool kIsHalf<__half> = true;
template <> constexpr bool kIsHalf<__nv_bfloat16> = true;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_double(double x);
template <> __device__ __forceinline__ float from_double<float>(double x) { return static_cast<float>(x); }
template <> __device__ __forceinline__ double from_double<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_double<__half>(double x) {
  return __float2half(static_cast<float>(x));
}
template <> __device__ __forceinline__ __nv_bfloat16 from_double<__nv_bfloat16>(double x) {
  return __float2bfloat16(static_cast<float>(x));
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename T> __device__ __forceinline__ T neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -CUDART_INF_F; }
template <> __device__ __forceinline__ double neg_inf<double>() { return -CUDART_INF; }
template <typename T> __device__ __forceinline__ T quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return CUDART_NAN_F; }
template <> __device__ __forceinline__ double quiet_nan<double>() { return CUDART_NAN; }

// --- tile shapes ---------------------------------------------------------------------
// BR rows of A per block; BC columns of B per tile; DK the D chunk of the logit
// product; DV the D chunk a grad-pass block owns. Rows are padded to kRowPad(T)
// (a multiple of every BR and BC), D to kDimPad (a multiple of every DK).

template <typename T> struct RowTile {  // row pass
  static constexpr int BR = 64, BC = 64, DK = kIsHalf<T> ? 32 : 16;
};
template <> struct RowTile<double> { static constexpr int BR = 32, BC = 32, DK = 16; };
template <typename T> struct GradTile {  // grad pass
  static constexpr int BR = 64, BC = 32, DK = kIsHalf<T> ? 32 : 16, DV = 128;
};
template <> struct GradTile<double> { static constexpr int BR = 32, BC = 32, DK = 16, DV = 64; };

template <typename T> constexpr int64_t kRowPad = 64;
template <> constexpr int64_t kRowPad<double> = 32;
constexpr int64_t kDimPad = 32;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Shared-memory row strides: WMMA needs 16-byte multiples and 32-byte aligned
// fragment pointers; the +8 / +4 also staggers the banks.
template <typename T> constexpr int op_stride(int k) { return k + (kIsHalf<T> ? 8 : 1); }
template <typename T> constexpr int acc_stride(int n) { return n + (kIsHalf<T> ? 4 : 1); }

// --- block-wide tile products ----------------------------------------------------------
// Both engines compute, with all kThreads threads of the block:
//   logits  Z[BM][BN]  (+)=  A[BM][K] . B[BN][K]^T   (operands in shared memory)
//   product O[BM][BN]  +=    G[BM][K] . V[K][BN]     (G, V in shared memory)
// with the accumulators in registers, and write them out row-major.

// FMA engine: a 16 x 16 grid of threads, thread (ty, tx) owns rows ty + 16 i and
// columns tx + 16 j (strided so that a warp reads 16 different B rows per step).
template <typename op_t, typename acc_t, int BM, int BN>
struct FmaTile {
  static constexpr int MI = BM / 16, NJ = BN / 16;
  acc_t c[MI][NJ];
  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j) c[i][j] = acc_t(0);
  }
  __device__ void logits(const op_t* a, int lda, const op_t* b, int ldb, int k) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int kk = 0; kk < k; ++kk) {
      acc_t av[MI], bv[NJ];
#pragma unroll
      for (int i = 0; i < MI; ++i) av[i] = to_acc(a[(ty + 16 * i) * lda + kk]);
#pragma unroll
      for (int j = 0; j < NJ; ++j) bv[j] = to_acc(b[(tx + 16 * j) * ldb + kk]);
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j) c[i][j] = fma(av[i], bv[j], c[i][j]);
    }
  }
  template <typename val_t>
  __device__ void product(const acc_t* g, int ldg, const val_t* v, int ldv, int k) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int kk = 0; kk < k; ++kk) {
      acc_t gv[MI], vv[NJ];
#pragma unroll
      for (int i = 0; i < MI; ++i) gv[i] = g[(ty + 16 * i) * ldg + kk];
#pragma unroll
      for (int j = 0; j < NJ; ++j) vv[j] = to_acc(v[kk * ldv + tx + 16 * j]);
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j) c[i][j] = fma(gv[i], vv[j], c[i][j]);
    }
  }
  __device__ void store(acc_t* out, int64_t ldo) const {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j) out[(ty + 16 * i) * ldo + tx + 16 * j] = c[i][j];
  }
};

#if CIFOPS_CONTRASTIVE_WMMA
namespace wmma = nvcuda::wmma;

// WMMA engine for float16/bfloat16 operands: the BM x BN output is cut into 16 x 16
// fragments, dealt to the 8 warps in order (warp w takes fragments w, w + 8, ...).
template <typename op_t, int BM, int BN>
struct WmmaTile {
  static constexpr int kFrags = (BM / 16) * (BN / 16);
  static constexpr int kWarps = kThreads / kWarpSize;
  static constexpr int kPerWarp = kFrags / kWarps;
  static_assert(kFrags % kWarps == 0, "fragments must split evenly over the warps");
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[kPerWarp];  // logits
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> p[kPerWarp];   // product

  __device__ static int frag_row(int f) { return (f / (BN / 16)) * 16; }
  __device__ static int frag_col(int f) { return (f % (BN / 16)) * 16; }
  __device__ static int my_frag(int i) { return static_cast<int>(threadIdx.x / kWarpSize) + i * kWarps; }

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < kPerWarp; ++i) {
      wmma::fill_fragment(c[i], 0.0f);
      wmma::fill_fragment(p[i], 0.0f);
    }
  }
  __device__ void logits(const op_t* a, int lda, const op_t* b, int ldb, int k) {
    for (int kk = 0; kk < k; kk += 16) {
#pragma unroll
      for (int i = 0; i < kPerWarp; ++i) {
        const int f = my_frag(i);
        wmma::fragment<wmma::matrix_a, 16, 16, 16, op_t, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, op_t, wmma::col_major> fb;
        wmma::load_matrix_sync(fa, a + frag_row(f) * lda + kk, lda);
        // B^T[k][n] = b[n][k]: B stored row-major is B^T column-major
        wmma::load_matrix_sync(fb, b + frag_col(f) * ldb + kk, ldb);
        wmma::mma_sync(c[i], fa, fb, c[i]);
      }
    }
  }
  __device__ void product(const float* g, int ldg, const float* v, int ldv, int k) {
    for (int kk = 0; kk < k; kk += 8) {
#pragma unroll
      for (int i = 0; i < kPerWarp; ++i) {
        const int f = my_frag(i);
        wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb;
        wmma::load_matrix_sync(fa, g + frag_row(f) * ldg + kk, ldg);
        wmma::load_matrix_sync(fb, v + kk * ldv + frag_col(f), ldv);
#pragma unroll
        for (int e = 0; e < fa.num_elements; ++e) fa.x[e] = wmma::__float_to_tf32(fa.x[e]);
#pragma unroll
        for (int e = 0; e < fb.num_elements; ++e) fb.x[e] = wmma::__float_to_tf32(fb.x[e]);
        wmma::mma_sync(p[i], fa, fb, p[i]);
      }
    }
  }
  __device__ void store_logits(float* out, int ldo) const {
#pragma unroll
    for (int i = 0; i < kPerWarp; ++i) {
      const int f = my_frag(i);
      wmma::store_matrix_sync(out + frag_row(f) * ldo + frag_col(f), c[i], ldo,
                              wmma::mem_row_major);
    }
  }
  __device__ void store_product(float* out, int64_t ldo) const {
#pragma unroll
    for (int i = 0; i < kPerWarp; ++i) {
      const int f = my_frag(i);
      wmma::store_matrix_sync(out + frag_row(f) * ldo + frag_col(f), p[i],
                              static_cast<unsigned>(ldo), wmma::mem_row_major);
    }
  }
};
#endif

// Engine selection: WMMA for half inputs on sm_80+, FMA otherwise. Both expose
// zero / logits / store_logits and zero / product / store_product.
template <typename scalar_t, int BM, int BN, bool kWmma = kIsHalf<scalar_t> && CIFOPS_CONTRASTIVE_WMMA>
struct Engine {
  using acc_t = typename AccType<scalar_t>::type;
  FmaTile<scalar_t, acc_t, BM, BN> t;
  __device__ void zero() { t.zero(); }
  __device__ void logits(const scalar_t* a, int lda, const scalar_t* b, int ldb, int k) {
    t.logits(a, lda, b, ldb, k);
  }
  template <typename val_t>
  __device__ void product(const acc_t* g, int ldg, const val_t* v, int ldv, int k) {
    t.product(g, ldg, v, ldv, k);
  }
  __device__ void store_logits(acc_t* out, int ldo) const { t.store(out, ldo); }
  __device__ void store_product(acc_t* out, int64_t ldo) const { t.store(out, ldo); }
};
#if CIFOPS_CONTRASTIVE_WMMA
template <typename scalar_t, int BM, int BN>
struct Engine<scalar_t, BM, BN, true> {
  WmmaTile<scalar_t, BM, BN> t;
  __device__ void zero() { t.zero(); }
  __device__ void logits(const scalar_t* a, int lda, const scalar_t* b, int ldb, int k) {
    t.logits(a, lda, b, ldb, k);
  }
  __device__ void product(const float* g, int ldg, const float* v, int ldv, int k) {
    t.product(g, ldg, v, ldv, k);
  }
  __device__ void store_logits(float* out, int ldo) const { t.store_logits(out, ldo); }
  __device__ void store_product(float* out, int64_t ldo) const { t.store_product(out, ldo); }
};
#endif

// Copy rows [row0, row0 + rows) x columns [col0, col0 + cols) of a row-major matrix
// with row stride ld into shared memory with row stride lds. Columns at or beyond
// col_limit read as zero (the other bounds are covered by the padding).
template <typename T>
__device__ void load_tile(T* dst, int lds, const T* src, int64_t ld, int64_t row0, int rows,
                          int64_t col0, int cols, int64_t col_limit) {
  const T zero = from_double<T>(0.0);  // (the half types have no conversion from 0)
  for (int e = threadIdx.x; e < rows * cols; e += blockDim.x) {
    const int r = e / cols, c = e % cols;
    const int64_t col = col0 + c;
    dst[r * lds + c] = col < col_limit ? src[(row0 + r) * ld + col] : zero;
  }
}

// The logit tile Z = A[a_row0 : +BM] . B[b_row0 : +BN]^T over all of D (padded),
// staged through sA / sB, left in the engine's logit accumulators.
template <typename scalar_t, int BM, int BN, int DK, typename E>
__device__ void logit_tile(E& engine, scalar_t* sA, scalar_t* sB, const scalar_t* a,
                           const scalar_t* b, int64_t dim_padded, int64_t a_row0,
                           int64_t b_row0) {
  constexpr int lds = op_stride<scalar_t>(DK);
  engine.zero();
  for (int64_t k0 = 0; k0 < dim_padded; k0 += DK) {
    load_tile(sA, lds, a, dim_padded, a_row0, BM, k0, DK, dim_padded);
    load_tile(sB, lds, b, dim_padded, b_row0, BN, k0, DK, dim_padded);
    __syncthreads();
    engine.logits(sA, lds, sB, lds, DK);
    __syncthreads();
  }
}

// --- kernels -----------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = kWarpSize / 2; o > 0; o /= 2) {
    const T w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = kWarpSize / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One warp per padded row: unit rows (op, val), inverse norms.
template <typename scalar_t>
__global__ void prepare_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t dim,
                               int64_t rows_padded, int64_t dim_padded, bool normalize,
                               scalar_t* __restrict__ op,
                               typename ValType<scalar_t>::type* __restrict__ val,
                               double* __restrict__ inv_norm) {
  using val_t = typename ValType<scalar_t>::type;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerPrepBlock + threadIdx.x / kWarpSize;
  if (r >= rows_padded) return;
  scalar_t* o = op + r * dim_padded;
  val_t* v = val ? val + r * dim_padded : nullptr;
  if (r >= rows) {
    for (int64_t d = lane; d < dim_padded; d += kWarpSize) {
      o[d] = from_double<scalar_t>(0.0);
      if (v) v[d] = val_t(0);
    }
    return;
  }
  const scalar_t* xr = x + r * dim;
  double inv = 1.0;
  if (normalize) {  // contrastive_row_norm, with the two sums spread over the lanes
    double amax = 0.0;
    for (int64_t d = lane; d < dim; d += kWarpSize) amax = fmax(amax, fabs(static_cast<double>(to_acc(xr[d]))));
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
  for (int64_t d = lane; d < dim_padded; d += kWarpSize) {
    const double u = d < dim ? static_cast<double>(to_acc(xr[d])) * inv : 0.0;
    o[d] = from_double<scalar_t>(u);
    if (v) v[d] = static_cast<val_t>(u);
  }
}

// Row pass (contrastive.h): per row of A, lse / E / positive logit / argmax over B.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
row_pass_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                ContrastivePass pass, const typename AccType<scalar_t>::type* inv_temperature,
                const int64_t* __restrict__ target, typename AccType<scalar_t>::type* lse,
                typename AccType<scalar_t>::type* expect,
                typename AccType<scalar_t>::type* target_logit, int64_t* argmax) {
  using acc_t = typename AccType<scalar_t>::type;
  using Tile = RowTile<scalar_t>;
  constexpr int BR = Tile::BR, BC = Tile::BC, DK = Tile::DK;
  constexpr int kLdz = acc_stride<scalar_t>(BC);
  constexpr int kThreadsPerRow = kThreads / BR;  // 4 (8 for float64), consecutive lanes
  static_assert(kWarpSize % kThreadsPerRow == 0, "a row's threads must share a warp");
  __shared__ __align__(32) unsigned char smem_a[BR * op_stride<scalar_t>(DK) * sizeof(scalar_t)];
  __shared__ __align__(32) unsigned char smem_b[BC * op_stride<scalar_t>(DK) * sizeof(scalar_t)];
  __shared__ __align__(32) unsigned char smem_z[BR * kLdz * sizeof(acc_t)];
  scalar_t* sA = reinterpret_cast<scalar_t*>(smem_a);
  scalar_t* sB = reinterpret_cast<scalar_t*>(smem_b);
  acc_t* sZ = reinterpret_cast<acc_t*>(smem_z);

  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * BR;
  const int my_row = threadIdx.x / kThreadsPerRow, part = threadIdx.x % kThreadsPerRow;
  const int64_t row = r0 + my_row;
  const bool real_row = row < pass.rows;
  const acc_t inv_tau = *inv_temperature;
  const bool softmax = lse != nullptr;
  // the positive column; -1 when ignored, cols (never seen) when out of range
  int64_t positive = real_row ? contrastive_target(target, row, pass.ignore_index) : -1;
  if (positive >= pass.cols || positive < -1) positive = pass.cols;
  // a valid positive is written by the one thread that meets its column below
  if (real_row && part == 0 && target_logit && (positive < 0 || positive == pass.cols))
    target_logit[row] = positive < 0 ? acc_t(0) : quiet_nan<acc_t>();

  acc_t run_max = neg_inf<acc_t>(), run_sum = 0, run_dot = 0, best = neg_inf<acc_t>();
  int64_t best_col = pass.cols > 0 ? 0 : -1;
  bool saw_nan = false;
  Engine<scalar_t, BR, BC> engine;
  for (int64_t c0 = 0; c0 < pass.cols; c0 += BC) {
    logit_tile<scalar_t, BR, BC, DK>(engine, sA, sB, a, b, pass.dim_padded, r0, c0);
    engine.store_logits(sZ, kLdz);
    __syncthreads();
    // this thread's columns of its row: part, part + kThreadsPerRow, ...
    acc_t tile_max = neg_inf<acc_t>();
    int64_t tile_arg = -1;
    for (int j = part; j < BC && c0 + j < pass.cols; j += kThreadsPerRow) {
      const acc_t z = sZ[my_row * kLdz + j] * inv_tau;
      saw_nan |= z != z;
      if (z > tile_max) { tile_max = z; tile_arg = c0 + j; }
      if (c0 + j == positive && target_logit && real_row) target_logit[row] = z;
    }
    // max and first argmax over the row's threads (lanes part 0..kThreadsPerRow-1)
    for (int o = kThreadsPerRow / 2; o > 0; o /= 2) {
      const acc_t m = __shfl_xor_sync(0xffffffffu, tile_max, o);
      const int64_t c = __shfl_xor_sync(0xffffffffu, tile_arg, o);
      if (m > tile_max || (m == tile_max && c >= 0 && (tile_arg < 0 || c < tile_arg))) {
        tile_max = m;
        tile_arg = c;
      }
    }
    if (tile_max > best) { best = tile_max; best_col = tile_arg; }
    if (softmax) {
      const acc_t new_max = tile_max > run_max ? tile_max : run_max;
      const acc_t rescale = run_max == neg_inf<acc_t>() ? acc_t(0) : exp_acc(run_max - new_max);
      acc_t sum = 0, dot = 0;
      for (int j = part; j < BC && c0 + j < pass.cols; j += kThreadsPerRow) {
        const acc_t z = sZ[my_row * kLdz + j] * inv_tau;
        const acc_t p = exp_acc(z - new_max);
        sum += p;
        dot += p * z;
      }
      for (int o = kThreadsPerRow / 2; o > 0; o /= 2) {
        sum += __shfl_xor_sync(0xffffffffu, sum, o);
        dot += __shfl_xor_sync(0xffffffffu, dot, o);
      }
      run_sum = run_sum * rescale + sum;
      run_dot = run_dot * rescale + dot;
      run_max = new_max;
    }
    __syncthreads();  // sZ is rewritten by the next tile
  }
  for (int o = kThreadsPerRow / 2; o > 0; o /= 2)
    saw_nan |= __shfl_xor_sync(0xffffffffu, static_cast<int>(saw_nan), o) != 0;
  if (!real_row || part != 0) return;
  if (argmax) argmax[row] = best_col;
  if (!softmax) return;
  lse[row] = saw_nan ? quiet_nan<acc_t>() : run_max + log_acc(run_sum);
  if (expect) expect[row] = run_dot / run_sum;
}

// Grad pass (contrastive.h): grad_unit[r][d] = sum_c G_rc val_b[c][d] for this block's
// rows and D chunk (1/tau and the normalisation are applied by unit_backward_kernel).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
grad_pass_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                 const typename ValType<scalar_t>::type* __restrict__ b_val,
                 ContrastivePass pass, const typename AccType<scalar_t>::type* inv_temperature,
                 SoftmaxTerm row_term, SoftmaxTerm col_term,
                 typename AccType<scalar_t>::type* __restrict__ grad_unit,
                 int64_t grad_stride) {
  using acc_t = typename AccType<scalar_t>::type;
  using val_t = typename ValType<scalar_t>::type;
  using Tile = GradTile<scalar_t>;
  constexpr int BR = Tile::BR, BC = Tile::BC, DK = Tile::DK, DV = Tile::DV;
  constexpr int kLdg = acc_stride<scalar_t>(BC), kLdv = acc_stride<scalar_t>(DV);
  __shared__ __align__(32) unsigned char smem_a[BR * op_stride<scalar_t>(DK) * sizeof(scalar_t)];
  __shared__ __align__(32) unsigned char smem_b[BC * op_stride<scalar_t>(DK) * sizeof(scalar_t)];
  __shared__ __align__(32) unsigned char smem_g[BR * kLdg * sizeof(acc_t)];
  __shared__ __align__(32) unsigned char smem_v[BC * kLdv * sizeof(val_t)];
  scalar_t* sA = reinterpret_cast<scalar_t*>(smem_a);
  scalar_t* sB = reinterpret_cast<scalar_t*>(smem_b);
  acc_t* sG = reinterpret_cast<acc_t*>(smem_g);
  val_t* sV = reinterpret_cast<val_t*>(smem_v);

  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * BR;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * DV;
  const acc_t inv_tau = *inv_temperature;
  const acc_t* wr = static_cast<const acc_t*>(row_term.weight);
  const acc_t* lser = static_cast<const acc_t*>(row_term.lse);
  const acc_t* wc = static_cast<const acc_t*>(col_term.weight);
  const acc_t* lsec = static_cast<const acc_t*>(col_term.lse);

  Engine<scalar_t, BR, BC> logits;   // Z tile
  Engine<scalar_t, BR, DV> product;  // this block's [BR][DV] slice of the gradient
  product.zero();
  for (int64_t c0 = 0; c0 < pass.cols; c0 += BC) {
    logit_tile<scalar_t, BR, BC, DK>(logits, sA, sB, a, b, pass.dim_padded, r0, c0);
    logits.store_logits(sG, kLdg);
    load_tile(sV, kLdv, b_val, pass.dim_padded, c0, BC, d0, DV, pass.dim_padded);
    __syncthreads();
    for (int e = threadIdx.x; e < BR * BC; e += blockDim.x) {
      const int i = e / BC, j = e % BC;
      const int64_t r = r0 + i, c = c0 + j;
      acc_t g = 0;
      if (r < pass.rows && c < pass.cols) {
        const acc_t z = sG[i * kLdg + j] * inv_tau;
        if (wr) {
          const int64_t pos = contrastive_target(row_term.target, r, pass.ignore_index);
          g += wr[r] * (exp_acc(z - lser[r]) - (c == pos ? acc_t(1) : acc_t(0)));
        }
        if (wc) {
          const int64_t pos = contrastive_target(col_term.target, c, pass.ignore_index);
          g += wc[c] * (exp_acc(z - lsec[c]) - (r == pos ? acc_t(1) : acc_t(0)));
        }
      }
      sG[i * kLdg + j] = g;
    }
    __syncthreads();
    product.product(sG, kLdg, sV, kLdv, BC);
    __syncthreads();  // sG, sV are rewritten by the next tile
  }
  product.store_product(grad_unit + r0 * grad_stride + d0, grad_stride);
}

// One warp per row: dL/dx = backward of the normalisation of (1/tau) grad_unit.
template <typename scalar_t>
__global__ void unit_backward_kernel(const typename AccType<scalar_t>::type* __restrict__ grad_unit,
                                     int64_t grad_stride,
                                     const typename ValType<scalar_t>::type* __restrict__ unit,
                                     int64_t unit_stride, const double* __restrict__ inv_norm,
                                     const typename AccType<scalar_t>::type* inv_temperature,
                                     int64_t rows, int64_t dim, bool normalize,
                                     scalar_t* __restrict__ grad_x) {
  using acc_t = typename AccType<scalar_t>::type;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerPrepBlock + threadIdx.x / kWarpSize;
  if (r >= rows) return;
  const acc_t inv_tau = *inv_temperature;
  const acc_t* g = grad_unit + r * grad_stride;
  const auto* s = unit + r * unit_stride;
  scalar_t* out = grad_x + r * dim;
  const double inv = inv_norm[r];
  const bool project = normalize && !contrastive_norm_clamped(inv);
  acc_t sg = 0;
  if (project) {
    for (int64_t d = lane; d < dim; d += kWarpSize) sg += to_acc(s[d]) * g[d] * inv_tau;
    sg = warp_sum(sg);
  }
  const acc_t scale = normalize ? static_cast<acc_t>(inv) : acc_t(1);
  for (int64_t d = lane; d < dim; d += kWarpSize) {
    const acc_t gd = g[d] * inv_tau;
    out[d] = from_double<scalar_t>(static_cast<double>((gd - to_acc(s[d]) * sg) * scale));
  }
}

// --- dispatch ------------------------------------------------------------------------------

template <typename F>
int dispatch(ScalarKind kind, F&& f) {
  switch (kind) {
    case ScalarKind::kFloat16: return f(__half{});
    case ScalarKind::kBFloat16: return f(__nv_bfloat16{});
    case ScalarKind::kFloat32: return f(float{});
    case ScalarKind::kFloat64: return f(double{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int64_t contrastive_cuda_padded_rows(ScalarKind kind, int64_t rows) {
  return round_up(rows, kind == ScalarKind::kFloat64 ? kRowPad<double> : kRowPad<float>);
}

int64_t contrastive_cuda_padded_dim(ScalarKind, int64_t dim) { return round_up(dim, kDimPad); }

int64_t contrastive_cuda_grad_stride(ScalarKind kind, int64_t dim) {
  const int64_t dv = kind == ScalarKind::kFloat64 ? GradTile<double>::DV : GradTile<float>::DV;
  return round_up(contrastive_cuda_padded_dim(kind, dim), dv);
}

int contrastive_prepare_cuda(const void* x, ScalarKind kind, int64_t rows, int64_t dim,
                             bool normalize, void* op, void* val, double* inv_norm,
                             void* stream) {
  const int64_t rows_padded = contrastive_cuda_padded_rows(kind, rows);
  if (rows_padded == 0) return cudaSuccess;
  const int64_t dim_padded = contrastive_cuda_padded_dim(kind, dim);
  return dispatch(kind, [&](auto tag) {
    using scalar_t = decltype(tag);
    using val_t = typename ValType<scalar_t>::type;
    const int64_t blocks = (rows_padded + kRowsPerPrepBlock - 1) / kRowsPerPrepBlock;
    prepare_kernel<scalar_t><<<static_cast<unsigned>(blocks), kRowsPerPrepBlock * kWarpSize, 0,
                               static_cast<cudaStream_t>(stream)>>>(
        static_cast<const scalar_t*>(x), rows, dim, rows_padded, dim_padded, normalize,
        static_cast<scalar_t*>(op), kIsHalf<scalar_t> ? static_cast<val_t*>(val) : nullptr,
        inv_norm);
    return static_cast<int>(cudaGetLastError());
  });
}

int contrastive_row_pass_cuda(ScalarKind kind, const ContrastivePass& pass, const void* a_op,
                              const void* b_op, const void* inv_temperature,
                              const int64_t* target, void* lse, void* expect,
                              void* target_logit, int64_t* argmax, void* stream) {
  if (pass.rows == 0) return cudaSuccess;
  return dispatch(kind, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename AccType<scalar_t>::type;
    const int64_t blocks = (pass.rows + RowTile<scalar_t>::BR - 1) / RowTile<scalar_t>::BR;
    row_pass_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0,
                                static_cast<cudaStream_t>(stream)>>>(
        static_cast<const scalar_t*>(a_op), static_cast<const scalar_t*>(b_op), pass,
        static_cast<const acc_t*>(inv_temperature), target, static_cast<acc_t*>(lse),
        static_cast<acc_t*>(expect), static_cast<acc_t*>(target_logit), argmax);
    return static_cast<int>(cudaGetLastError());
  });
}

int contrastive_grad_pass_cuda(ScalarKind kind, const ContrastivePass& pass, const void* a_op,
                               const void* a_val, const void* b_op, const void* b_val,
                               const void* inv_temperature, const SoftmaxTerm& row_term,
                               const SoftmaxTerm& col_term, const double* a_inv_norm,
                               bool normalize, void* grad_unit, void* grad_x, void* stream) {
  if (pass.rows == 0 || pass.dim == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch(kind, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename AccType<scalar_t>::type;
    using val_t = typename ValType<scalar_t>::type;
    using Tile = GradTile<scalar_t>;
    const int64_t grad_stride = contrastive_cuda_grad_stride(kind, pass.dim);
    const dim3 grid(static_cast<unsigned>((pass.rows + Tile::BR - 1) / Tile::BR),
                    static_cast<unsigned>(grad_stride / Tile::DV));
    grad_pass_kernel<scalar_t><<<grid, kThreads, 0, s>>>(
        static_cast<const scalar_t*>(a_op), static_cast<const scalar_t*>(b_op),
        static_cast<const val_t*>(b_val), pass, static_cast<const acc_t*>(inv_temperature),
        row_term, col_term, static_cast<acc_t*>(grad_unit), grad_stride);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
    const int64_t blocks = (pass.rows + kRowsPerPrepBlock - 1) / kRowsPerPrepBlock;
    unit_backward_kernel<scalar_t><<<static_cast<unsigned>(blocks),
                                     kRowsPerPrepBlock * kWarpSize, 0, s>>>(
        static_cast<const acc_t*>(grad_unit), grad_stride, static_cast<const val_t*>(a_val),
        pass.dim_padded, a_inv_norm, static_cast<const acc_t*>(inv_temperature), pass.rows,
        pass.dim, normalize, static_cast<scalar_t*>(grad_x));
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace cifops
