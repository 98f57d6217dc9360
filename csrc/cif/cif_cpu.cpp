// CPU kernels of the CIF op (the math is in cif.h).
//
// Parallelisation: the scan runs one utterance per task; the forward splits the
// flattened (utterance, token) rows into chunks, the backward the flattened
// (utterance, frame) rows. Inner loops run over D on contiguous rows, written as
// plain loops with independent lanes so that the compiler vectorises them.
// float32 input accumulates in float32, float64 in float64 (half inputs are
// converted to float32 by the binding).
#include "cif.h"
#include "common/dispatch.h"

#include <cstring>
#include <stdexcept>

namespace cifops {
namespace {

// Dot product with independent partial sums, so that -O2/-O3 vectorises it
// without -ffast-math (the order is fixed, so the result is deterministic).
template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  constexpr int kLanes = 8;
  T part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += a[i + l] * b[i + l];
  T total = 0;
  for (; i < n; ++i) total += a[i] * b[i];
  for (int l = 0; l < kLanes; ++l) total += part[l];
  return total;
}

template <typename T>
void axpy(T w, const T* x, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

template <typename alpha_t>
void scan_impl(const CifParams& p, const ParallelFor& parallel_for) {
  const CifConfig& cfg = p.cfg;
  const int64_t T = cfg.frames;
  const auto* alphas = static_cast<const alpha_t*>(p.alphas);
  auto* alpha_sum = static_cast<alpha_t*>(p.alpha_sum);
  const CifWorkspace& ws = p.ws;
  parallel_for(cfg.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      CifRowInfo& info = ws.row_info[b];
      cif_scan_row(alphas + b * T, p.lengths ? p.lengths + b : nullptr,
                   p.target_lengths ? p.target_lengths + b : nullptr, cfg, ws.prefix + b * (T + 1),
                   ws.token_after + b * T, info, ws.row_real[b]);
      if (p.token_lengths)
        p.token_lengths[b] = cfg.max_tokens >= 0 ? cif_emitted(info, cfg.max_tokens) : info.total;
      if (alpha_sum) alpha_sum[b] = static_cast<alpha_t>(ws.row_real[b].alpha_sum);
    }
  });
}

template <typename scalar_t>
void forward_impl(const CifParams& p, const ParallelFor& parallel_for) {
  const CifConfig& cfg = p.cfg;
  const int64_t T = cfg.frames, D = cfg.dim, B = cfg.batch, n_out = p.n_out;
  const double beta = cfg.threshold;
  const CifWorkspace& ws = p.ws;
  const auto* hidden = static_cast<const scalar_t*>(p.hidden);
  auto* embeds = static_cast<scalar_t*>(p.embeds);
  // Rows of work: (b, k). Grain ~ 64 KiB of output per task.
  const int64_t grain = D > 0 ? (16384 + D - 1) / D : 1;
  parallel_for(B * n_out, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / n_out, k = row % n_out;
      const CifRowInfo& info = ws.row_info[b];
      const int64_t* token_after = ws.token_after + b * T;
      const double* P = ws.prefix + b * (T + 1);
      scalar_t* out = embeds + row * D;
      if (k >= cif_emitted(info, n_out)) {
        std::memset(out, 0, sizeof(scalar_t) * D);
        p.fire_frames[row] = -1;
        continue;
      }
      const int64_t first = k == 0 ? 0 : cif_fire_frame(token_after, info, k - 1);
      const int64_t last = cif_fire_frame(token_after, info, k);
      p.fire_frames[row] = last;
      // The tail's beta / r scale is applied to the float64 weights, so that a tiny
      // residual does not underflow to 0 * inf in float32.
      const double scale = k == info.complete ? ws.row_real[b].tail_scale : 1.0;
      std::memset(out, 0, sizeof(scalar_t) * D);
      for (int64_t t = first; t <= last; ++t) {
        const double w = cif_overlap(P[t], P[t + 1], k, beta) * scale;
        if (w > 0.0) axpy(static_cast<scalar_t>(w), hidden + (b * T + t) * D, out, D);
      }
    }
  });
}

