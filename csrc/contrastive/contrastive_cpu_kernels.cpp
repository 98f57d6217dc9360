// The CPU tile kernels of the contrastive loss (the math is in contrastive.h, the entry
// points in contrastive_cpu.cpp).
//
// This source is compiled twice, as two translation units, into two namespaces (as
// ATen's CPU_CAPABILITY does): once for the baseline ISA (contrastive_cpu_kernels::
// portable, 16-byte vectors, the only build on aarch64) and once with -mavx2 -mfma
// -DCIFOPS_CPU_AVX2 (::avx2, 32-byte vectors and FMA); contrastive_cpu.cpp takes the AVX2
// build when the CPU has it. setup.py and CMakeLists.txt build both (the extension itself
// is compiled without -march flags, so the portable build alone would be SSE2 only). The
// vectors are GCC/Clang vector extensions, so both builds are the same source.
//
// Everything a build defines lives in its own namespace. Inline functions of the shared
// headers (std::vector, contrastive.h) are compiled in both units, the AVX2 one with AVX2
// instructions: the builds link the portable unit first, so that the linker keeps its
// copies (a duplicate inline definition is resolved to the first one linked).
//
// Tiling (one task = one block of kRowBlock rows of A, all columns of B):
//
//   for each column tile of kColTile columns of B:
//     logits   Z[kRowBlock][tile] = A_block . B_tile^T         micro-kernel 6 x (64 bytes),
//              B read from its packed panels [panel][d][kPanel] so that the kernel
//              broadcasts one A element and loads two contiguous B vectors per d.
//     softmax  per row: scale by 1/tau, online max / sum / expected logit (row pass),
//              or the G tile from the saved log-sum-exps (grad pass), written over Z.
//     product  Acc[kRowBlock][dim] += Z . B_tile                micro-kernel 6 x (64 bytes),
//              B read row-major (unit rows), vectorised over d.
//
// Memory per task: one Z tile and one accumulator block. With AVX2 the micro-kernels
// keep 12 vector accumulators in registers (6 rows x 2 vectors) plus two B vectors
// and a broadcast: 15 of the 16 registers.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "contrastive_cpu_kernels.h"

#if defined(CIFOPS_CPU_AVX2)
#if !defined(__AVX2__) || !defined(__FMA__)
#error "the avx2 build of contrastive_cpu_kernels.cpp is compiled with -mavx2 -mfma"
#endif
#include <immintrin.h>
#define CIFOPS_CPU_CAPABILITY avx2
#else
#define CIFOPS_CPU_CAPABILITY portable
#endif

