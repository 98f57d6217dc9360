// Runs the CUDA kernels of csrc/contrastive/contrastive_cuda.cu on the CPU, under the
// small emulation of emu_cuda.h (one std::thread per CUDA thread, __syncthreads and
// warp shuffles through barriers) and, in its second build (as for sm_80), the fake
// tensor-core API of emu_wmma.h (which checks WMMA's pointer-alignment and ldm rules),
// and compares every output with the CPU kernels of contrastive_cpu.cpp. It checks the
// kernels' indexing, tiling, synchronisation and reductions where no GPU is available;
// it says nothing about speed or about the real tensor-core fragment layouts. Built and
// run by run.sh.
#include "contrastive/contrastive.h"
#include <cstdio>
#include <random>
#include <vector>
#include <cmath>
#include <cstring>
#include "emu_cuda.h"
using namespace cifops;
// device buffers: 256-byte aligned, as cudaMalloc / the caching allocator give
template <typename T> struct DevAlloc {
  using value_type = T;
  DevAlloc() = default;
  template <typename U> DevAlloc(const DevAlloc<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T) + 1, std::align_val_t(256))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(256)); }
  template <typename U> bool operator==(const DevAlloc<U>&) const { return true; }
};
template <typename T> using dvec = std::vector<T, DevAlloc<T>>;

template <typename T> ScalarKind kind_of();
template <> ScalarKind kind_of<float>() { return ScalarKind::kFloat32; }
template <> ScalarKind kind_of<double>() { return ScalarKind::kFloat64; }
template <> ScalarKind kind_of<__half>() { return ScalarKind::kFloat16; }
template <> ScalarKind kind_of<__nv_bfloat16>() { return ScalarKind::kBFloat16; }
template <typename T> T from_f(float f) { return static_cast<T>(f); }
template <> __half from_f<__half>(float f) { return __float2half(f); }
template <> __nv_bfloat16 from_f<__nv_bfloat16>(float f) { return __float2bfloat16(f); }
template <typename T> double to_d(T x) { return static_cast<double>(x); }
template <> double to_d<__half>(__half x) { return __half2float(x); }
template <> double to_d<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

ParallelFor serial = [](int64_t n, int64_t, const std::function<void(int64_t,int64_t)>& b) { b(0, n); };
double worst = 0;
void cmp(const char* what, const std::vector<double>& a, const std::vector<double>& b, double tol) {
  double err = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) != std::isnan(b[i])) { printf("  NaN MISMATCH %s at %zu: %g vs %g\n", what, i, a[i], b[i]); worst = 1e9; return; }
    if (std::isnan(a[i])) continue;
    err = std::max(err, std::fabs(a[i] - b[i])); scale = std::max(scale, std::fabs(b[i]));
  }
  const double rel = err / std::max(scale, 1e-30);
  worst = std::max(worst, rel / tol);
  printf("  %-14s rel err %.2e %s\n", what, rel, rel <= tol ? "ok" : "FAIL");
}

