// CPU kernels of the fused contrastive loss (the math is in contrastive.h, the
// tiling in contrastive_cpu_kernels.h). Torch-free: raw pointers in, a
// ParallelFor callback for the threads.
//
// Parallelisation: one task per block of 48 rows of A; every task sweeps all of B,
// so each output row is written by exactly one task (deterministic, no atomics).
// The tile kernels are compiled twice, for the baseline ISA and for AVX2 + FMA,
// and the AVX2 build is taken when the CPU has it (the extension is compiled
// without -march flags, so without this the hot loops would be SSE2 only).
// The vectors are GCC/Clang vector extensions, so both builds are the same source
// (and the portable one serves aarch64).
// float32 inputs compute in float32 (per-row statistics in double), float64 in
// float64.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "contrastive.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define CIFOPS_CONTRASTIVE_X86 1
#include <immintrin.h>
#else
#define CIFOPS_CONTRASTIVE_X86 0
#endif

namespace cifops {

// The padding rules, shared by both builds and by the binding.
int64_t contrastive_cpu_panel(ScalarKind kind) { return kind == ScalarKind::kFloat64 ? 8 : 16; }

int64_t contrastive_cpu_padded_rows(int64_t rows) {
  return (rows + kCpuRowBlock - 1) / kCpuRowBlock * kCpuRowBlock;
}

int64_t contrastive_cpu_padded_dim(ScalarKind kind, int64_t dim) {
  const int64_t w = contrastive_cpu_panel(kind);
  return (dim + w - 1) / w * w;
}

namespace contrastive_cpu {

// ---- types shared by both builds ---------------------------------------------
constexpr int kMicroRows = 6;  // rows of A per micro-kernel call
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
  const T* a_unit;     // [Rp][Dp]
  const T* b_packed;   // [Cp / W][Dp][W]
  const T* b_unit;     // [Cp][Dp]
  int64_t cols_padded; // Cp
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

template <typename T>
struct RowPassIo {
  const int64_t* target = nullptr;
  T* lse = nullptr;
  T* expect = nullptr;
  T* target_logit = nullptr;
  int64_t* argmax = nullptr;
  const T* fused_weight = nullptr;  // non-null: compute fused_grad
  const double* a_inv_norm = nullptr;
  bool normalize = true;
  T* fused_grad = nullptr;
};

// SoftmaxTerm with its arrays typed.
template <typename T>
struct TypedTerm {
  const T* weight = nullptr;
  const T* lse = nullptr;
  const int64_t* target = nullptr;
  TypedTerm() = default;
  explicit TypedTerm(const SoftmaxTerm& t)
      : weight(static_cast<const T*>(t.weight)), lse(static_cast<const T*>(t.lse)),
        target(t.target) {}
};

template <typename T>
struct GradPassIo {
  TypedTerm<T> row, col;
  const double* a_inv_norm = nullptr;
  bool normalize = true;
  T* grad_x = nullptr;
};


// ---- the two builds -----------------------------------------------------------
// 16-byte vectors: the widest every x86-64 and aarch64 CPU has (32-byte ones would
// change the by-value ABI without AVX).
namespace portable {
constexpr int kVectorBytes = 16;
template <typename V>
inline V madd(V a, V b, V c) {
  return a * b + c;
}
#include "contrastive_cpu_kernels.h"
}  // namespace portable

#if CIFOPS_CONTRASTIVE_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {
constexpr int kVectorBytes = 32;
inline __m256 madd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
inline __m256d madd(__m256d a, __m256d b, __m256d c) { return _mm256_fmadd_pd(a, b, c); }
#include "contrastive_cpu_kernels.h"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

// CIFOPS_CPU_SIMD=portable (read once) forces the portable build, so that tests can
// cover it on an AVX2 machine.
bool use_avx2() {
#if CIFOPS_CONTRASTIVE_X86
  static const bool use = [] {
    const char* forced = std::getenv("CIFOPS_CPU_SIMD");
    if (forced != nullptr && std::string(forced) == "portable") return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return use;
#else
  return false;
#endif
}

#if CIFOPS_CONTRASTIVE_X86
#define CIFOPS_CONTRASTIVE_CALL(fn, ...) \
  (use_avx2() ? avx2::fn(__VA_ARGS__) : portable::fn(__VA_ARGS__))
#else
#define CIFOPS_CONTRASTIVE_CALL(fn, ...) portable::fn(__VA_ARGS__)
#endif

template <typename F>
void dispatch_kind(ScalarKind kind, F&& f) {
  if (kind == ScalarKind::kFloat32) f(float{});
  else if (kind == ScalarKind::kFloat64) f(double{});
  else throw std::invalid_argument("cifops contrastive CPU kernels take float32/float64");
}

}  // namespace contrastive_cpu

void contrastive_prepare_cpu(const void* x, ScalarKind kind, int64_t rows, int64_t dim,
                             bool normalize, void* unit, void* packed, double* inv_norm,
                             const ParallelFor& parallel_for) {
  using namespace contrastive_cpu;
  dispatch_kind(kind, [&](auto tag) {
    using T = decltype(tag);
    CIFOPS_CONTRASTIVE_CALL(prepare<T>, static_cast<const T*>(x), rows, dim, normalize,
                            static_cast<T*>(unit), static_cast<T*>(packed), inv_norm,
                            parallel_for);
  });
}

void contrastive_row_pass_cpu(ScalarKind kind, const ContrastivePass& pass, const void* a_unit,
                              const void* b_packed, const void* b_unit, const int64_t* target,
                              void* lse, void* expect, void* target_logit, int64_t* argmax,
                              const void* fused_weight, const double* a_inv_norm, bool normalize,
                              void* fused_grad, const ParallelFor& parallel_for) {
  using namespace contrastive_cpu;
  dispatch_kind(kind, [&](auto tag) {
    using T = decltype(tag);
    RowPassIo<T> io;
    io.target = target;
    io.lse = static_cast<T*>(lse);
    io.expect = static_cast<T*>(expect);
    io.target_logit = static_cast<T*>(target_logit);
    io.argmax = argmax;
    io.fused_weight = static_cast<const T*>(fused_weight);
    io.a_inv_norm = a_inv_norm;
    io.normalize = normalize;
    io.fused_grad = static_cast<T*>(fused_grad);
    CIFOPS_CONTRASTIVE_CALL(row_pass<T>, pass, static_cast<const T*>(a_unit),
                            static_cast<const T*>(b_packed), static_cast<const T*>(b_unit), io,
                            parallel_for);
  });
}

void contrastive_grad_pass_cpu(ScalarKind kind, const ContrastivePass& pass, const void* a_unit,
                               const void* b_packed, const void* b_unit,
                               const SoftmaxTerm& row_term, const SoftmaxTerm& col_term,
                               const double* a_inv_norm, bool normalize, void* grad_x,
                               const ParallelFor& parallel_for) {
  using namespace contrastive_cpu;
  dispatch_kind(kind, [&](auto tag) {
    using T = decltype(tag);
    GradPassIo<T> io;
    io.row = TypedTerm<T>(row_term);
    io.col = TypedTerm<T>(col_term);
    io.a_inv_norm = a_inv_norm;
    io.normalize = normalize;
    io.grad_x = static_cast<T*>(grad_x);
    CIFOPS_CONTRASTIVE_CALL(grad_pass<T>, pass, static_cast<const T*>(a_unit),
                            static_cast<const T*>(b_packed), static_cast<const T*>(b_unit), io,
                            parallel_for);
  });
}

}  // namespace cifops