namespace cifops {
namespace contrastive_cpu_kernels {
namespace CIFOPS_CPU_CAPABILITY {
namespace {

#if defined(CIFOPS_CPU_AVX2)
constexpr int kVectorBytes = 32;
inline __m256 madd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
inline __m256d madd(__m256d a, __m256d b, __m256d c) { return _mm256_fmadd_pd(a, b, c); }
#else
// 16-byte vectors: the widest every x86-64 and aarch64 CPU has (32-byte ones would
// change the by-value ABI without AVX).
constexpr int kVectorBytes = 16;
template <typename V>
inline V madd(V a, V b, V c) {
  return a * b + c;
}
#endif

constexpr int kMicroRows = 6;                // rows of A per micro-kernel call
constexpr int64_t kRowBlock = kCpuRowBlock;  // 48 = 8 micro-kernel row groups
static_assert(kRowBlock % kMicroRows == 0, "row block must be whole micro-kernel groups");
constexpr int64_t kColTile = 64;  // columns of B per tile: Z tile 48 x 64 stays in L1

// Columns per packed panel: 64 bytes, two AVX2 vectors (four SSE/NEON ones).
template <typename T>
constexpr int64_t panel_width() {
  return 64 / static_cast<int64_t>(sizeof(T));
}

// What one task works on: a block of rows of A against the whole of B.
template <typename T>
struct TileProblem {
  const ContrastivePass* pass;
  const T* a_unit;      // [Rp][Dp]
  const T* b_packed;    // [Cp / W][Dp][W]
  const T* b_unit;      // [Cp][Dp]
  int64_t cols_padded;  // Cp
  TileProblem(const ContrastiveCpuParams& p)
      : pass(&p.pass),
        a_unit(static_cast<const T*>(p.a_unit)),
        b_packed(static_cast<const T*>(p.b_packed)),
        b_unit(static_cast<const T*>(p.b_unit)),
        cols_padded(contrastive_cpu_padded_rows(p.pass.cols)) {}
};

// Per-thread scratch: a Z tile and an accumulator block (kept between calls).
template <typename T>
struct TileScratch {
  std::vector<T> z, acc;
  void reserve(int64_t dim_padded, bool with_acc) {
    if (z.size() < static_cast<size_t>(kRowBlock * kColTile)) z.resize(kRowBlock * kColTile);
    if (with_acc && acc.size() < static_cast<size_t>(kRowBlock * dim_padded))
      acc.resize(kRowBlock * dim_padded);
  }
};

// The row pass's fields of ContrastiveCpuParams, typed.
template <typename T>
struct RowPassIo {
  const int64_t* target;
  T* lse;
  T* expect;
  T* target_logit;
  int64_t* argmax;
  const T* fused_weight;  // non-null: compute fused_grad
  const double* a_inv_norm;
  bool normalize;
  T* fused_grad;
  explicit RowPassIo(const ContrastiveCpuParams& p)
      : target(p.target),
        lse(static_cast<T*>(p.lse)),
        expect(static_cast<T*>(p.expect)),
        target_logit(static_cast<T*>(p.target_logit)),
        argmax(p.argmax),
        fused_weight(static_cast<const T*>(p.fused_weight)),
        a_inv_norm(p.a_inv_norm),
        normalize(p.normalize),
        fused_grad(static_cast<T*>(p.fused_grad)) {}
};

// SoftmaxTerm with its arrays typed.
template <typename T>
struct TypedTerm {
  const T* weight;
  const T* lse;
  const int64_t* target;
  explicit TypedTerm(const SoftmaxTerm& t)
      : weight(static_cast<const T*>(t.weight)),
        lse(static_cast<const T*>(t.lse)),
        target(t.target) {}
};

// The grad pass's fields of ContrastiveCpuParams, typed.
template <typename T>
struct GradPassIo {
  TypedTerm<T> row, col;
  const double* a_inv_norm;
  bool normalize;
  T* grad_x;
  explicit GradPassIo(const ContrastiveCpuParams& p)
      : row(p.row_term),
        col(p.col_term),
        a_inv_norm(p.a_inv_norm),
        normalize(p.normalize),
        grad_x(static_cast<T*>(p.grad_x)) {}
};

template <typename T>
struct Simd {
  static constexpr int kLanes = kVectorBytes / static_cast<int>(sizeof(T));
  typedef T V __attribute__((vector_size(kVectorBytes)));
  typedef int32_t I __attribute__((vector_size(kVectorBytes)));  // float lanes as bits
};

template <typename T>
inline typename Simd<T>::V vload(const T* p) {
  typename Simd<T>::V v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void vstore(T* p, typename Simd<T>::V v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// Written as an initializer so that it compiles to one broadcast.
template <typename T>
inline typename Simd<T>::V vbroadcast(T x) {
  using V = typename Simd<T>::V;
  if constexpr (Simd<T>::kLanes == 8)
    return V{x, x, x, x, x, x, x, x};
  else if constexpr (Simd<T>::kLanes == 4)
    return V{x, x, x, x};
  else
    return V{x, x};
}

// exp(x) for a vector of floats, 1-2 ulp (Cephes' expf): x = n ln2 + r with
// |r| <= ln2 / 2, a degree-5 polynomial for exp(r), 2^n through the exponent bits.
// Results below the smallest normal float are flushed to 0 (they are < 1.2e-38 of
// the row maximum's term, which is 1), NaN gives 0 too: callers keep NaN alive
// through the scalar max / rescale factors.
inline Simd<float>::V vexp(Simd<float>::V x) {
  using V = Simd<float>::V;
  using I = Simd<float>::I;
  const V lo = vbroadcast(-87.33654f), hi = vbroadcast(88.0f);
  const I keep = x >= lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V magic = vbroadcast(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const V n = (x * 1.44269504088896341f + magic) - magic;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = vbroadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  V scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  const V y = p * scale;
  I out;
  __builtin_memcpy(&out, &y, sizeof(out));
  out &= keep;
  V result;
  __builtin_memcpy(&result, &out, sizeof(result));
  return result;
}

inline Simd<double>::V vexp(Simd<double>::V x) {  // float64 is for checking, not speed
  Simd<double>::V y;
  for (int i = 0; i < Simd<double>::kLanes; ++i) y[i] = std::exp(x[i]);
  return y;
}

// Z[r][j] = sum_{d < D} a[r][d] * panel[d][j] for 6 rows and one packed panel.
template <typename T>
inline void micro_logits(const T* a, int64_t lda, const T* panel, int64_t D, T* z, int64_t ldz) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  constexpr int64_t W = panel_width<T>();
  constexpr int kVecs = static_cast<int>(W / L);
  V c[kMicroRows][kVecs];
  for (int r = 0; r < kMicroRows; ++r)
    for (int v = 0; v < kVecs; ++v) c[r][v] = V{};
  for (int64_t d = 0; d < D; ++d) {
    V b[kVecs];
    for (int v = 0; v < kVecs; ++v) b[v] = vload(panel + d * W + v * L);
    for (int r = 0; r < kMicroRows; ++r) {
      const V ar = vbroadcast(a[r * lda + d]);
      for (int v = 0; v < kVecs; ++v) c[r][v] = madd(ar, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < kMicroRows; ++r)
    for (int v = 0; v < kVecs; ++v) vstore(z + r * ldz + v * L, c[r][v]);
}

// acc[r][0 : W] += sum_{c < n} p[r][c] * b[c][0 : W] for 6 rows (W = one panel width).
template <typename T>
inline void micro_accumulate(const T* p, int64_t ldp, const T* b, int64_t ldb, int64_t n, T* acc,
                             int64_t ldacc) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  constexpr int kVecs = static_cast<int>(panel_width<T>() / L);
  V c[kMicroRows][kVecs];
  for (int r = 0; r < kMicroRows; ++r)
    for (int v = 0; v < kVecs; ++v) c[r][v] = vload(acc + r * ldacc + v * L);
  for (int64_t j = 0; j < n; ++j) {
    V bj[kVecs];
    for (int v = 0; v < kVecs; ++v) bj[v] = vload(b + j * ldb + v * L);
    for (int r = 0; r < kMicroRows; ++r) {
      const V pr = vbroadcast(p[r * ldp + j]);
      for (int v = 0; v < kVecs; ++v) c[r][v] = madd(pr, bj[v], c[r][v]);
    }
  }
  for (int r = 0; r < kMicroRows; ++r)
    for (int v = 0; v < kVecs; ++v) vstore(acc + r * ldacc + v * L, c[r][v]);
}

// Z[0:groups*6][0:width] for rows r0.. of A and columns c0.. of B (width a multiple
// of the panel width, groups the row groups that hold real rows).
template <typename T>
void tile_logits(const TileProblem<T>& tp, int64_t r0, int64_t c0, int64_t width, int groups,
                 T* z) {
  constexpr int64_t W = panel_width<T>();
  const int64_t Dp = tp.pass->dim_padded, D = tp.pass->dim;
  for (int64_t j = 0; j < width; j += W) {
    const T* panel = tp.b_packed + ((c0 + j) / W) * Dp * W;
    for (int g = 0; g < groups; ++g)
      micro_logits(tp.a_unit + (r0 + g * kMicroRows) * Dp, Dp, panel, D,
                   z + g * kMicroRows * kColTile + j, kColTile);
  }
}

// acc[0:groups*6][0:Dp] += Z[.][0:n] . B[c0 : c0 + n][0:Dp]
template <typename T>
void tile_accumulate(const TileProblem<T>& tp, const T* z, int64_t c0, int64_t n, int groups,
                     T* acc) {
  constexpr int64_t W = panel_width<T>();
  const int64_t Dp = tp.pass->dim_padded;
  for (int64_t d0 = 0; d0 < Dp; d0 += W)  // B slice [n][W] stays in L1 across row groups
    for (int g = 0; g < groups; ++g)
      micro_accumulate(z + g * kMicroRows * kColTile, kColTile, tp.b_unit + c0 * Dp + d0, Dp, n,
                       acc + g * kMicroRows * Dp + d0, Dp);
}

// dL/dx of one row from dL/ds (g, length D) through the normalisation (contrastive.h).
template <typename T>
void unit_backward_row(const T* s, const T* g, int64_t D, double inv_norm, bool normalize, T* dx) {
  if (!normalize) {
    for (int64_t d = 0; d < D; ++d) dx[d] = g[d];
    return;
  }
  if (contrastive_norm_clamped(inv_norm)) {
    for (int64_t d = 0; d < D; ++d) dx[d] = static_cast<T>(g[d] * inv_norm);
    return;
  }
  double sg = 0.0;
  for (int64_t d = 0; d < D; ++d) sg += static_cast<double>(s[d]) * g[d];
  const T proj = static_cast<T>(sg);
  const T scale = static_cast<T>(inv_norm);
  for (int64_t d = 0; d < D; ++d) dx[d] = (g[d] - s[d] * proj) * scale;
}

// Number of 6-row groups of the block starting at r0 that hold real rows.
inline int active_groups(int64_t r0, int64_t rows) {
  const int64_t real = rows - r0 < kRowBlock ? rows - r0 : kRowBlock;
  return static_cast<int>((real + kMicroRows - 1) / kMicroRows);
}

// ---------------------------------------------------------------------------
// Row pass: online log-sum-exp, expected logit, target logit, argmax; optionally
// the fused gradient (see contrastive.h).
template <typename T>
void row_pass_block(const TileProblem<T>& tp, const RowPassIo<T>& io, int64_t r0,
                    TileScratch<T>& scratch) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  const ContrastivePass& pass = *tp.pass;
  const int64_t R = pass.rows, C = pass.cols, D = pass.dim, Dp = pass.dim_padded;
  const int64_t rows = R - r0 < kRowBlock ? R - r0 : kRowBlock;
  const int groups = active_groups(r0, R);
  const bool softmax = io.lse != nullptr;
  const bool fused = io.fused_weight != nullptr;
  const T inv_tau = static_cast<T>(pass.inv_temperature);
  T* z = scratch.z.data();
  T* acc = scratch.acc.data();
  if (fused) std::fill(acc, acc + kRowBlock * Dp, T(0));

  T run_max[kRowBlock];
  double run_sum[kRowBlock], run_dot[kRowBlock];  // sum exp(z - max), sum exp(z - max) z
  int64_t best[kRowBlock], positive[kRowBlock];
  T best_logit[kRowBlock], positive_logit[kRowBlock];
  for (int64_t r = 0; r < rows; ++r) {
    run_max[r] = best_logit[r] = -std::numeric_limits<T>::infinity();
    run_sum[r] = run_dot[r] = 0.0;
    best[r] = C > 0 ? 0 : -1;
    positive[r] = contrastive_target(io.target, r0 + r, pass.ignore_index);
    positive_logit[r] = T(0);
  }

  for (int64_t c0 = 0; c0 < C; c0 += kColTile) {
    const int64_t width = std::min(kColTile, tp.cols_padded - c0);  // whole panels
    const int64_t valid = std::min(width, C - c0);                  // real columns
    tile_logits(tp, r0, c0, width, groups, z);
    for (int64_t r = 0; r < rows; ++r) {
      T* zr = z + r * kColTile;
      // scale by 1/tau and take the tile max (a NaN wins, so that it propagates); the
      // first maximal column too when the argmax is wanted (scalar loop)
      T tile_max = -std::numeric_limits<T>::infinity();
      int64_t tile_arg = -1;
      if (io.argmax != nullptr) {
        for (int64_t j = 0; j < valid; ++j) {
          zr[j] *= inv_tau;
          if (zr[j] > tile_max || (zr[j] != zr[j] && tile_max == tile_max)) {
            tile_max = zr[j];
            tile_arg = j;
          }
        }
      } else {
        V vmax = vbroadcast(tile_max);
        V vnan = V{};
        int64_t j = 0;
        for (; j + L <= valid; j += L) {
          const V zv = vload(zr + j) * inv_tau;
          vstore(zr + j, zv);
          vmax = zv > vmax ? zv : vmax;
          vnan = zv != zv ? zv : vnan;  // keeps a NaN lane
        }
        for (int l = 0; l < L; ++l) {
          tile_max = vmax[l] > tile_max ? vmax[l] : tile_max;
          if (vnan[l] != vnan[l]) tile_max = vnan[l];
        }
        for (; j < valid; ++j) {
          zr[j] *= inv_tau;
          if (zr[j] > tile_max || (zr[j] != zr[j] && tile_max == tile_max)) tile_max = zr[j];
        }
      }
      // first maximal column overall: a later tile must be strictly larger (a NaN,
      // like torch.argmax, counts as the maximum and the first one stays)
      if (tile_arg >= 0 &&
          (tile_max > best_logit[r] || (tile_max != tile_max && best_logit[r] == best_logit[r]))) {
        best_logit[r] = tile_max;
        best[r] = c0 + tile_arg;
      }
      const int64_t pos = positive[r];
      if (pos >= c0 && pos < c0 + valid) positive_logit[r] = zr[pos - c0];
      if (!softmax) continue;
      const T new_max = tile_max > run_max[r] || tile_max != tile_max ? tile_max : run_max[r];
      // rescale what was summed against the old maximum (nothing on the first tile)
      const double rescale = run_max[r] == -std::numeric_limits<T>::infinity()
                                 ? 0.0
                                 : std::exp(static_cast<double>(run_max[r]) - new_max);
      run_max[r] = new_max;
      const V vmax = vbroadcast(new_max);
      V vsum = V{}, vdot = V{};
      int64_t j = 0;
      for (; j + L <= valid; j += L) {
        const V zv = vload(zr + j);
        const V p = vexp(zv - vmax);
        vsum += p;
        vdot = madd(p, zv, vdot);
        vstore(zr + j, p);
      }
      double tile_sum = 0.0, tile_dot = 0.0;
      for (; j < valid; ++j) {
        const T p = std::exp(zr[j] - new_max);
        tile_sum += p;
        tile_dot += static_cast<double>(p) * zr[j];
        zr[j] = p;
      }
      for (; j < width; ++j) zr[j] = T(0);  // padding columns
      for (int l = 0; l < L; ++l) {
        tile_sum += vsum[l];
        tile_dot += vdot[l];
      }
      run_sum[r] = run_sum[r] * rescale + tile_sum;
      run_dot[r] = run_dot[r] * rescale + tile_dot;
      if (fused && rescale != 1.0) {
        const T f = static_cast<T>(rescale);
        T* ar = acc + r * Dp;
        for (int64_t d = 0; d < Dp; ++d) ar[d] *= f;
      }
    }
    if (fused) tile_accumulate(tp, z, c0, valid, groups, acc);
  }

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = r0 + r;
    if (io.argmax) io.argmax[row] = best[r];
    if (io.target_logit) io.target_logit[row] = positive_logit[r];
    if (!softmax) continue;
    io.lse[row] = static_cast<T>(run_max[r] + std::log(run_sum[r]));
    if (io.expect) io.expect[row] = static_cast<T>(run_dot[r] / run_sum[r]);
    if (!fused) continue;
    T* out = io.fused_grad + row * D;
    const T weight = io.fused_weight[row];
    const int64_t pos = positive[r];
    if (weight == T(0) || pos < 0) {
      std::fill(out, out + D, T(0));
      continue;
    }
    // dl_r/ds_r = (1/tau) (sum_c P_rc t_c - t_pos), in place in the accumulator row
    T* g = acc + r * Dp;
    const T* t_pos = tp.b_unit + pos * Dp;
    const double inv_sum = 1.0 / run_sum[r];
    const T scale = static_cast<T>(weight * static_cast<double>(inv_tau));
    for (int64_t d = 0; d < D; ++d) g[d] = scale * (static_cast<T>(g[d] * inv_sum) - t_pos[d]);
    unit_backward_row(tp.a_unit + row * Dp, g, D, io.a_inv_norm[row], io.normalize, out);
  }
}

// ---------------------------------------------------------------------------
// Grad pass: Acc_r = sum_c G_rc b_c with G rebuilt per tile from the log-sum-exps.
template <typename T>
void grad_pass_block(const TileProblem<T>& tp, const GradPassIo<T>& io, int64_t r0,
                     TileScratch<T>& scratch) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  const ContrastivePass& pass = *tp.pass;
  const int64_t R = pass.rows, C = pass.cols, D = pass.dim, Dp = pass.dim_padded;
  const int64_t rows = R - r0 < kRowBlock ? R - r0 : kRowBlock;
  const int groups = active_groups(r0, R);
  const T inv_tau = static_cast<T>(pass.inv_temperature);
  const bool has_row = io.row.weight != nullptr, has_col = io.col.weight != nullptr;
  T* z = scratch.z.data();
  T* acc = scratch.acc.data();
  std::fill(acc, acc + kRowBlock * Dp, T(0));

  for (int64_t c0 = 0; c0 < C; c0 += kColTile) {
    const int64_t width = std::min(kColTile, tp.cols_padded - c0);
    const int64_t valid = std::min(width, C - c0);
    tile_logits(tp, r0, c0, width, groups, z);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = r0 + r;
      T* zr = z + r * kColTile;
      const T wr = has_row ? io.row.weight[row] : T(0);
      const V vwr = vbroadcast(wr);
      const V vlse = vbroadcast(has_row ? io.row.lse[row] : T(0));
      int64_t j = 0;
      for (; j + L <= valid; j += L) {
        const V zv = vload(zr + j) * inv_tau;
        V g = V{};
        if (has_row) g = vwr * vexp(zv - vlse);
        if (has_col)
          g = madd(vload(io.col.weight + c0 + j), vexp(zv - vload(io.col.lse + c0 + j)), g);
        vstore(zr + j, g);
      }
      for (; j < valid; ++j) {
        const T zv = zr[j] * inv_tau;
        T g = T(0);
        if (has_row) g = wr * std::exp(zv - io.row.lse[row]);
        if (has_col) g += io.col.weight[c0 + j] * std::exp(zv - io.col.lse[c0 + j]);
        zr[j] = g;
      }
      for (; j < width; ++j) zr[j] = T(0);
      // the positives: -w at the target column of the row term, and at every column
      // of the column term whose positive is this row
      if (has_row) {
        const int64_t pos = contrastive_target(io.row.target, row, pass.ignore_index);
        if (pos >= c0 && pos < c0 + valid) zr[pos - c0] -= wr;
      }
      if (has_col) {
        if (io.col.target == nullptr) {
          if (row >= c0 && row < c0 + valid) zr[row - c0] -= io.col.weight[row];
        } else {
          for (int64_t jj = 0; jj < valid; ++jj)
            if (contrastive_target(io.col.target, c0 + jj, pass.ignore_index) == row)
              zr[jj] -= io.col.weight[c0 + jj];
        }
      }
    }
    tile_accumulate(tp, z, c0, valid, groups, acc);
  }

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = r0 + r;
    T* g = acc + r * Dp;
    for (int64_t d = 0; d < D; ++d) g[d] *= inv_tau;
    unit_backward_row(tp.a_unit + row * Dp, g, D, io.a_inv_norm[row], io.normalize,
                      io.grad_x + row * D);
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Drivers: one task per row block.
template <typename T>
void prepare(const T* x, int64_t rows, int64_t dim, bool normalize, T* unit, T* packed,
             double* inv_norm, const ParallelFor& parallel_for) {
  constexpr int64_t W = panel_width<T>();
  const int64_t Rp = contrastive_cpu_padded_rows(rows);
  const int64_t Dp = (dim + W - 1) / W * W;
  const int64_t grain = Dp > 0 ? std::max<int64_t>(1, 16384 / Dp) : Rp;
  parallel_for(Rp, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* u = unit + r * Dp;
      if (r >= rows) {
        std::fill(u, u + Dp, T(0));
        continue;
      }
      const T* xr = x + r * dim;
      const double inv = normalize ? contrastive_inv_norm(contrastive_row_norm(xr, dim)) : 1.0;
      inv_norm[r] = inv;
      for (int64_t d = 0; d < dim; ++d) u[d] = static_cast<T>(static_cast<double>(xr[d]) * inv);
      std::fill(u + dim, u + Dp, T(0));
    }
  });
  if (packed == nullptr) return;
  parallel_for(Rp / W, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      T* dst = packed + p * Dp * W;
      const T* src = unit + p * W * Dp;
      for (int64_t d = 0; d < Dp; ++d)
        for (int64_t j = 0; j < W; ++j) dst[d * W + j] = src[j * Dp + d];
    }
  });
}

