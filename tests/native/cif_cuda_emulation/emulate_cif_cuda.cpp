// Runs the CUDA kernels of csrc/cif/cif_cuda.cu on the CPU, under the emulation of
// tests/native/cuda_emulation/emu_cuda.h (one fiber per CUDA thread, one block at a
// time, its threads interleaved in a seeded random order, barriers and warp
// shuffles/ballots through per-group barriers that check call sites and exits), and
// compares every output with the CPU kernels of csrc/cif/cif_cpu.cpp, the reference
// implementation of the same contract (cif.h):
//   scan      prefix / token_after / row_info / row_real bit-identical (memcmp), and the
//             scan's token_lengths and alpha_sum equal to the CPU forward's;
//   forward   fire_frames identical, embeds within float rounding;
//   backward  grad_hidden and grad_alphas within rounding (the CUDA alpha gradient sums
//             in another order), and two CUDA runs bitwise identical (determinism).
// The scan runs three times and the backward twice, the later runs with one warp held
// back at every __syncthreads until the others wait at the next one (a missing barrier
// shows up as a difference).
// Device buffers are 256-byte aligned like cudaMalloc, filled with a poison pattern
// before every launch (an output element a kernel forgets to write shows up), and
// surrounded by guard zones that must survive (no out-of-bounds write). Cases: a fixed
// list of corner cases and random ones from a fixed seed (see make_cases). It checks
// indexing, tiling, synchronisation, reductions and the bit-level agreement of the
// fire decisions; it says nothing about speed. Each case runs in a child process, so
// that a crash (an out-of-bounds access), an emulation error (a divergent barrier, a
// misaligned pack under UBSan) or a deadlock fails that case only. Built and run by
// run.sh; usage:
//   emulate_cif_cuda [case-id ...]      (no argument: every case)
#include "cif/cif.h"
#include "emu_cuda.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <sys/wait.h>
#include <unistd.h>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

using namespace cifops;

