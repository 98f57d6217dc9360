// Runs the streaming CIF kernels of csrc/cif/cif_stream_cuda.cu on the CPU under the
// emulation of tests/native/cuda_emulation/emu_cuda.h (one fiber per CUDA thread) and
// compares them with the CPU kernels of csrc/cif/cif_stream_cpu.cpp, case by case:
//   scan   prefix sums, fire counts, per-utterance info, the new state and token_lengths
//          bit-identical (memcmp);
//   embed  fire_frames identical, embeds and the new partial sums within float rounding
//          (the .cu is compiled with FMA contraction, as nvcc does).
// Outputs are poisoned before each launch (an element a kernel forgets shows up), and the
// grid cap is lowered in some cases so that the grid-stride loops run. States are random
// but consistent (tokens = the fires of prefix), chunks mix dyadic, continuous, zero and
// multi-fire weights, and N is sometimes below the tokens a chunk completes (dropped).
// Some cases give some utterances an invalid chunk (a negative, NaN, infinite or huge
// alpha, a length outside [0, Tc]): both kernels must reject it alike, with no tokens and
// the state as it was.
// Built and run by run.sh; usage: emulate_cif_stream_cuda [case-id ...]
#include "cif/cif.h"
#include "emu_cuda.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace cifops;

namespace {

struct Spec {
  int id;
  int64_t B, T, D, N;
  double beta;
  bool f64, use_len;
  int64_t grid_cap;
  unsigned seed;
  int bad_every = 0;  // > 0: about one utterance in bad_every gets an invalid chunk
};

std::vector<Spec> make_cases() {
  std::vector<Spec> cases = {
      {0, 1, 16, 512, 16, 1.0, false, true, 0, 1},  {1, 32, 16, 512, 16, 1.0, false, true, 0, 2},
      {2, 3, 1, 7, 4, 0.5, true, true, 0, 3},       {3, 2, 0, 5, 2, 1.0, false, false, 0, 4},
      {4, 5, 20, 33, 1, 0.3, false, true, 2, 5},    {5, 4, 9, 130, 0, 1.0, true, false, 3, 6},
      {6, 0, 4, 3, 2, 1.0, false, true, 0, 7},      {7, 6, 12, 1, 40, 2.0, true, true, 1, 8},
      {8, 16, 10, 9, 4, 1.0, false, true, 0, 9, 1}, {9, 16, 10, 9, 4, 0.5, true, true, 2, 10, 1},
  };
  std::mt19937 rng(1234);
  for (int i = 0; i < 24; ++i) {
    std::uniform_int_distribution<int> b(1, 9), t(0, 24), d(1, 300), n(0, 12), bit(0, 1);
    const double betas[] = {1.0, 0.5, 0.75, 2.0, 0.3};
    cases.push_back({10 + i, b(rng), t(rng), d(rng), n(rng), betas[rng() % 5], bit(rng) == 1,
                     bit(rng) == 1, int64_t(rng() % 4), unsigned(rng()), 4});
  }
  return cases;
}

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

template <typename T>
void poison(std::vector<T>& v) {
  if (!v.empty()) std::memset(v.data(), 0xA5, v.size() * sizeof(T));
}

// The outputs of one run of both kernels.
template <typename acc_t>
struct Run {
  std::vector<double> prefix, new_prefix;
  std::vector<int64_t> after, info, new_tokens, new_frames, lengths_out, fire;
  std::vector<acc_t> partial, embeds;
};

template <typename acc_t>
bool run_case(const Spec& s) {
  const ScalarKind kind =
      std::is_same_v<acc_t, double> ? ScalarKind::kFloat64 : ScalarKind::kFloat32;
  std::mt19937 rng(s.seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const int64_t B = s.B, T = s.T, D = s.D, N = s.N;
  std::vector<acc_t> alphas(B * T), hidden(B * T * D), partial0(B * D);
  const double dyadic[] = {0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 3.5};
  for (auto& a : alphas) {
    const double r = u(rng);
    a = acc_t(r < 0.4 ? dyadic[rng() % 7] : r < 0.9 ? u(rng) * 1.2 : r < 0.97 ? 0.0 : 3.7);
  }
  for (auto& h : hidden) h = acc_t(u(rng) * 2 - 1);
  for (auto& p : partial0) p = acc_t(u(rng) * 2 - 1);
  std::vector<double> prefix0(B);
  std::vector<int64_t> tokens0(B), frames0(B), lengths(B);
  for (int64_t b = 0; b < B; ++b) {
    prefix0[b] = u(rng) < 0.3
                     ? 0.0
                     : std::floor(u(rng) * 50) * s.beta + (u(rng) < 0.5 ? 0.0 : u(rng) * s.beta);
    tokens0[b] = cif_settle_fires(prefix0[b], 0, s.beta);
    frames0[b] = int64_t(u(rng) * 1000);
    lengths[b] = int64_t(u(rng) * (T + 1));
    // an invalid chunk now and then: the kernels must reject it alike and keep the state
    if (s.bad_every > 0 && rng() % s.bad_every == 0) {
      const int64_t t = T > 0 ? int64_t(rng() % T) : 0;
      switch (rng() % 5) {
        case 0:
          if (T > 0) alphas[b * T + t] = acc_t(-0.25);
          break;
        case 1:
          if (T > 0) alphas[b * T + t] = acc_t(std::nan(""));
          break;
        case 2:
          if (T > 0) alphas[b * T + t] = acc_t(INFINITY);
          break;
        case 3:
          lengths[b] = rng() % 2 ? T + 1 : -1;
          break;
        default:
          if (T > 0) alphas[b * T + t] = acc_t(1e30);
          break;  // past 2^53 thresholds
      }
    }
  }
  CifStreamConfig cfg;
  cfg.batch = B;
  cfg.frames = T;
  cfg.dim = D;
  cfg.n_out = N;
  cfg.threshold = s.beta;
  auto run = [&](bool gpu) {
    Run<acc_t> r;
    r.prefix.resize(B * (T + 1));
    r.after.resize(B * T);
    r.info.resize(B * kStreamInfo);
    r.new_prefix.resize(B);
    r.new_tokens.resize(B);
    r.new_frames.resize(B);
    r.lengths_out.resize(B);
    r.fire.resize(B * N);
    r.embeds.resize(B * N * D);
    poison(r.prefix);
    poison(r.after);
    poison(r.info);
    poison(r.new_prefix);
    poison(r.new_tokens);
    poison(r.new_frames);
    poison(r.lengths_out);
    poison(r.fire);
    poison(r.embeds);
    r.partial = partial0;
    CifStreamState st{prefix0.data(),      tokens0.data(),      frames0.data(),
                      r.new_prefix.data(), r.new_tokens.data(), r.new_frames.data(),
                      r.partial.data()};
    CifStreamWorkspace ws{r.prefix.data(), r.after.data(),
                          reinterpret_cast<CifStreamRowInfo*>(r.info.data())};
    CifStreamParams p;
    p.cfg = cfg;
    p.st = st;
    p.ws = ws;
    p.alpha_kind = p.hidden_kind = kind;
    p.alphas = alphas.data();
    p.lengths = s.use_len ? lengths.data() : nullptr;
    p.token_lengths = r.lengths_out.data();
    p.hidden = hidden.data();
    p.embeds = r.embeds.data();
    p.fire_frames = r.fire.data();
    if (gpu) {
      g_emu_grid_cap = s.grid_cap;
      if (cif_stream_scan_cuda(p, nullptr) || cif_stream_embed_cuda(p, nullptr))
        emu_fail("a launcher returned an error");
      g_emu_grid_cap = 0;
    } else {
      const ParallelFor serial = [](int64_t n, int64_t,
                                    const std::function<void(int64_t, int64_t)>& f) {
        if (n > 0) f(0, n);
      };
      cif_stream_scan_cpu(p, serial);
      cif_stream_embed_cpu(p, serial);
    }
    return r;
  };
  const Run<acc_t> cpu = run(false), gpu = run(true);
  std::vector<std::string> fails;
  if (!same_bits(cpu.prefix, gpu.prefix)) fails.push_back("prefix sums");
  if (!same_bits(cpu.after, gpu.after)) fails.push_back("token_after");
  if (!same_bits(cpu.info, gpu.info)) fails.push_back("info");
  if (!same_bits(cpu.new_prefix, gpu.new_prefix)) fails.push_back("new prefix");
  if (!same_bits(cpu.new_tokens, gpu.new_tokens)) fails.push_back("new tokens");
  if (!same_bits(cpu.new_frames, gpu.new_frames)) fails.push_back("new frames");
  if (!same_bits(cpu.lengths_out, gpu.lengths_out)) fails.push_back("token_lengths");
  if (!same_bits(cpu.fire, gpu.fire)) fails.push_back("fire_frames");
  const double tol = std::is_same_v<acc_t, double> ? 1e-12 : 2e-5;
  auto close = [&](const std::vector<acc_t>& a, const std::vector<acc_t>& b, const char* what) {
    for (size_t i = 0; i < a.size(); ++i)
      if (!(std::fabs(double(a[i]) - double(b[i])) <= tol * (1 + std::fabs(double(a[i]))))) {
        fails.push_back(std::string(what) + " at " + std::to_string(i) + ": " +
                        std::to_string(double(a[i])) + " vs " + std::to_string(double(b[i])));
        return;
      }
  };
  close(cpu.embeds, gpu.embeds, "embeds");
  close(cpu.partial, gpu.partial, "partial");
  int rejected = 0;  // a rejected chunk: no tokens, the state as it was
  for (int64_t b = 0; b < B; ++b) {
    if (reinterpret_cast<const CifStreamRowInfo*>(gpu.info.data())[b].status == kCifOk) continue;
    ++rejected;
    bool kept = gpu.new_prefix[b] == prefix0[b] && gpu.new_tokens[b] == tokens0[b] &&
                gpu.new_frames[b] == frames0[b] && gpu.lengths_out[b] == 0;
    for (int64_t d = 0; d < D; ++d) kept &= gpu.partial[b * D + d] == partial0[b * D + d];
    for (int64_t j = 0; j < N; ++j) kept &= gpu.fire[b * N + j] == -1;
    if (!kept)
      fails.push_back("utterance " + std::to_string(b) + ": rejected but its state changed");
  }
  std::printf("case %d: B=%lld Tc=%lld D=%lld N=%lld beta=%g %s%s grid_cap=%lld rejected=%d: %s\n",
              s.id, (long long)B, (long long)T, (long long)D, (long long)N, s.beta,
              s.f64 ? "f64" : "f32", s.use_len ? " lengths" : "", (long long)s.grid_cap, rejected,
              fails.empty() ? "ok" : "FAIL");
  for (const auto& f : fails) std::printf("    FAIL %s\n", f.c_str());
  return fails.empty();
}

}  // namespace

int main(int argc, char** argv) {
  int failed = 0, run = 0;
  for (const Spec& s : make_cases()) {
    bool wanted = argc == 1;
    for (int i = 1; i < argc; ++i) wanted |= std::atoi(argv[i]) == s.id;
    if (!wanted) continue;
    ++run;
    if (!(s.f64 ? run_case<double>(s) : run_case<float>(s))) ++failed;
  }
  std::printf("%d cases, %d failed -> %s\n", run, failed, failed ? "FAIL" : "PASS");
  return failed ? 1 : 0;
}