// Row blocks are handed out dynamically: every task of parallel_for pulls the next
// block from a shared counter until none is left, so a thread slowed down by other
// load on its core does not hold the others up (a static split waits for it). Each
// block's result does not depend on which thread computes it.
template <typename T, typename Block>
void for_each_row_block(int64_t rows, const ParallelFor& parallel_for, const Block& block) {
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  std::atomic<int64_t> next{0};
  parallel_for(blocks, 1, [&](int64_t, int64_t) {
    for (int64_t b = next.fetch_add(1); b < blocks; b = next.fetch_add(1)) block(b * kRowBlock);
  });
}

template <typename T>
void row_pass(const ContrastiveCpuParams& params, const ParallelFor& parallel_for) {
  const ContrastivePass& pass = params.pass;
  const TileProblem<T> tp(params);
  const RowPassIo<T> io(params);
  for_each_row_block<T>(pass.rows, parallel_for, [&](int64_t r0) {
    thread_local TileScratch<T> scratch;
    scratch.reserve(pass.dim_padded, io.fused_weight != nullptr);
    row_pass_block(tp, io, r0, scratch);
  });
}

template <typename T>
void grad_pass(const ContrastiveCpuParams& params, const ParallelFor& parallel_for) {
  const ContrastivePass& pass = params.pass;
  const TileProblem<T> tp(params);
  const GradPassIo<T> io(params);
  for_each_row_block<T>(pass.rows, parallel_for, [&](int64_t r0) {
    thread_local TileScratch<T> scratch;
    scratch.reserve(pass.dim_padded, true);
    grad_pass_block(tp, io, r0, scratch);
  });
}

#define CIFOPS_INSTANTIATE(T)                                                                      \
  template void prepare<T>(const T*, int64_t, int64_t, bool, T*, T*, double*, const ParallelFor&); \
  template void row_pass<T>(const ContrastiveCpuParams&, const ParallelFor&);                      \
  template void grad_pass<T>(const ContrastiveCpuParams&, const ParallelFor&);
CIFOPS_INSTANTIATE(float)
CIFOPS_INSTANTIATE(double)
#undef CIFOPS_INSTANTIATE

}  // namespace CIFOPS_CPU_CAPABILITY
}  // namespace contrastive_cpu_kernels
}  // namespace cifops