namespace {

// ---------------------------------------------------------------------------
// Buffers

constexpr size_t kGuard = 256;
constexpr unsigned char kGuardByte = 0xC3;
constexpr unsigned char kPoisonGpu = 0xA5;  // outputs before a CUDA launch
constexpr unsigned char kPoisonCpu = 0x5A;  // outputs before a CPU call

// A device allocation: 256-byte aligned base, then an optional offset of whole elements
// (a view that is not 16-byte aligned), guard zones on both sides.
template <typename T>
class DevBuf {
 public:
  explicit DevBuf(size_t n, size_t offset_elems = 0)
      : n_(n), off_(offset_elems * sizeof(T)), bytes_(2 * kGuard + off_ + n * sizeof(T)) {
    raw_ = static_cast<unsigned char*>(::operator new(bytes_, std::align_val_t(256)));
    std::memset(raw_, kGuardByte, bytes_);
  }
  ~DevBuf() { ::operator delete(raw_, std::align_val_t(256)); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  T* ptr() { return reinterpret_cast<T*>(raw_ + kGuard + off_); }
  const T* ptr() const { return reinterpret_cast<const T*>(raw_ + kGuard + off_); }
  size_t size() const { return n_; }
  void poison() { std::memset(raw_ + kGuard + off_, kPoisonGpu, n_ * sizeof(T)); }
  void upload(const std::vector<T>& v) {
    if (!v.empty()) std::memcpy(ptr(), v.data(), n_ * sizeof(T));
  }
  std::vector<T> download() const {
    std::vector<T> v(n_);
    if (n_) std::memcpy(v.data(), ptr(), n_ * sizeof(T));
    return v;
  }
  bool guards_ok() const {
    for (size_t i = 0; i < kGuard + off_; ++i)
      if (raw_[i] != kGuardByte) return false;
    for (size_t i = kGuard + off_ + n_ * sizeof(T); i < bytes_; ++i)
      if (raw_[i] != kGuardByte) return false;
    return true;
  }

 private:
  size_t n_, off_, bytes_;
  unsigned char* raw_;
};

template <typename T>
std::vector<T> poisoned(size_t n) {
  std::vector<T> v(n);
  if (n) std::memset(v.data(), kPoisonCpu, n * sizeof(T));
  return v;
}

// ---------------------------------------------------------------------------
// Types

template <typename T>
ScalarKind kind_of();
template <>
ScalarKind kind_of<float>() {
  return ScalarKind::kFloat32;
}
template <>
ScalarKind kind_of<double>() {
  return ScalarKind::kFloat64;
}
template <>
ScalarKind kind_of<__half>() {
  return ScalarKind::kFloat16;
}
template <>
ScalarKind kind_of<__nv_bfloat16>() {
  return ScalarKind::kBFloat16;
}
template <typename T>
T from_d(double x) {
  return static_cast<T>(x);
}
template <>
__half from_d<__half>(double x) {
  return __float2half(static_cast<float>(x));
}
template <>
__nv_bfloat16 from_d<__nv_bfloat16>(double x) {
  return __float2bfloat16(static_cast<float>(x));
}
template <typename T>
double to_d(T x) {
  return static_cast<double>(x);
}
template <>
double to_d<__half>(__half x) {
  return __half2float(x);
}
template <>
double to_d<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

const ParallelFor kSerial = [](int64_t n, int64_t, const std::function<void(int64_t, int64_t)>& f) {
  if (n > 0) f(0, n);
};

// ---------------------------------------------------------------------------
// Cases

enum Bad {
  kNoBad = 0,
  kNegative,
  kNaN,
  kInf,
  kLengthOver,
  kLengthNeg,
  kTargetNeg,
  kZeroSum,
  kTooMany,
  kNaNPastLength,
  kNumBad
};
const char* bad_name[] = {"-",     "neg-alpha", "nan-alpha",       "inf-alpha", "len>T",
                          "len<0", "target<0",  "zero-sum-target", "too-many",  "nan-past-len"};
enum AlphaMode { kRealistic = 0, kDyadic, kWide, kSparseBig, kTiny, kConst, kNumModes };
const char* mode_name[] = {"cif", "dyadic", "wide", "sparse-big", "tiny", "const"};

struct Spec {
  int id = 0;
  std::string note;
  int alpha_bytes = 8, hidden_kind = 3;  // hidden: 0 f16, 1 bf16, 2 f32, 3 f64
  int64_t B = 1, T = 1, D = 1;
  double beta = 1.0;
  int mode = kRealistic;
  double const_alpha = 0.25;   // kConst
  std::vector<double> alphas;  // explicit alphas [B][T] (overrides mode)
  bool use_len = false, use_tgt = false;
  int tail = 0;  // 0 none, 1 normalize, 2 keep
  double tail_thr = 0.0;
  int max_tok = 0;  // 0 none, 1 fewer than the largest count, 2 more, 3 zero
  bool grad_sum = false;
  unsigned offsets = 0;  // element offset: 1 hidden, 2 embeds, 4 grad_embeds, 8 grad_hidden
  int64_t grid_cap = 0;  // cap of the row kernels' grid (0: the kernels' own)
  int bad = kNoBad;
  uint64_t seed = 1;
};

struct Result {
  bool ok = true;
  std::string msg;
  double worst[3] = {0, 0, 0};  // embeds, grad_hidden, grad_alphas: err / tol
  void fail(const char* fmt, ...) __attribute__((format(printf, 2, 3))) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (ok || msg.size() < 4000) msg += std::string("    FAIL ") + buf + "\n";
    ok = false;
  }
};

template <typename T>
double as_double(T x) {
  if constexpr (std::is_integral_v<T>)
    return static_cast<double>(x);
  else
    return to_d(x);
}

// Exact comparison (bitwise), reporting the first differing element as [row][col].
template <typename T>
void same_bits(Result& r, const char* what, const T* got, const T* ref, size_t n, size_t width) {
  if (n == 0 || std::memcmp(got, ref, n * sizeof(T)) == 0) return;
  int shown = 0;
  size_t count = 0;
  std::string detail;
  for (size_t i = 0; i < n; ++i) {
    if (std::memcmp(got + i, ref + i, sizeof(T)) == 0) continue;
    ++count;
    if (shown++ < 3) {
      char buf[200];
      if constexpr (std::is_integral_v<T>)
        std::snprintf(buf, sizeof(buf), " [%zu][%zu] cuda %lld cpu %lld;", i / width, i % width,
                      (long long)got[i], (long long)ref[i]);
      else
        std::snprintf(buf, sizeof(buf), " [%zu][%zu] cuda %.17g cpu %.17g;", i / width, i % width,
                      as_double(got[i]), as_double(ref[i]));
      detail += buf;
    }
  }
  r.fail("%s differs in %zu of %zu elements:%s", what, count, n, detail.c_str());
}

// Rounding-level comparison, row by row: max |got - ref| over a row, relative to the
// row's error scale: the largest of |ref| and of `mag` over the row, where mag is what
// the result sums in absolute value (the same computation on |inputs|), so that a row
// that cancels to ~0 is judged by the size of its terms. Non-finite values must match.
template <typename G, typename R, typename M>
void close(Result& r, int slot, const char* what, const G* got, const R* ref, const M* mag,
           int64_t rows, int64_t width, double tol) {
  double worst = 0;
  int64_t worst_at = -1;
  for (int64_t row = 0; row < rows; ++row) {
    double err = 0, m = 0;
    for (int64_t j = 0; j < width; ++j) {
      const double g = as_double(got[row * width + j]), e = as_double(ref[row * width + j]);
      if (!std::isfinite(g) || !std::isfinite(e)) {
        if (!(std::isnan(g) && std::isnan(e)) && g != e) {
          r.fail("%s[%lld][%lld]: cuda %.17g cpu %.17g", what, (long long)row, (long long)j, g, e);
          r.worst[slot] = 1e300;
          return;
        }
        continue;
      }
      err = std::max(err, std::fabs(g - e));
      m = std::max({m, std::fabs(e), std::fabs(as_double(mag[row * width + j]))});
    }
    const double rel = err == 0 ? 0 : err / std::max(m, 1e-300);
    if (rel > worst) worst = rel, worst_at = row;
  }
  r.worst[slot] = std::max(r.worst[slot], worst / tol);
  if (worst > tol) {
    const int64_t row = worst_at;
    int64_t j_at = 0;
    double e_at = -1;
    for (int64_t j = 0; j < width; ++j) {
      const double e = std::fabs(as_double(got[row * width + j]) - as_double(ref[row * width + j]));
      if (e > e_at) e_at = e, j_at = j;
    }
    r.fail("%s: relative error %.3g > %.1g in row %lld (at [%lld]: cuda %.17g cpu %.17g)", what,
           worst, tol, (long long)row, (long long)j_at, as_double(got[row * width + j_at]),
           as_double(ref[row * width + j_at]));
  }
}

template <typename A, typename H>
Result run_case(const Spec& s) {
  // the CPU kernels take float32/float64 hidden: half inputs are compared in float32
  using C = std::conditional_t<std::is_same_v<H, double>, double, float>;
  Result res;
  std::mt19937_64 rng(s.seed);
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  std::normal_distribution<double> normal(0.0, 1.0);
  auto randint = [&](int64_t lo, int64_t hi) {  // inclusive
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  const int64_t B = s.B, T = s.T, D = s.D;

  // ---- inputs
  std::vector<double> a(B * T);
  if (!s.alphas.empty()) {
    a = s.alphas;
  } else {
    static const double dyadic[] = {0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.5};
    for (auto& x : a) {
      switch (s.mode) {
        case kRealistic:
          x = u01(rng) < 0.1 ? 0.0 : 0.6 * u01(rng);
          break;
        case kDyadic:
          x = dyadic[randint(0, 8)];
          break;
        case kWide:
          x = u01(rng) < 0.2 ? 0.0 : 2.5 * u01(rng);
          break;
        case kSparseBig:
          x = u01(rng) < 0.8 ? 0.0 : 7.3 * u01(rng);
          break;
        case kTiny:
          x = 2e-3 * u01(rng);
          break;
        default:
          x = s.const_alpha;
          break;
      }
    }
    if (B > 1 && s.mode != kConst && u01(rng) < 0.3) {  // an all-zero utterance
      const int64_t z = randint(0, B - 1);
      std::fill(a.begin() + z * T, a.begin() + (z + 1) * T, 0.0);
    }
  }
  std::vector<int64_t> len(B, T), tgt(B, 0);
  bool use_len = s.use_len, use_tgt = s.use_tgt;
  if (s.bad == kLengthOver || s.bad == kLengthNeg || s.bad == kNaNPastLength) use_len = true;
  if (s.bad == kTargetNeg || s.bad == kZeroSum) use_tgt = true;
  if (use_len)
    for (auto& l : len) {
      const double r = u01(rng);
      l = r < 0.15 ? 0 : r < 0.35 ? T : randint(0, T);
    }
  const int64_t bad_row = randint(0, B - 1);
  if (s.bad == kNaNPastLength && len[bad_row] == T) len[bad_row] = T > 0 ? randint(0, T - 1) : 0;
  if (s.bad == kZeroSum)
    for (int64_t t = 0; t < T; ++t) a[bad_row * T + t] = 0.0;
  std::vector<A> alphas(B * T);
  for (int64_t i = 0; i < B * T; ++i) alphas[i] = static_cast<A>(a[i]);
  if (use_tgt)
    for (int64_t b = 0; b < B; ++b) {
      double sum = 0;
      for (int64_t t = 0; t < std::min(std::max<int64_t>(len[b], 0), T); ++t)
        sum += static_cast<double>(alphas[b * T + t]);
      tgt[b] = sum > 0 ? randint(0, static_cast<int64_t>(sum / s.beta) + 3) : 0;
    }
  // inject the bad input into one utterance
  auto frame_in = [&](int64_t b) {  // a frame below the length (makes one if needed)
    if (T == 0) return int64_t(-1);
    if (len[b] <= 0) len[b] = randint(1, T);
    return randint(0, len[b] - 1);
  };
  switch (s.bad) {
    case kNegative: {
      int64_t t = frame_in(bad_row);
      if (t >= 0) alphas[bad_row * T + t] = A(-0.5);
      break;
    }
    case kNaN: {
      int64_t t = frame_in(bad_row);
      if (t >= 0) alphas[bad_row * T + t] = std::numeric_limits<A>::quiet_NaN();
      break;
    }
    case kInf: {
      int64_t t = frame_in(bad_row);
      if (t >= 0) alphas[bad_row * T + t] = std::numeric_limits<A>::infinity();
      break;
    }
    case kTooMany: {
      int64_t t = frame_in(bad_row);
      if (t >= 0) alphas[bad_row * T + t] = A(1e17);
      break;
    }
    case kLengthOver:
      len[bad_row] = T + randint(1, 5);
      break;
    case kLengthNeg:
      len[bad_row] = -randint(1, 5);
      break;
    case kTargetNeg:
      tgt[bad_row] = -randint(1, 3);
      break;
    case kZeroSum:
      tgt[bad_row] = randint(1, 4);
      break;
    case kNaNPastLength:
      if (len[bad_row] < T)
        alphas[bad_row * T + randint(len[bad_row], T - 1)] = std::numeric_limits<A>::quiet_NaN();
      break;
    default:
      break;
  }
  std::vector<H> hidden(B * T * D);
  std::vector<C> hidden_c(B * T * D);
  for (int64_t i = 0; i < B * T * D; ++i) {
    hidden[i] = from_d<H>(normal(rng));
    hidden_c[i] = static_cast<C>(to_d(hidden[i]));
  }

  CifConfig cfg;
  cfg.batch = B;
  cfg.frames = T;
  cfg.dim = D;
  cfg.threshold = s.beta;
  cfg.scale_eps = 1e-4;
  cfg.has_tail_threshold = s.tail != 0;
  cfg.tail_threshold = s.tail_thr;
  cfg.tail_normalize = s.tail != 2;
  const int64_t* len_p = use_len ? len.data() : nullptr;
  const int64_t* tgt_p = use_tgt ? tgt.data() : nullptr;
  const ScalarKind ak = kind_of<A>(), hk = kind_of<H>(), ck = kind_of<C>();

  // ---- CPU scan
  auto c_prefix = poisoned<double>(B * (T + 1));
  auto c_after = poisoned<int64_t>(B * T);
  auto c_info = poisoned<int64_t>(B * kRowInfo);
  auto c_real = poisoned<double>(B * kRowReal);
  auto c_tok = poisoned<int64_t>(B);
  auto c_asum = poisoned<A>(B);
  // the params of a scan over separately allocated workspace arrays (CPU or device)
  auto scan_params = [&](double* prefix, int64_t* after, int64_t* info, double* real,
                         ScalarKind hidden_kind, const void* a, const int64_t* l,
                         const int64_t* t) {
    CifParams p;
    p.cfg = cfg;
    p.ws.prefix = prefix;
    p.ws.token_after = after;
    p.ws.row_info = reinterpret_cast<CifRowInfo*>(info);
    p.ws.row_real = reinterpret_cast<CifRowReal*>(real);
    p.alpha_kind = ak;
    p.hidden_kind = hidden_kind;
    p.alphas = a;
    p.lengths = l;
    p.target_lengths = t;
    return p;
  };
  CifParams cp = scan_params(c_prefix.data(), c_after.data(), c_info.data(), c_real.data(), ck,
                             alphas.data(), len_p, tgt_p);
  cif_scan_cpu(cp, kSerial);
  int64_t max_total = 0;
  for (int64_t b = 0; b < B; ++b) max_total = std::max(max_total, cp.ws.row_info[b].total);
  switch (s.max_tok) {
    case 1:
      cfg.max_tokens = max_total / 2;
      break;
    case 2:
      cfg.max_tokens = max_total + randint(1, 3);
      break;
    case 3:
      cfg.max_tokens = 0;
      break;
    default:
      cfg.max_tokens = -1;
      break;
  }
  const int64_t N = cfg.max_tokens >= 0 ? cfg.max_tokens : max_total;
  // again with the width known: token_lengths and alpha_sum as the binding gets them
  cp.cfg = cfg;
  cp.n_out = N;
  cp.token_lengths = c_tok.data();
  cp.alpha_sum = c_asum.data();
  cif_scan_cpu(cp, kSerial);

  // ---- CUDA scan
  DevBuf<A> d_alphas(B * T);
  d_alphas.upload(alphas);
  DevBuf<int64_t> d_len(B), d_tgt(B);
  d_len.upload(len);
  d_tgt.upload(tgt);
  DevBuf<double> d_prefix(B * (T + 1)), d_real(B * kRowReal);
  DevBuf<int64_t> d_after(B * T), d_info(B * kRowInfo), d_tok(B);
  DevBuf<A> d_asum(B);
  CifParams gp =
      scan_params(d_prefix.ptr(), d_after.ptr(), d_info.ptr(), d_real.ptr(), hk, d_alphas.ptr(),
                  use_len ? d_len.ptr() : nullptr, use_tgt ? d_tgt.ptr() : nullptr);
  gp.n_out = N;
  gp.token_lengths = d_tok.ptr();
  gp.alpha_sum = d_asum.ptr();
  g_emu_grid_cap = s.grid_cap;
  // three scans: as they come, then with warp 0 (the scan's sequential thread), then the
  // last warp held back at every barrier; all three must agree bit for bit
  std::vector<double> scan_real_first;
  std::vector<int64_t> scan_int_first;
  for (int run = 0; run < 3; ++run) {
    d_prefix.poison();
    d_real.poison();
    d_after.poison();
    d_info.poison();
    d_tok.poison();
    d_asum.poison();
    g_emu_slow_warp = run == 0 ? -1 : run == 1 ? 0 : 7;
    if (int e = cif_scan_cuda(gp, nullptr)) res.fail("cif_scan_cuda returned %d", e);
    g_emu_slow_warp = -1;
    std::vector<double> sr = d_prefix.download(), rr = d_real.download();
    std::vector<int64_t> si = d_after.download(), ii = d_info.download(), tk = d_tok.download();
    sr.insert(sr.end(), rr.begin(), rr.end());
    si.insert(si.end(), ii.begin(), ii.end());
    si.insert(si.end(), tk.begin(), tk.end());
    if (run == 0) {
      scan_real_first = sr;
      scan_int_first = si;
    } else {
      same_bits(res,
                run == 1 ? "scan (float64 outputs) with warp 0 held back vs as it comes"
                         : "scan (float64 outputs) with warp 7 held back vs as it comes",
                sr.data(), scan_real_first.data(), sr.size(), sr.size());
      same_bits(res,
                run == 1 ? "scan (int64 outputs) with warp 0 held back vs as it comes"
                         : "scan (int64 outputs) with warp 7 held back vs as it comes",
                si.data(), scan_int_first.data(), si.size(), si.size());
    }
  }
  same_bits(res, "row_info", d_info.ptr(), c_info.data(), B * kRowInfo, kRowInfo);
  same_bits(res, "row_real", d_real.ptr(), c_real.data(), B * kRowReal, kRowReal);
  same_bits(res, "prefix", d_prefix.ptr(), c_prefix.data(), B * (T + 1), T + 1);
  same_bits(res, "token_after", d_after.ptr(), c_after.data(), B * T, std::max<int64_t>(T, 1));

  // ---- forward
  auto c_emb = poisoned<C>(B * N * D);
  auto c_fire = poisoned<int64_t>(B * N);
  cp.hidden = hidden_c.data();
  cp.embeds = c_emb.data();
  cp.fire_frames = c_fire.data();
  cif_forward_cpu(cp, kSerial);
  // error scale of the embeds: the same sums over |hidden|
  std::vector<C> hidden_abs(B * T * D);
  for (int64_t i = 0; i < B * T * D; ++i) hidden_abs[i] = std::fabs(hidden_c[i]);
  auto c_emb_abs = poisoned<C>(B * N * D);
  {
    auto fire = poisoned<int64_t>(B * N);
    CifParams q = cp;
    q.hidden = hidden_abs.data();
    q.embeds = c_emb_abs.data();
    q.fire_frames = fire.data();
    cif_forward_cpu(q, kSerial);
  }
  DevBuf<H> d_hidden(B * T * D, s.offsets & 1), d_emb(B * N * D, (s.offsets >> 1) & 1);
  DevBuf<int64_t> d_fire(B * N);
  d_hidden.upload(hidden);
  d_emb.poison();
  d_fire.poison();
  gp.hidden = d_hidden.ptr();
  gp.embeds = d_emb.ptr();
  gp.fire_frames = d_fire.ptr();
  if (int e = cif_forward_cuda(gp, nullptr)) res.fail("cif_forward_cuda returned %d", e);
  same_bits(res, "token_lengths", d_tok.ptr(), c_tok.data(), B, B);
  same_bits(res, "alpha_sum", d_asum.ptr(), c_asum.data(), B, B);
  same_bits(res, "fire_frames", d_fire.ptr(), c_fire.data(), B * N, std::max<int64_t>(N, 1));
  const bool half = !std::is_same_v<H, C>;
  const double tol_h = half ? 1e-2 : std::is_same_v<H, double> ? 1e-12 : 1e-5;
  close(res, 0, "embeds", d_emb.ptr(), c_emb.data(), c_emb_abs.data(), B * N, D, tol_h);

  // ---- backward
  std::vector<H> gemb(B * N * D);
  std::vector<C> gemb_c(B * N * D);
  for (int64_t i = 0; i < B * N * D; ++i) {
    gemb[i] = from_d<H>(normal(rng));
    gemb_c[i] = static_cast<C>(to_d(gemb[i]));
  }
  std::vector<A> gsum(B);
  for (auto& x : gsum) x = static_cast<A>(normal(rng));
  auto c_dots = poisoned<double>(B * T * 2);
  auto c_gh = poisoned<C>(B * T * D);
  auto c_ga = poisoned<A>(B * T);
  cp.grad_embeds = gemb_c.data();
  cp.grad_alpha_sum = s.grad_sum ? gsum.data() : nullptr;
  cp.dots = c_dots.data();
  cp.grad_hidden = c_gh.data();
  cp.grad_alphas = c_ga.data();
  cif_backward_cpu(cp, kSerial);
  // error scales: grad_hidden, the same sums over |grad_embeds|; grad_alphas, per
  // utterance s_b max_t max_k tscale(k) |g_k| . |h_t| over the products it sums
  std::vector<C> gemb_abs(B * N * D);
  for (int64_t i = 0; i < B * N * D; ++i) gemb_abs[i] = std::fabs(gemb_c[i]);
  auto c_gh_abs = poisoned<C>(B * T * D);
  {
    auto dots = poisoned<double>(B * T * 2);
    auto ga = poisoned<A>(B * T);
    CifParams q = cp;
    q.grad_embeds = gemb_abs.data();
    q.grad_alpha_sum = nullptr;
    q.hidden = hidden_abs.data();
    q.dots = dots.data();
    q.grad_hidden = c_gh_abs.data();
    q.grad_alphas = ga.data();
    cif_backward_cpu(q, kSerial);
  }
  std::vector<double> ga_mag(B * T, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    const CifRowInfo& info = cp.ws.row_info[b];
    const CifRowReal& real = cp.ws.row_real[b];
    const int64_t L = info.status == kCifOk ? info.length : 0;
    const int64_t emitted = cif_emitted(info, N);
    double m = 0;
    for (int64_t t = 0; t < L; ++t) {
      const int64_t k_in = t == 0 ? 0 : c_after[b * T + t - 1];
      const int64_t k_last = std::min(c_after[b * T + t], emitted - 1);
      for (int64_t k = k_in; k <= k_last; ++k) {
        double d = 0;
        for (int64_t j = 0; j < D; ++j)
          d += std::fabs(double(gemb_c[(b * N + k) * D + j]) *
                         double(hidden_c[(b * T + t) * D + j]));
        m = std::max(m, d * (k == info.complete ? real.tail_scale : 1.0));
      }
    }
    m *= info.scaled ? real.scale : 1.0;
    if (s.grad_sum) m = std::max(m, std::fabs(double(gsum[b])));
    for (int64_t t = 0; t < T; ++t) ga_mag[b * T + t] = m;
  }
  DevBuf<H> d_gemb(B * N * D, (s.offsets >> 2) & 1), d_gh(B * T * D, (s.offsets >> 3) & 1);
  DevBuf<A> d_gsum(B), d_ga(B * T);
  DevBuf<double> d_dots(B * T * 2);
  d_gemb.upload(gemb);
  d_gsum.upload(gsum);
  std::vector<H> gh_first;
  std::vector<A> ga_first;
  std::vector<double> dots_first;
  // twice: as it comes, then with the last warp held back at every barrier (it reads
  // the most of the other warps' shared partial sums); the two must agree bit for bit
  for (int run = 0; run < 2; ++run) {
    d_gh.poison();
    d_ga.poison();
    d_dots.poison();
    g_emu_slow_warp = run == 0 ? -1 : 7;
    gp.grad_embeds = d_gemb.ptr();
    gp.grad_alpha_sum = s.grad_sum ? d_gsum.ptr() : nullptr;
    gp.dots = d_dots.ptr();
    gp.grad_hidden = d_gh.ptr();
    gp.grad_alphas = d_ga.ptr();
    if (int e = cif_backward_cuda(gp, nullptr)) res.fail("cif_backward_cuda returned %d", e);
    g_emu_slow_warp = -1;
    if (run == 0) {
      gh_first = d_gh.download();
      ga_first = d_ga.download();
      dots_first = d_dots.download();
    }
  }
  same_bits(res, "grad_hidden run 2 vs run 1", d_gh.ptr(), gh_first.data(), B * T * D,
            std::max<int64_t>(D, 1));
  same_bits(res, "grad_alphas run 2 vs run 1", d_ga.ptr(), ga_first.data(), B * T,
            std::max<int64_t>(T, 1));
  same_bits(res, "dots run 2 vs run 1", d_dots.ptr(), dots_first.data(), B * T * 2, 2);
  close(res, 1, "grad_hidden", d_gh.ptr(), c_gh.data(), c_gh_abs.data(), B * T, D, tol_h);
  // float64 hidden and alphas: the summation order only (1e-10); float32 alphas are
  // rounded to float32 at the end; float32/half hidden give float32 dot products
  const double tol_a = half                       ? 1e-3
                       : std::is_same_v<H, float> ? 1e-4
                       : std::is_same_v<A, float> ? 1e-6
                                                  : 1e-10;
  close(res, 2, "grad_alphas", d_ga.ptr(), c_ga.data(), ga_mag.data(), B, T, tol_a);

  // ---- no write outside any buffer
  const bool guards = d_alphas.guards_ok() && d_len.guards_ok() && d_tgt.guards_ok() &&
                      d_prefix.guards_ok() && d_real.guards_ok() && d_after.guards_ok() &&
                      d_info.guards_ok() && d_tok.guards_ok() && d_asum.guards_ok() &&
                      d_hidden.guards_ok() && d_emb.guards_ok() && d_fire.guards_ok() &&
                      d_gemb.guards_ok() && d_gh.guards_ok() && d_gsum.guards_ok() &&
                      d_ga.guards_ok() && d_dots.guards_ok();
  if (!guards) res.fail("a kernel wrote outside its buffers (guard zone changed)");
  return res;
}

Result dispatch(const Spec& s) {
  const bool f64a = s.alpha_bytes == 8;
  switch (s.hidden_kind) {
    case 0:
      return f64a ? run_case<double, __half>(s) : run_case<float, __half>(s);
    case 1:
      return f64a ? run_case<double, __nv_bfloat16>(s) : run_case<float, __nv_bfloat16>(s);
    case 2:
      return f64a ? run_case<double, float>(s) : run_case<float, float>(s);
    default:
      return f64a ? run_case<double, double>(s) : run_case<float, double>(s);
  }
}

std::vector<Spec> make_cases() {
  std::vector<Spec> cases;
  auto add = [&](Spec s, const char* note) {
    s.id = static_cast<int>(cases.size());
    s.note = note;
    if (s.seed == 1) s.seed = 1000 + s.id;
    cases.push_back(s);
  };
  // ---- corner cases, chosen by hand
  {
    Spec s;
    s.B = 2;
    s.T = 0;
    s.D = 3;
    s.use_len = true;
    s.tail = 1;
    add(s, "T = 0");
  }
  {
    Spec s;
    s.B = 3;
    s.T = 1;
    s.D = 8;
    s.mode = kWide;
    s.tail = 1;
    s.tail_thr = 0.0;
    add(s, "T = 1");
  }
  {
    Spec s;
    s.B = 1;
    s.T = 64;
    s.D = 8;
    s.mode = kConst;
    s.const_alpha = 0.25;
    add(s, "64 frames of 0.25: a token fires on the last frame");
  }
  {
    Spec s;
    s.B = 2;
    s.T = 40;
    s.D = 3;
    s.mode = kDyadic;
    s.beta = 0.5;
    s.tail = 2;
    s.tail_thr = 0.0;
    s.grad_sum = true;
    add(s, "dyadic alphas on exact boundaries, keep tail");
  }
  {
    Spec s;
    s.alpha_bytes = 8;
    s.hidden_kind = 2;
    s.B = 1;
    s.T = 1;
    s.D = 1;
    s.alphas = {1.4601e-141};
    s.tail = 1;
    s.tail_thr = 0.0;
    add(s, "tiny residual tail, float32 hidden: beta / r = 7e140 overflows float32");
  }
  {
    Spec s;
    s.B = 2;
    s.T = 30;
    s.D = 1;
    s.mode = kWide;
    s.bad = kTooMany;
    add(s, "alphas integrating past 2^53 thresholds");
  }
  {
    Spec s;
    s.B = 1;
    s.T = 3000;
    s.D = 8;
    s.mode = kRealistic;
    s.use_tgt = true;
    s.tail = 1;
    s.tail_thr = 0.5;
    s.grid_cap = 2;
    s.grad_sum = true;
    add(s, "T = 3000 (three scan tiles), target scaling");
  }
  {
    Spec s;
    s.alpha_bytes = 4;
    s.hidden_kind = 2;
    s.B = 1;
    s.T = 1500;
    s.D = 3;
    s.mode = kTiny;
    s.beta = 0.3;
    s.tail = 2;
    s.tail_thr = 0.0;
    s.grid_cap = 3;
    add(s, "T = 1500, tokens hundreds of frames long");
  }
  {
    Spec s;
    s.alpha_bytes = 4;
    s.hidden_kind = 0;
    s.B = 2;
    s.T = 50;
    s.D = 64;
    s.mode = kWide;
    s.tail = 1;
    s.tail_thr = 0.25;
    s.use_len = true;
    add(s, "float16 hidden (8 x half packs)");
  }
  {
    Spec s;
    s.alpha_bytes = 8;
    s.hidden_kind = 1;
    s.B = 2;
    s.T = 45;
    s.D = 100;
    s.mode = kRealistic;
    s.use_tgt = true;
    s.grad_sum = true;
    add(s, "bfloat16 hidden, D = 100 (V = 1)");
  }
  {
    Spec s;
    s.B = 2;
    s.T = 30;
    s.D = 260;
    s.mode = kWide;
    s.tail = 1;
    s.offsets = 0;
    add(s, "D = 260: several passes over D per lane");
  }
  {
    Spec s;
    s.alpha_bytes = 4;
    s.hidden_kind = 2;
    s.B = 2;
    s.T = 60;
    s.D = 64;
    s.mode = kWide;
    s.offsets = 1 | 8;
    s.tail = 1;
    add(s, "hidden and grad_hidden views 4 bytes off 16-byte alignment");
  }
  {
    // The scan's 2^53 check across tiles (kScanTile = 1024 frames): an overflow on the
    // first frame of the second tile, one on the last frame of the second tile (the
    // tile's last prefix is what the block tests first), and a valid utterance beside
    // them; the prefix sums go on past an overflow (alpha_sum without target_lengths).
    Spec s;
    s.B = 3;
    s.T = 2100;
    s.D = 1;
    s.tail = 1;
    s.tail_thr = 0.5;
    s.alphas.assign(s.B * s.T, 0.3);
    s.alphas[0 * s.T + 1024] = 1e17;
    s.alphas[1 * s.T + 2047] = 1e17;
    add(s, "overflows past 2^53 thresholds at frames 1024 and 2047 (second scan tile)");
  }
  {
    Spec s;
    s.B = 1;
    s.T = 1024;
    s.D = 1;
    s.mode = kRealistic;
    s.use_tgt = true;
    s.tail = 1;
    add(s, "T = 1024: one scan tile exactly, target scaling (the tile is staged once)");
  }
  {
    Spec s;
    s.B = 2;
    s.T = 1025;
    s.D = 1;
    s.mode = kWide;
    s.use_tgt = true;
    s.grad_sum = true;
    add(s, "T = 1025: a second scan tile of one frame, target scaling");
  }
  // ---- random cases from a fixed seed
  std::mt19937_64 rng(20240611);
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  auto coin = [&](double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; };
  static const double thresholds[] = {1.0, 0.5, 0.75, 2.0, 0.3};
  static const int64_t dims[] = {1, 3, 8, 64, 100};
  for (int i = 0; i < 48; ++i) {
    Spec s;
    s.alpha_bytes = coin(0.5) ? 8 : 4;
    s.hidden_kind = coin(0.5) ? 3 : 2;
    s.B = coin(0.6) ? pick(1, 2) : pick(3, 5);
    s.T = pick(0, 100);
    if (coin(0.05)) s.T = pick(0, 1);
    if (coin(0.1)) s.B = 1, s.T = pick(101, 1100);  // the cost is B T warp rows: few long ones
    s.D = dims[pick(0, 4)];
    s.mode = static_cast<int>(pick(0, kNumModes - 2));
    s.beta = s.mode == kDyadic ? thresholds[pick(0, 3)] : thresholds[pick(0, 4)];
    s.use_len = coin(0.5);
    s.use_tgt = coin(0.35);
    s.tail = static_cast<int>(pick(0, 2));
    s.tail_thr = coin(0.3) ? 0.0 : std::uniform_real_distribution<double>(0, s.beta)(rng);
    s.max_tok = coin(0.6) ? 0 : static_cast<int>(pick(1, 3));
    s.grad_sum = coin(0.5);
    s.offsets = coin(0.15) ? static_cast<unsigned>(pick(1, 15)) : 0;
    s.bad = coin(0.3) ? static_cast<int>(pick(1, kNumBad - 1)) : kNoBad;
    if (s.B * s.T > 600)
      s.grid_cap = pick(1, 4);
    else if (coin(0.2))
      s.grid_cap = 1;
    add(s, "random");
  }
  return cases;
}

char g_crash_msg[200] = "";
extern "C" void on_crash(int sig) {
  const char* what = sig == SIGSEGV ? "SIGSEGV" : sig == SIGBUS ? "SIGBUS" : "SIGFPE";
  (void)!write(2, "CUDA EMULATION ERROR: ", 22);
  (void)!write(2, what, std::strlen(what));
  (void)!write(2, g_crash_msg, std::strlen(g_crash_msg));
  std::_Exit(5);
}

std::string describe(const Spec& s) {
  static const char* hk[] = {"f16", "bf16", "f32", "f64"};
  static const char* tails[] = {"-", "norm", "keep"};
  static const char* maxes[] = {"-", "fewer", "more", "0"};
  char buf[600];
  std::snprintf(buf, sizeof(buf),
                "case %2d %s alphas=%s hidden=%s B=%lld T=%lld D=%lld beta=%g mode=%s len=%d "
                "tgt=%d tail=%s(%.3g) max_tokens=%s gsum=%d offs=%u grid_cap=%lld bad=%s",
                s.id, s.note.c_str(), s.alpha_bytes == 8 ? "f64" : "f32", hk[s.hidden_kind],
                (long long)s.B, (long long)s.T, (long long)s.D, s.beta,
                s.alphas.empty() ? mode_name[s.mode] : "explicit", s.use_len, s.use_tgt,
                tails[s.tail], s.tail_thr, maxes[s.max_tok], s.grad_sum, s.offsets,
                (long long)s.grid_cap, bad_name[s.bad]);
  return buf;
}

// One case in a child process, so that a crash, an emulation error or a deadlock fails
// that case and the others still run. Returns whether it passed.
bool run_in_child(const Spec& s) {
  std::fflush(stdout);
  std::fflush(stderr);
  const auto t0 = std::chrono::steady_clock::now();
  const pid_t pid = fork();
  if (pid < 0) {
    std::perror("fork");
    std::exit(2);
  }
  if (pid == 0) {
    for (int sig : {SIGSEGV, SIGBUS, SIGFPE}) std::signal(sig, on_crash);
    std::snprintf(g_crash_msg, sizeof(g_crash_msg),
                  " in case %d: an out-of-bounds or misaligned access in a kernel (or in the "
                  "CPU reference fed by a wrong workspace)\n",
                  s.id);
    const Result r = dispatch(s);
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%s: %s [emb %.2g gh %.2g ga %.2g of tol] %.1fs\n%s", describe(s).c_str(),
                r.ok ? "ok" : "FAIL", r.worst[0], r.worst[1], r.worst[2], secs, r.msg.c_str());
    std::fflush(stdout);
    std::_Exit(r.ok ? 0 : 1);
  }
  constexpr double kTimeout = 300;  // seconds: a deadlocked emulation must not hang the test
  int status = 0;
  for (;;) {
    const pid_t done = waitpid(pid, &status, WNOHANG);
    if (done == pid) break;
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (secs > kTimeout) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      std::printf("%s: FAIL\n    FAIL no progress in %.0f s (a deadlock between barriers?)\n",
                  describe(s).c_str(), kTimeout);
      return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) <= 1) return WEXITSTATUS(status) == 0;
  if (WIFEXITED(status))
    std::printf("%s: FAIL\n    FAIL the emulation stopped (exit %d; message above)\n",
                describe(s).c_str(), WEXITSTATUS(status));
  else
    std::printf("%s: FAIL\n    FAIL killed by signal %d\n", describe(s).c_str(), WTERMSIG(status));
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<Spec> cases = make_cases();
  std::vector<int> only;
  for (int i = 1; i < argc; ++i) only.push_back(std::atoi(argv[i]));
  int failed = 0, run = 0;
  const auto t_all = std::chrono::steady_clock::now();
  for (const Spec& s : cases) {
    if (!only.empty() && std::find(only.begin(), only.end(), s.id) == only.end()) continue;
    ++run;
    if (!run_in_child(s)) ++failed;
    std::fflush(stdout);
  }
  const double total =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_all).count();
  std::printf("%d cases, %d failed, %.1fs -> %s\n", run, failed, total, failed ? "FAIL" : "PASS");
  return failed ? 1 : 0;
}