template <typename scalar_t, typename alpha_t>
void backward_impl(const CifParams& p, const ParallelFor& parallel_for) {
  const CifConfig& cfg = p.cfg;
  const int64_t T = cfg.frames, D = cfg.dim, B = cfg.batch, n_out = p.n_out;
  const double beta = cfg.threshold;
  const CifWorkspace& ws = p.ws;
  const auto* grad_embeds = static_cast<const scalar_t*>(p.grad_embeds);
  const auto* hidden = static_cast<const scalar_t*>(p.hidden);
  auto* grad_hidden = static_cast<scalar_t*>(p.grad_hidden);
  const auto* alphas = static_cast<const alpha_t*>(p.alphas);
  const auto* grad_alpha_sum = static_cast<const alpha_t*>(p.grad_alpha_sum);
  auto* grad_alphas = static_cast<alpha_t*>(p.grad_alphas);
  double* dots = p.dots;
  // Pass 1, per frame: dh[t] and the two dot products D1[t], D0[t].
  const int64_t grain = D > 0 ? (16384 + D - 1) / D : 1;
  parallel_for(B * T, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / T, t = row % T;
      const CifRowInfo& info = ws.row_info[b];
      const double* P = ws.prefix + b * (T + 1);
      const int64_t* token_after = ws.token_after + b * T;
      scalar_t* dh = grad_hidden + row * D;
      std::memset(dh, 0, sizeof(scalar_t) * D);
      dots[2 * row] = 0.0;
      dots[2 * row + 1] = 0.0;
      const int64_t emitted = cif_emitted(info, n_out);
      if (t >= info.length || emitted == 0) continue;
      const int64_t k_in = t == 0 ? 0 : token_after[t - 1];
      const int64_t k_out = token_after[t];
      const int64_t k_last = k_out < emitted - 1 ? k_out : emitted - 1;
      const scalar_t* h = hidden + row * D;
      const double tail_scale = ws.row_real[b].tail_scale;
      for (int64_t k = k_in; k <= k_last; ++k) {
        const double ts = k == info.complete ? tail_scale : 1.0;
        const scalar_t* g = grad_embeds + (b * n_out + k) * D;
        const double w = cif_overlap(P[t], P[t + 1], k, beta) * ts;
        if (w > 0.0) axpy(static_cast<scalar_t>(w), g, dh, D);
        const bool need_d1 = k == k_out;          // dw[t][k_out]/dP[t+1] = 1
        const bool need_d0 = k == k_in && t > 0;  // right-hand: also at P[t] == k_in beta
        if (need_d1 || need_d0) {                 // inside a token both are the same product
          const double gh = ts * static_cast<double>(dot(g, h, D));
          if (need_d1) dots[2 * row] = gh;
          if (need_d0) dots[2 * row + 1] = gh;
        }
      }
    }
  });
  // Pass 2, per utterance: dP, the reverse prefix sum, the scaling.
  parallel_for(B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      cif_alpha_grad_row(alphas + b * T, grad_alpha_sum ? grad_alpha_sum + b : nullptr, cfg, n_out,
                         ws.prefix + b * (T + 1), ws.token_after + b * T, ws.row_info[b],
                         ws.row_real[b], dots + 2 * b * T, grad_alphas + b * T);
    }
  });
}

const ThrowUnsupported kUnsupportedAlphas{"cifops CPU kernels take float32/float64 alphas"};
const ThrowUnsupported kUnsupportedHidden{"cifops CPU kernels take float32/float64 hidden"};

}  // namespace

void cif_scan_cpu(const CifParams& params, const ParallelFor& parallel_for) {
  dispatch(
      CpuTypes{}, params.alpha_kind,
      [&](auto alpha_tag) { scan_impl<decltype(alpha_tag)>(params, parallel_for); },
      kUnsupportedAlphas);
}

void cif_forward_cpu(const CifParams& params, const ParallelFor& parallel_for) {
  dispatch(
      CpuTypes{}, params.hidden_kind,
      [&](auto hidden_tag) { forward_impl<decltype(hidden_tag)>(params, parallel_for); },
      kUnsupportedHidden);
}

void cif_backward_cpu(const CifParams& params, const ParallelFor& parallel_for) {
  dispatch(
      CpuTypes{}, params.hidden_kind,
      [&](auto hidden_tag) {
        dispatch(
            CpuTypes{}, params.alpha_kind,
            [&](auto alpha_tag) {
              backward_impl<decltype(hidden_tag), decltype(alpha_tag)>(params, parallel_for);
            },
            kUnsupportedAlphas);
      },
      kUnsupportedHidden);
}

}  // namespace cifops
