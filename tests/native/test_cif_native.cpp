// Native test of the torch-free CIF CPU kernels, built by CMakeLists.txt and run
// by ctest under AddressSanitizer and UndefinedBehaviorSanitizer.
//
// The reference here is written independently of the kernels: for every token
// k it loops over every frame and takes the overlap of [P_t, P_t+1) with
// [k beta, (k+1) beta). The backward is checked with central finite differences
// of a random linear functional of the outputs.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cif/cif.h"

using namespace cifops;

namespace {

int failures = 0;
#define EXPECT(cond, ...)                                       \
  do {                                                          \
    if (!(cond)) {                                              \
      ++failures;                                               \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                        \
      std::fprintf(stderr, "\n");                               \
    }                                                           \
  } while (0)

const ParallelFor kSerial = [](int64_t n, int64_t, const std::function<void(int64_t, int64_t)>& f) {
  if (n > 0) f(0, n);
};

struct Case {
  int64_t B, T, D;
  std::vector<double> hidden, alphas;
  std::vector<int64_t> lengths, target;
  bool use_lengths = false, use_target = false;
  CifConfig cfg;
};

struct Result {
  int64_t n_out = 0;
  std::vector<double> embeds, alpha_sum;
  std::vector<int64_t> token_lengths, fire_frames;
};

// The workspace as the extension lays it out (cif_workspace over scan_real / scan_int).
struct Workspace {
  int64_t B, T;
  std::vector<double> real;
  std::vector<int64_t> ints;
  Workspace(int64_t B, int64_t T)
      : B(B), T(T), real(B * (T + 1) + B * kRowReal), ints(B * T + B * kRowInfo) {}
  CifWorkspace view() { return cif_workspace(real.data(), ints.data(), B, T); }
  const CifRowInfo& info(int64_t b) { return view().row_info[b]; }
};

// The params of a float64 scan of case c (forward and backward fields left null).
CifParams scan_params(const Case& c, const CifConfig& cfg, Workspace& ws) {
  CifParams p;
  p.cfg = cfg;
  p.ws = ws.view();
  p.alpha_kind = ScalarKind::kFloat64;
  p.hidden_kind = ScalarKind::kFloat64;
  p.alphas = c.alphas.data();
  p.lengths = c.use_lengths ? c.lengths.data() : nullptr;
  p.target_lengths = c.use_target ? c.target.data() : nullptr;
  return p;
}

Result run_forward(const Case& c) {
  Workspace ws(c.B, c.T);
  Result r;
  r.token_lengths.assign(c.B, -7);  // poison: every element must be written
  r.alpha_sum.assign(c.B, -7.0);
  CifParams p = scan_params(c, c.cfg, ws);
  p.token_lengths = r.token_lengths.data();
  p.alpha_sum = r.alpha_sum.data();
  cif_scan_cpu(p, kSerial);
  int64_t max_total = 0;
  for (int64_t b = 0; b < c.B; ++b) max_total = std::max(max_total, ws.info(b).total);
  r.n_out = c.cfg.max_tokens >= 0 ? c.cfg.max_tokens : max_total;
  r.embeds.assign(c.B * r.n_out * c.D, -7.0);
  r.fire_frames.assign(c.B * r.n_out, -7);
  p.n_out = r.n_out;
  p.hidden = c.hidden.data();
  p.embeds = r.embeds.data();
  p.fire_frames = r.fire_frames.data();
  cif_forward_cpu(p, kSerial);
  return r;
}

// The reference: literal overlaps, no fire-frame bookkeeping shared with the kernel.
Result reference(const Case& c, int64_t n_out) {
  const double beta = c.cfg.threshold;
  Result r;
  r.n_out = n_out;
  r.embeds.assign(c.B * n_out * c.D, 0.0);
  r.fire_frames.assign(c.B * n_out, -1);
  r.token_lengths.assign(c.B, 0);
  r.alpha_sum.assign(c.B, 0.0);
  for (int64_t b = 0; b < c.B; ++b) {
    const int64_t L = c.use_lengths ? c.lengths[b] : c.T;
    double sum = 0;
    for (int64_t t = 0; t < L; ++t) sum += c.alphas[b * c.T + t];
    r.alpha_sum[b] = sum;
    double scale = 1.0;
    if (c.use_target) scale = sum > 0 ? (beta * c.target[b] + c.cfg.scale_eps) / sum : 0.0;
    std::vector<double> P(L + 1, 0.0);
    for (int64_t t = 0; t < L; ++t) P[t + 1] = P[t] + c.alphas[b * c.T + t] * scale;
    int64_t n = 0;
    while ((n + 1) * beta <= P[L]) ++n;
    const double resid = P[L] - n * beta;
    const bool tail =
        c.cfg.has_tail_threshold && L > 0 && resid > 0 && resid >= c.cfg.tail_threshold;
    const int64_t total = n + (tail ? 1 : 0);
    r.token_lengths[b] = std::min(total, n_out);
    for (int64_t k = 0; k < std::min(total, n_out); ++k) {
      const double lo = k * beta, hi = k < n ? (k + 1) * beta : P[L];
      for (int64_t t = 0; t < L; ++t) {
        const double w = std::max(0.0, std::min(P[t + 1], hi) - std::max(P[t], lo));
        for (int64_t d = 0; d < c.D; ++d)
          r.embeds[(b * n_out + k) * c.D + d] += w * c.hidden[(b * c.T + t) * c.D + d];
        if (k < n && P[t] < hi && hi <= P[t + 1]) r.fire_frames[b * n_out + k] = t;
      }
      if (k == n) {
        r.fire_frames[b * n_out + k] = L - 1;
        if (c.cfg.tail_normalize)
          for (int64_t d = 0; d < c.D; ++d) r.embeds[(b * n_out + k) * c.D + d] *= beta / resid;
      }
    }
  }
  return r;
}

Case random_case(std::mt19937_64& rng, bool positive) {
  std::uniform_int_distribution<int64_t> small(1, 4), frames(1, 12), dims(1, 6);
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  const double dyadic[] = {0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.25};
  Case c;
  c.B = small(rng);
  c.T = frames(rng);
  c.D = dims(rng);
  c.hidden.resize(c.B * c.T * c.D);
  for (auto& x : c.hidden) x = 2 * uni(rng) - 1;
  c.alphas.resize(c.B * c.T);
  for (auto& a : c.alphas) {
    if (positive)
      a = 0.05 + 2.0 * uni(rng);
    else
      a = uni(rng) < 0.4 ? dyadic[rng() % 7] : 2.5 * uni(rng);
  }
  c.use_lengths = uni(rng) < 0.5;
  c.lengths.resize(c.B);
  for (auto& l : c.lengths)
    l = positive ? 1 + static_cast<int64_t>(rng() % c.T) : static_cast<int64_t>(rng() % (c.T + 1));
  c.cfg.batch = c.B;
  c.cfg.frames = c.T;
  c.cfg.dim = c.D;
  const double thresholds[] = {1.0, 0.5, 0.75, 2.0};
  c.cfg.threshold = thresholds[rng() % 4];
  c.cfg.has_tail_threshold = uni(rng) < 0.5;
  c.cfg.tail_threshold = 0.25 * static_cast<double>(rng() % 3);
  c.cfg.tail_normalize = uni(rng) < 0.5;
  c.cfg.max_tokens = uni(rng) < 0.3 ? static_cast<int64_t>(rng() % 5) : -1;
  c.use_target = uni(rng) < 0.3;
  c.target.resize(c.B);
  for (int64_t b = 0; b < c.B; ++b) {
    double sum = 0;
    const int64_t L = c.use_lengths ? c.lengths[b] : c.T;
    for (int64_t t = 0; t < L; ++t) sum += c.alphas[b * c.T + t];
    c.target[b] = sum > 0 ? static_cast<int64_t>(rng() % 5) : 0;
  }
  return c;
}

void check_forward(const Case& c, int iter) {
  const Result got = run_forward(c);
  const Result want = reference(c, got.n_out);
  for (int64_t b = 0; b < c.B; ++b) {
    EXPECT(got.token_lengths[b] == want.token_lengths[b], "case %d b=%ld: token_lengths %ld vs %ld",
           iter, (long)b, (long)got.token_lengths[b], (long)want.token_lengths[b]);
    EXPECT(std::fabs(got.alpha_sum[b] - want.alpha_sum[b]) < 1e-12, "case %d: alpha_sum", iter);
  }
  for (size_t i = 0; i < got.fire_frames.size(); ++i)
    EXPECT(got.fire_frames[i] == want.fire_frames[i], "case %d: fire_frames[%zu] %ld vs %ld", iter,
           i, (long)got.fire_frames[i], (long)want.fire_frames[i]);
  for (size_t i = 0; i < got.embeds.size(); ++i)
    EXPECT(std::fabs(got.embeds[i] - want.embeds[i]) < 1e-9, "case %d: embeds[%zu] %g vs %g", iter,
           i, got.embeds[i], want.embeds[i]);
}

// Loss = sum(u * embeds) + sum(v * alpha_sum), u and v fixed random weights.
double functional(const Case& c, int64_t n_out, const std::vector<double>& u,
                  const std::vector<double>& v) {
  Case cc = c;
  cc.cfg.max_tokens = n_out;
  const Result r = run_forward(cc);
  double loss = 0;
  for (size_t i = 0; i < r.embeds.size(); ++i) loss += u[i] * r.embeds[i];
  for (int64_t b = 0; b < c.B; ++b) loss += v[b] * r.alpha_sum[b];
  return loss;
}

void check_backward(const Case& c, std::mt19937_64& rng, int iter) {
  const Result fwd = run_forward(c);
  const int64_t n_out = fwd.n_out;
  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  std::vector<double> u(fwd.embeds.size()), v(c.B);
  for (auto& x : u) x = uni(rng);
  for (auto& x : v) x = uni(rng);
  Workspace ws(c.B, c.T);
  CifConfig cfg = c.cfg;
  cfg.max_tokens = n_out;
  CifParams p = scan_params(c, cfg, ws);
  cif_scan_cpu(p, kSerial);
  std::vector<double> dots(2 * c.B * c.T), grad_h(c.hidden.size(), -7.0),
      grad_a(c.alphas.size(), -7.0);
  p.n_out = n_out;
  p.grad_embeds = u.data();
  p.grad_alpha_sum = v.data();
  p.hidden = c.hidden.data();
  p.dots = dots.data();
  p.grad_hidden = grad_h.data();
  p.grad_alphas = grad_a.data();
  cif_backward_cpu(p, kSerial);
  const double eps = 1e-6;
  for (size_t i = 0; i < c.hidden.size(); ++i) {
    Case p = c, m = c;
    p.hidden[i] += eps;
    m.hidden[i] -= eps;
    const double fd = (functional(p, n_out, u, v) - functional(m, n_out, u, v)) / (2 * eps);
    EXPECT(std::fabs(fd - grad_h[i]) < 1e-5 * (1 + std::fabs(fd)),
           "case %d: grad_hidden[%zu] %g vs fd %g", iter, i, grad_h[i], fd);
  }
  for (size_t i = 0; i < c.alphas.size(); ++i) {
    Case p = c, m = c;
    p.alphas[i] += eps;
    m.alphas[i] -= eps;
    const double fd = (functional(p, n_out, u, v) - functional(m, n_out, u, v)) / (2 * eps);
    EXPECT(std::fabs(fd - grad_a[i]) < 1e-4 * (1 + std::fabs(fd)),
           "case %d: grad_alphas[%zu] %g vs fd %g", iter, i, grad_a[i], fd);
  }
}

void check_statuses() {
  Case c;
  c.B = 2;
  c.T = 3;
  c.D = 1;
  c.hidden.assign(6, 1.0);
  c.alphas = {0.5, -1.0, 0.5, 0.5, 0.5, NAN};
  c.cfg.batch = 2;
  c.cfg.frames = 3;
  c.cfg.dim = 1;
  Workspace ws(2, 3);
  cif_scan_cpu(scan_params(c, c.cfg, ws), kSerial);
  EXPECT(ws.info(0).status == kCifBadAlpha && ws.info(0).where == 1, "negative alpha status");
  EXPECT(ws.info(1).status == kCifBadAlpha && ws.info(1).where == 2, "NaN alpha status");
  c.use_lengths = true;
  c.lengths = {4, 1};
  cif_scan_cpu(scan_params(c, c.cfg, ws), kSerial);
  EXPECT(ws.info(0).status == kCifBadLength, "length > T status");
  EXPECT(ws.info(1).status == kCifOk, "length 1 hides the NaN");
  c.use_lengths = false;
  c.alphas = {0.0, 0.0, 0.0, 1e300, 1e300, 1.0};
  c.use_target = true;
  c.target = {2, 1};
  cif_scan_cpu(scan_params(c, c.cfg, ws), kSerial);
  EXPECT(ws.info(0).status == kCifZeroSumTarget, "zero-sum target status");
  c.use_target = false;
  cif_scan_cpu(scan_params(c, c.cfg, ws), kSerial);
  EXPECT(ws.info(1).status == kCifTooManyTokens, "too many tokens status");
}

}  // namespace

int main() {
  std::mt19937_64 rng(12345);
  for (int i = 0; i < 400; ++i) check_forward(random_case(rng, false), i);
  for (int i = 0; i < 60; ++i) {
    const Case c = random_case(rng, true);
    check_backward(c, rng, i);
  }
  check_statuses();
  if (failures) {
    std::fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  std::printf("cif native tests passed\n");
  return 0;
}
