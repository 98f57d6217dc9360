// Fake nvcuda::wmma: every lane holds the whole 16x16 tile (row-major in x[]), so the
// fragment layout is irrelevant; loads/mma are per lane, stores by lane 0 only.
#pragma once
namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {};
struct row_major {}; struct col_major {};
namespace precision { struct tf32 {}; }
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  float x[num_elements];
};
inline float elem(const __half& h) { return __half2float(h); }
inline float elem(const __nv_bfloat16& b) { return __bfloat162float(b); }
inline float elem(const float& f) { return f; }
template <typename Use, int M, int N, int K, typename T, typename L, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, L>;
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) { fprintf(stderr, "wmma load: pointer not 32-byte aligned\n"); abort(); }
  if ((ldm * sizeof(P)) % 16 != 0) { fprintf(stderr, "wmma load: bad ldm\n"); abort(); }
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = elem(std::is_same_v<L, col_major> ? p[c * ldm + r] : p[r * ldm + c]);
}
template <int M, int N, int K>
void fill_fragment(fragment<accumulator, M, N, K, float>& f, float v) { for (auto& e : f.x) e = v; }
template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  fragment<accumulator, M, N, K, float> out;
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float s = c.x[m * N + n];
      for (int k = 0; k < K; ++k) s += a.x[m * K + k] * b.x[k * N + n];
      out.x[m * N + n] = s;
    }
  d = out;
}
template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) { fprintf(stderr, "wmma store: pointer %p not 32-byte aligned, ldm %u\n", (void*)p, ldm); abort(); }
  if ((ldm * 4) % 16 != 0) { fprintf(stderr, "wmma store: bad ldm\n"); abort(); }
  if (threadIdx.x % 32 != 0) return;
  for (int m = 0; m < M; ++m) for (int n = 0; n < N; ++n) p[m * ldm + n] = f.x[m * N + n];
}
inline float __float_to_tf32(float f) {  // round to nearest, 10 mantissa bits
  uint32_t u; std::memcpy(&u, &f, 4); u += 0xfff + ((u >> 13) & 1); u &= ~0x1fffu; std::memcpy(&f, &u, 4); return f;
}
}}  // namespace nvcuda::wmma
