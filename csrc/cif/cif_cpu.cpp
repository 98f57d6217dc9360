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
void scan_impl(const alpha_t* alphas, const int64_t* lengths, const int64_t* target,
               const CifConfig& cfg, CifWorkspace ws, const ParallelFor& parallel_for) {
  const int64_t T = cfg.frames;
  parallel_for(cfg.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      cif_scan_row(alphas + b * T, lengths ? lengths + b : nullptr, target ? target + b : nullptr,
                   cfg, ws.prefix + b * (T + 1), ws.token_after + b * T,
                   ws.row_info + b * kRowInfo, ws.row_real + b * kRowReal);
    }
  });
}

template <typename scalar_t, typename alpha_t>
void forward_impl(const scalar_t* hidden, const CifConfig& cfg, int64_t n_out, CifWorkspace ws,
                  scalar_t* embeds, int64_t* token_lengths, int64_t* fire_frames,
                  alpha_t* alpha_sum, const ParallelFor& parallel_for) {
  const int64_t T = cfg.frames, D = cfg.dim, B = cfg.batch;
  const double beta = cfg.threshold;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* info = ws.row_info + b * kRowInfo;
    token_lengths[b] = cif_emitted(info, n_out);
    alpha_sum[b] = static_cast<alpha_t>(ws.row_real[b * kRowReal + kRealAlphaSum]);
  }
  // Rows of work: (b, k). Grain ~ 64 KiB of output per task.
  const int64_t grain = D > 0 ? (16384 + D - 1) / D : 1;
  parallel_for(B * n_out, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / n_out, k = row % n_out;
      const int64_t* info = ws.row_info + b * kRowInfo;
      const int64_t* token_after = ws.token_after + b * T;
      const double* P = ws.prefix + b * (T + 1);
      scalar_t* out = embeds + row * D;
      if (k >= cif_emitted(info, n_out)) {
        std::memset(out, 0, sizeof(scalar_t) * D);
        fire_frames[row] = -1;
        continue;
      }
      const int64_t first = k == 0 ? 0 : cif_fire_frame(token_after, info, k - 1);
      const int64_t last = cif_fire_frame(token_after, info, k);
      fire_frames[row] = last;
      // The tail's beta / r scale is applied to the float64 weights, so that a tiny
      // residual does not underflow to 0 * inf in float32.
      const double scale =
          k == info[kInfoComplete] ? ws.row_real[b * kRowReal + kRealTailScale] : 1.0;
      std::memset(out, 0, sizeof(scalar_t) * D);
      for (int64_t t = first; t <= last; ++t) {
        const double w = cif_overlap(P[t], P[t + 1], k, beta) * scale;
        if (w > 0.0) axpy(static_cast<scalar_t>(w), hidden + (b * T + t) * D, out, D);
      }
    }
  });
}

template <typename scalar_t, typename alpha_t>
void backward_impl(const scalar_t* grad_embeds, const alpha_t* grad_alpha_sum,
                   const scalar_t* hidden, const alpha_t* alphas, const CifConfig& cfg,
                   int64_t n_out, CifWorkspace ws, double* dots, scalar_t* grad_hidden,
                   alpha_t* grad_alphas, const ParallelFor& parallel_for) {
  const int64_t T = cfg.frames, D = cfg.dim, B = cfg.batch;
  const double beta = cfg.threshold;
  // Pass 1, per frame: dh[t] and the two dot products D1[t], D0[t].
  const int64_t grain = D > 0 ? (16384 + D - 1) / D : 1;
  parallel_for(B * T, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / T, t = row % T;
      const int64_t* info = ws.row_info + b * kRowInfo;
      const double* P = ws.prefix + b * (T + 1);
      const int64_t* token_after = ws.token_after + b * T;
      scalar_t* dh = grad_hidden + row * D;
      std::memset(dh, 0, sizeof(scalar_t) * D);
      dots[2 * row] = 0.0;
      dots[2 * row + 1] = 0.0;
      const int64_t emitted = cif_emitted(info, n_out);
      if (t >= info[kInfoLength] || emitted == 0) continue;
      const int64_t k_in = t == 0 ? 0 : token_after[t - 1];
      const int64_t k_out = token_after[t];
      const int64_t k_last = k_out < emitted - 1 ? k_out : emitted - 1;
      const scalar_t* h = hidden + row * D;
      const double tail_scale = ws.row_real[b * kRowReal + kRealTailScale];
      for (int64_t k = k_in; k <= k_last; ++k) {
        const double ts = k == info[kInfoComplete] ? tail_scale : 1.0;
        const scalar_t* g = grad_embeds + (b * n_out + k) * D;
        const double w = cif_overlap(P[t], P[t + 1], k, beta) * ts;
        if (w > 0.0) axpy(static_cast<scalar_t>(w), g, dh, D);
        const bool need_d1 = k == k_out;  // dw[t][k_out]/dP[t+1] = 1
        const bool need_d0 = k == k_in && t > 0;  // right-hand: also at P[t] == k_in beta
        if (need_d1 || need_d0) {  // inside a token both are the same product
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
      cif_alpha_grad_row(alphas + b * T, grad_alpha_sum ? grad_alpha_sum + b : nullptr, cfg,
                         n_out, ws.prefix + b * (T + 1), ws.token_after + b * T,
                         ws.row_info + b * kRowInfo, ws.row_real + b * kRowReal,
                         dots + 2 * b * T, grad_alphas + b * T);
    }
  });
}