// cpu_t: the type the CPU reference computes in (float for half inputs)
template <typename T, typename cpu_t>
void run(int64_t N, int64_t M, int64_t D, bool normalize, bool with_targets, bool col_term, unsigned seed) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  using val_t = std::conditional_t<std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, float, T>;
  constexpr bool half = !std::is_same_v<val_t, T>;
  printf("%s N=%ld M=%ld D=%ld normalize=%d targets=%d col=%d\n", half ? "half" : (sizeof(T) == 8 ? "f64" : "f32"), N, M, D, normalize, with_targets, col_term);
  std::mt19937 g(seed); std::normal_distribution<float> nd; std::uniform_real_distribution<float> ud;
  const float scale = normalize ? 1.0f : 0.3f / std::sqrt(float(D));
  std::vector<T> xs(N * D), xt(M * D); std::vector<cpu_t> cs(N * D), ct(M * D);
  for (int64_t i = 0; i < N * D; ++i) { xs[i] = from_f<T>(nd(g) * scale); cs[i] = static_cast<cpu_t>(to_d(xs[i])); }
  for (int64_t i = 0; i < M * D; ++i) { xt[i] = from_f<T>(nd(g) * scale); ct[i] = static_cast<cpu_t>(to_d(xt[i])); }
  std::vector<int64_t> tgt(N);
  for (int64_t i = 0; i < N; ++i) tgt[i] = with_targets ? (ud(g) < 0.2f ? -100 : int64_t(ud(g) * M) % M) : i;
  const int64_t* tp = with_targets ? tgt.data() : nullptr;
  const double tau = 0.07;
  // ---- emulated CUDA
  const ScalarKind k = kind_of<T>();
  const int64_t Rs = contrastive_cuda_padded_rows(k, N), Rt = contrastive_cuda_padded_rows(k, M), Dp = contrastive_cuda_padded_dim(k, D);
  dvec<T> s_op(Rs * Dp), t_op(Rt * Dp); dvec<float> s_val(half ? Rs * Dp : 0), t_val(half ? Rt * Dp : 0);
  std::vector<double> s_in(N), t_in(M);
  contrastive_prepare_cuda(xs.data(), k, N, D, normalize, s_op.data(), half ? (void*)s_val.data() : nullptr, s_in.data(), nullptr);
  contrastive_prepare_cuda(xt.data(), k, M, D, normalize, t_op.data(), half ? (void*)t_val.data() : nullptr, t_in.data(), nullptr);
  const void* sv = half ? (const void*)s_val.data() : (const void*)s_op.data();
  const void* tv = half ? (const void*)t_val.data() : (const void*)t_op.data();
  acc_t inv_tau = acc_t(1.0 / tau), one = 1;
  ContrastivePass pass; pass.rows = N; pass.cols = M; pass.dim = D; pass.dim_padded = Dp; pass.ignore_index = -100;
  std::vector<acc_t> lse(N), ex(N), zt(N); std::vector<int64_t> am(N);
  contrastive_row_pass_cuda(k, pass, s_op.data(), t_op.data(), &inv_tau, tp, lse.data(), ex.data(), zt.data(), nullptr, nullptr);
  contrastive_row_pass_cuda(k, pass, s_op.data(), t_op.data(), &one, nullptr, nullptr, nullptr, nullptr, am.data(), nullptr);
  // column stats (for the column term): row pass of (t, s)
  ContrastivePass cpass = pass; cpass.rows = M; cpass.cols = N;
  std::vector<acc_t> clse(M), cex(M), czt(M);
  if (col_term) contrastive_row_pass_cuda(k, cpass, t_op.data(), s_op.data(), &inv_tau, nullptr, clse.data(), cex.data(), czt.data(), nullptr, nullptr);
  std::vector<acc_t> wr(N), wc(M);
  for (auto& w : wr) w = ud(g); for (auto& w : wc) w = ud(g);
  for (int64_t i = 0; i < N; ++i) if (with_targets && tgt[i] == -100) wr[i] = 0;
  SoftmaxTerm row{wr.data(), lse.data(), tp}, col = col_term ? SoftmaxTerm{wc.data(), clse.data(), nullptr} : SoftmaxTerm{};
  const int64_t gs = contrastive_cuda_grad_stride(k, D);
  dvec<acc_t> gu(Rs * gs), gut(Rt * gs); std::vector<T> gx(N * D), gt(M * D);
  contrastive_grad_pass_cuda(k, pass, s_op.data(), sv, t_op.data(), tv, &inv_tau, row, col, s_in.data(), normalize, gu.data(), gx.data(), nullptr);
  contrastive_grad_pass_cuda(k, cpass, t_op.data(), tv, s_op.data(), sv, &inv_tau, col, row, t_in.data(), normalize, gut.data(), gt.data(), nullptr);
  // ---- CPU reference (the tested CPU kernels)
  const ScalarKind ck = sizeof(cpu_t) == 8 ? ScalarKind::kFloat64 : ScalarKind::kFloat32;
  const int64_t Cs = contrastive_cpu_padded_rows(N), Ct = contrastive_cpu_padded_rows(M), CDp = contrastive_cpu_padded_dim(ck, D);
  std::vector<cpu_t> su(Cs * CDp), sp(Cs * CDp), tu(Ct * CDp), tpk(Ct * CDp); std::vector<double> sn(N), tn(M);
  contrastive_prepare_cpu(cs.data(), ck, N, D, normalize, su.data(), sp.data(), sn.data(), serial);
  contrastive_prepare_cpu(ct.data(), ck, M, D, normalize, tu.data(), tpk.data(), tn.data(), serial);
  ContrastivePass p2 = pass; p2.dim_padded = CDp; p2.inv_temperature = 1.0 / tau;
  ContrastivePass cp2 = cpass; cp2.dim_padded = CDp; cp2.inv_temperature = 1.0 / tau;
  std::vector<cpu_t> rl(N), re(N), rz(N), rcl(M), rce(M), rcz(M); std::vector<int64_t> ram(N);
  contrastive_row_pass_cpu(ck, p2, su.data(), tpk.data(), tu.data(), tp, rl.data(), re.data(), rz.data(), ram.data(), nullptr, sn.data(), normalize, nullptr, serial);
  if (col_term) contrastive_row_pass_cpu(ck, cp2, tu.data(), sp.data(), su.data(), nullptr, rcl.data(), rce.data(), rcz.data(), nullptr, nullptr, tn.data(), normalize, nullptr, serial);
  std::vector<cpu_t> cwr(wr.begin(), wr.end()), cwc(wc.begin(), wc.end()), clse_c(clse.begin(), clse.end()), lse_c(lse.begin(), lse.end());
  // same lse values on both sides so that the grad passes are compared alone
  SoftmaxTerm crow{cwr.data(), lse_c.data(), tp}, ccol = col_term ? SoftmaxTerm{cwc.data(), clse_c.data(), nullptr} : SoftmaxTerm{};
  std::vector<cpu_t> rgx(N * D), rgt(M * D);
  contrastive_grad_pass_cpu(ck, p2, su.data(), tpk.data(), tu.data(), crow, ccol, sn.data(), normalize, rgx.data(), serial);
  contrastive_grad_pass_cpu(ck, cp2, tu.data(), sp.data(), su.data(), ccol, crow, tn.data(), normalize, rgt.data(), serial);
  auto V = [](const auto& v) { std::vector<double> o; for (auto x : v) o.push_back(to_d(x)); return o; };
  const double tol = half ? 2e-2 : (sizeof(T) == 8 ? 1e-12 : 2e-5);
  cmp("inv_norm", s_in, sn, 1e-12);
  cmp("lse", V(lse), V(rl), tol); cmp("expect", V(ex), V(re), tol * 10); cmp("target_logit", V(zt), V(rz), tol);
  if (col_term) { cmp("col lse", V(clse), V(rcl), tol); cmp("col expect", V(cex), V(rce), tol * 10); cmp("col target", V(czt), V(rcz), tol); }
  int mism = 0; for (int64_t i = 0; i < N; ++i) mism += am[i] != ram[i];
  printf("  argmax mismatches %d/%ld\n", mism, N); if (!half && mism) worst = 1e9;
  cmp("grad student", V(gx), V(rgx), tol * 5); cmp("grad teacher", V(gt), V(rgt), tol * 5);
}

int main() {
  run<float, float>(5, 7, 3, true, true, false, 1);
  run<float, float>(70, 100, 40, true, true, false, 2);
  run<float, float>(64, 64, 64, true, false, true, 3);
  run<float, float>(130, 130, 150, false, false, true, 4);
  run<float, float>(33, 200, 17, true, true, false, 5);
  run<double, double>(70, 100, 40, true, true, false, 6);
  run<double, double>(65, 65, 33, true, false, true, 7);
  run<__half, float>(70, 100, 40, true, true, false, 8);
  run<__nv_bfloat16, float>(64, 64, 50, true, false, true, 9);
  run<__half, float>(130, 200, 300, true, true, false, 10);
  run<__nv_bfloat16, float>(129, 129, 260, false, false, true, 11);
  run<float, float>(150, 150, 300, true, false, true, 12);
  run<double, double>(40, 70, 140, true, true, false, 13);
  printf("worst error / tolerance: %.3g -> %s\n", worst, worst <= 1 ? "PASS" : "FAIL");
  return worst <= 1 ? 0 : 1;
}