const ThrowUnsupported kUnsupportedAlphas{"cifops CPU kernels take float32/float64 alphas"};
const ThrowUnsupported kUnsupportedHidden{"cifops CPU kernels take float32/float64 hidden"};

}  // namespace

void cif_scan_cpu(const void* alphas, ScalarKind alpha_kind, const int64_t* lengths,
                  const int64_t* target, const CifConfig& cfg, CifWorkspace ws,
                  const ParallelFor& parallel_for) {
  dispatch(CpuTypes{}, alpha_kind, [&](auto alpha_tag) {
    using alpha_t = decltype(alpha_tag);
    scan_impl(static_cast<const alpha_t*>(alphas), lengths, target, cfg, ws, parallel_for);
  }, kUnsupportedAlphas);
}

void cif_forward_cpu(const void* hidden, ScalarKind hidden_kind, const CifConfig& cfg,
                     int64_t n_out, CifWorkspace ws, void* embeds, int64_t* token_lengths,
                     int64_t* fire_frames, void* alpha_sum, ScalarKind alpha_kind,
                     const ParallelFor& parallel_for) {
  dispatch(CpuTypes{}, hidden_kind, [&](auto hidden_tag) {
    using scalar_t = decltype(hidden_tag);
    dispatch(CpuTypes{}, alpha_kind, [&](auto alpha_tag) {
      using alpha_t = decltype(alpha_tag);
      forward_impl(static_cast<const scalar_t*>(hidden), cfg, n_out, ws,
                   static_cast<scalar_t*>(embeds), token_lengths, fire_frames,
                   static_cast<alpha_t*>(alpha_sum), parallel_for);
    }, kUnsupportedAlphas);
  }, kUnsupportedHidden);
}

void cif_backward_cpu(const void* grad_embeds, const void* grad_alpha_sum, const void* hidden,
                      ScalarKind hidden_kind, const void* alphas, ScalarKind alpha_kind,
                      const CifConfig& cfg, int64_t n_out, CifWorkspace ws, double* dots,
                      void* grad_hidden, void* grad_alphas, const ParallelFor& parallel_for) {
  dispatch(CpuTypes{}, hidden_kind, [&](auto hidden_tag) {
    using scalar_t = decltype(hidden_tag);
    dispatch(CpuTypes{}, alpha_kind, [&](auto alpha_tag) {
      using alpha_t = decltype(alpha_tag);
      backward_impl(static_cast<const scalar_t*>(grad_embeds),
                    static_cast<const alpha_t*>(grad_alpha_sum),
                    static_cast<const scalar_t*>(hidden), static_cast<const alpha_t*>(alphas),
                    cfg, n_out, ws, dots, static_cast<scalar_t*>(grad_hidden),
                    static_cast<alpha_t*>(grad_alphas), parallel_for);
    }, kUnsupportedAlphas);
  }, kUnsupportedHidden);
}

}  // namespace cifops
