// cifops CIF kernels: the contract, the shapes and the entry points.
// This header is free of torch headers so that the kernels build into a native
// sanitizer test (tests/native) as well as into the torch extension.
//
// ---------------------------------------------------------------------------
// The recursion (docs/cif-semantics.md; frames 0-based here)
//
//   inputs   hidden h      [B][T][D]
//            alphas a      [B][T]          a[b][t] >= 0, finite
//            lengths L     [B]             0 <= L_b <= T (frames t >= L_b ignored)
//            target_len    [B] (optional)  training-time scaling
//
//   S_b      = sum_{t < L_b} a[b][t]                         (float64, sequential)
//   s_b      = (beta * target_len_b + eps) / S_b  if target_len is given, else 1
//   P[b][0]  = 0,   P[b][t+1] = P[b][t] + s_b * a[b][t]      (float64, sequential)
//
//   frame t occupies [P[t], P[t+1]) of the weight axis, token k occupies
//   [k beta, (k+1) beta); the weight of frame t in token k is the overlap
//
//   w[t][k]  = max(0, min(P[t+1], (k+1) beta) - max(P[t], k beta))
//   c[k]     = sum_t w[t][k] * h[t]                          (accumulated in acc_t)
//
//   fires    token k fires at the frame t with P[t] < (k+1) beta <= P[t+1];
//            token_after[t] = #{k : (k+1) beta <= P[t+1]}   (tokens fired by frame t)
//   n_b      = token_after[L_b - 1]  complete tokens
//   r_b      = P[L_b] - n_b beta     residual; emitted as token n_b when
//            tail_threshold is set and r_b >= tail_threshold and r_b > 0,
//            scaled by beta / r_b in "normalize" mode; its fire frame is L_b - 1.
//   token k spans frames [fire[k-1], fire[k]] (fire[-1] = 0), so every frame of
//   token k is found from two fire frames, without a [T][N] alignment.
//
// Backward, with the fire decisions held fixed (g = dLoss/dc, E_b emitted tokens,
// tscale(k) = beta / r_b for a normalised tail token, else 1). At a tie (a prefix sum
// exactly on a boundary, or a zero-weight frame there) the partial derivatives are the
// right-hand ones, the side on which the >= fire decisions stay as taken: frame t
// belongs to tokens k_in(t)..k_out(t), dw[t][k_out]/dP[t+1] = 1 and
// dw[t][k_in]/dP[t] = -1 even where its overlap is zero (docs/cif-semantics.md):
//
//   dh[t]    = sum_{k = k_in(t)}^{k_out(t)} w[t][k] tscale(k) g[k]
//              k_in(t) = token_after[t-1] (0 for t = 0), k_out(t) = token_after[t]
//   D1[t]    = tscale(k_out) g[k_out] . h[t]            (dw[t][k_out]/dP[t+1] = 1)
//   D0[t]    = tscale(k_in) g[k_in] . h[t] for t > 0     (dw[t][k_in]/dP[t] = -1)
//                                                       (dw[t][k_in]/dP[t] = -1)
//   dP[t+1]  = D1[t] - D0[t+1]         (+ the tail term below at t + 1 = L_b)
//   tail     dP[L_b] -= (1 / r_b) sum_{t in tail} w[t][n_b] D1[t]
//   G[j]     = sum_{t >= j} dP[t+1]                     (reverse prefix sum)
//   da[j]    = s_b (G[j] - (1 / S_b) sum_i a[i] G[i])   with target_len, else G[j]
//              + dLoss/dS_b                             (the alpha_sum output)
//
// All of it is O(B T D) work and O(B T) scalar state, with no atomics.
// ---------------------------------------------------------------------------
#pragma once

#include <cstdint>

#include "common/types.h"  // ScalarKind, ParallelFor, CIFOPS_HD

namespace cifops {

// Per-utterance status written by the scan; the host turns it into an error
// message naming the argument and the offending index.
enum CifStatus : int64_t {
  kCifOk = 0,
  kCifBadAlpha = 1,        // negative, NaN or infinite alphas[b][t]
  kCifBadLength = 2,       // lengths[b] outside [0, T]
  kCifBadTarget = 3,       // target_lengths[b] < 0
  kCifZeroSumTarget = 4,   // target_lengths[b] > 0 but the weights sum to zero
  kCifTooManyTokens = 5,   // the integrated weight exceeds 2^53 thresholds
  kCifBadStreamState = 6,  // a stream state no step returns (where: CifStreamStateError)
};

struct CifConfig {
  int64_t batch = 0;        // B
  int64_t frames = 0;       // T
  int64_t dim = 0;          // D
  int64_t max_tokens = -1;  // N when given; -1: emit every token (host decides N)
  double threshold = 1.0;   // beta
  double scale_eps = 1e-4;  // eps of the target-length scaling
  bool has_tail_threshold = false;
  double tail_threshold = 0.0;
  bool tail_normalize = true;
};

// The scan's result for one utterance, read by the forward and the backward. The
// records live after the prefix sums and fire counts in the workspace tensors that the
// forward op returns and autograd saves (scan_int, scan_real: cif_host.h), so every
// field is one int64 or one double, in this order (cifops/_cif_math.py writes the same
// layout). The defaults are what an invalid utterance keeps.
struct CifRowInfo {
  int64_t total = 0;        // complete + tail tokens (before max_tokens)
  int64_t complete = 0;     // n_b
  int64_t has_tail = 0;     // 1 when the tail token is emitted
  int64_t length = 0;       // L_b (0 for an invalid utterance)
  int64_t status = kCifOk;  // CifStatus
  int64_t where = -1;       // the offending frame, or -1
  int64_t scaled = 0;       // 1 when target_lengths scaling is applied
};
struct CifRowReal {
  double scale = 1.0;       // s_b
  double tail_scale = 1.0;  // beta / r_b (normalised tail) or 1
  double alpha_sum = 0.0;   // S_b
  double residual = 0.0;    // r_b
};
constexpr int kRowInfo = static_cast<int>(sizeof(CifRowInfo) / sizeof(int64_t));
constexpr int kRowReal = static_cast<int>(sizeof(CifRowReal) / sizeof(double));
static_assert(sizeof(CifRowInfo) == kRowInfo * sizeof(int64_t), "CifRowInfo: int64 fields only");
static_assert(sizeof(CifRowReal) == kRowReal * sizeof(double), "CifRowReal: double fields only");

// Scratch state shared by the forward and the backward; all arrays are dense.
struct CifWorkspace {
  double* prefix = nullptr;        // [B][T+1]  P
  int64_t* token_after = nullptr;  // [B][T]    tokens fired by the end of frame t
  CifRowInfo* row_info = nullptr;  // [B]
  CifRowReal* row_real = nullptr;  // [B]
};

// The sizes of the dense storage cif_workspace lays out (the scan_real and scan_int
// tensors, cif_host.h): prefix [B][T+1] then B CifRowReal in `real`, token_after [B][T]
// then B CifRowInfo in `ints`. cifops._C.cif_workspace_size is this function (csrc/ops.cpp).
struct CifWorkspaceSize {
  int64_t prefix = 0, token_after = 0;  // where the records start: B (T + 1), B T
  int64_t real = 0, ints = 0;           // the whole storage: + B kRowReal, + B kRowInfo
};
inline CifWorkspaceSize cif_workspace_size(int64_t batch, int64_t frames) {
  CifWorkspaceSize size;
  size.prefix = batch * (frames + 1);
  size.token_after = batch * frames;
  size.real = size.prefix + batch * kRowReal;
  size.ints = size.token_after + batch * kRowInfo;
  return size;
}

// The workspace over that storage.
inline CifWorkspace cif_workspace(double* real, int64_t* ints, int64_t batch, int64_t frames) {
  const CifWorkspaceSize size = cif_workspace_size(batch, frames);
  CifWorkspace ws;
  ws.prefix = real;
  ws.row_real = reinterpret_cast<CifRowReal*>(real + size.prefix);
  ws.token_after = ints;
  ws.row_info = reinterpret_cast<CifRowInfo*>(ints + size.token_after);
  return ws;
}

// The arguments of the CIF entry points, filled by name (as FlashAttention's
// Flash_fwd_params); what a call does not read or write stays null. Host pointers for
// the CPU entry points, device pointers for the CUDA ones; every array is dense.
struct CifParams {
  CifConfig cfg;
  int64_t n_out = 0;  // N, the width of embeds (forward and backward)
  CifWorkspace ws;    // written by the scan, read by the forward and the backward
  ScalarKind hidden_kind = ScalarKind::kFloat32;  // hidden, embeds, grad_embeds, grad_hidden
  ScalarKind alpha_kind = ScalarKind::kFloat32;   // alphas, alpha_sum, grad_alpha_sum, grad_alphas

  // Scan: reads alphas, lengths and target_lengths (each of the two may be null: not
  // given); writes ws, and token_lengths (min(total, cfg.max_tokens), or total when
  // max_tokens is -1) and alpha_sum where they are not null.
  const void* alphas = nullptr;             // [B][T]
  const int64_t* lengths = nullptr;         // [B]
  const int64_t* target_lengths = nullptr;  // [B]
  int64_t* token_lengths = nullptr;         // [B]
  void* alpha_sum = nullptr;                // [B]

  // Forward, after the scan: embeds and fire_frames from hidden.
  const void* hidden = nullptr;    // [B][T][D]
  void* embeds = nullptr;          // [B][N][D]
  int64_t* fire_frames = nullptr;  // [B][N]

  // Backward, after the scan: reads grad_embeds, grad_alpha_sum (may be null), hidden
  // and alphas; writes grad_hidden and grad_alphas, with dots [B][T][2] as scratch.
  const void* grad_embeds = nullptr;     // [B][N][D]
  const void* grad_alpha_sum = nullptr;  // [B]
  double* dots = nullptr;                // [B][T][2]
  void* grad_hidden = nullptr;           // [B][T][D]
  void* grad_alphas = nullptr;           // [B][T]
};

// Boundary of token k: (k+1) * beta, computed the same way everywhere so that
// every backend makes the same fire decisions.
CIFOPS_HD double cif_boundary(int64_t k, double beta) { return static_cast<double>(k + 1) * beta; }

// Tokens fired once the prefix sum reaches p, given `fired` so far (p >= the boundary
// of token `fired`): jump over many fires at once (alpha >> beta), then settle exactly
// on the comparison that defines a fire.
CIFOPS_HD int64_t cif_settle_fires(double p, int64_t fired, double beta) {
  int64_t k = static_cast<int64_t>(p / beta);
  if (k < fired) k = fired;
  while (k > fired && cif_boundary(k - 1, beta) > p) --k;
  while (cif_boundary(k, beta) <= p) ++k;
  return k;
}

// Weight of frame t (interval [p0, p1)) in token k.
CIFOPS_HD double cif_overlap(double p0, double p1, int64_t k, double beta) {
  const double hi = p1 < cif_boundary(k, beta) ? p1 : cif_boundary(k, beta);
  const double lo = p0 > cif_boundary(k - 1, beta) ? p0 : cif_boundary(k - 1, beta);
  return hi > lo ? hi - lo : 0.0;
}

// The end of a valid utterance's scan: L frames integrated with `fired` complete
// tokens under the scale s_b, and the residual r_b = P[L] - fired beta (computed by the
// caller, with the product and the difference rounded separately: the CUDA scan uses
// intrinsics so that the device does not fuse them); the tail decision.
CIFOPS_HD void cif_row_finish(const CifConfig& cfg, int64_t L, int64_t fired, double scale,
                              double residual, CifRowInfo& info, CifRowReal& real) {
  info.length = L;
  real.scale = scale;
  real.residual = residual;
  info.complete = fired;
  info.total = fired;
  if (cfg.has_tail_threshold && L > 0 && residual > 0.0 && residual >= cfg.tail_threshold) {
    info.has_tail = 1;
    real.tail_scale = cfg.tail_normalize ? cfg.threshold / residual : 1.0;
    info.total += 1;
  }
}

// Tokens emitted for an utterance, given the output width N.
CIFOPS_HD int64_t cif_emitted(const CifRowInfo& info, int64_t n_out) {
  return info.total < n_out ? info.total : n_out;
}

// The sequential part of CIF for one utterance: validation, alpha sum, scaling,
// float64 prefix sums, fire counts and the tail decision. O(T); the CPU runs it one
// utterance per task, and the CUDA scan makes the same operations in the same order,
// so that the decisions are identical. alpha_t is float or double; a null `length` or
// `target` means "not given".
template <typename alpha_t>
CIFOPS_HD void cif_scan_row(const alpha_t* alphas, const int64_t* length_ptr,
                            const int64_t* target_ptr, const CifConfig& cfg, double* prefix,
                            int64_t* token_after, CifRowInfo& info, CifRowReal& real) {
  const int64_t T = cfg.frames;
  const double beta = cfg.threshold;
  info = CifRowInfo{};
  info.scaled = target_ptr ? 1 : 0;
  real = CifRowReal{};
  int64_t length = length_ptr ? *length_ptr : T;  // not given: all frames valid
  for (int64_t t = 0; t <= T; ++t) prefix[t] = 0.0;
  for (int64_t t = 0; t < T; ++t) token_after[t] = 0;
  if (length < 0 || length > T) {
    info.status = kCifBadLength;
    return;
  }
  if (target_ptr && *target_ptr < 0) {
    info.status = kCifBadTarget;
    return;
  }
  double sum = 0.0;
  for (int64_t t = 0; t < length; ++t) {
    const double a = static_cast<double>(alphas[t]);
    // !(a >= 0) catches NaN; a - a != 0 catches +inf.
    if (!(a >= 0.0) || a - a != 0.0) {
      info.status = kCifBadAlpha;
      info.where = t;
      return;
    }
    sum += a;
  }
  real.alpha_sum = sum;
  double scale = 1.0;
  if (target_ptr) {
    if (sum > 0.0) {
      scale = (beta * static_cast<double>(*target_ptr) + cfg.scale_eps) / sum;
    } else if (*target_ptr == 0) {
      scale = 0.0;  // nothing to integrate and nothing asked for
    } else {
      info.status = kCifZeroSumTarget;
      return;
    }
  }
  real.scale = scale;
  double p = 0.0;
  int64_t fired = 0;
  for (int64_t t = 0; t < length; ++t) {
    p += static_cast<double>(alphas[t]) * scale;
    prefix[t + 1] = p;
    if (cif_boundary(fired, beta) <= p) {
      if (p / beta >= 9007199254740992.0) {  // 2^53: token counts stop being exact
        info.status = kCifTooManyTokens;
        info.where = t;
        for (int64_t u = 0; u <= t; ++u) {  // an invalid utterance's workspace is all zero
          prefix[u + 1] = 0.0;
          token_after[u] = 0;
        }
        return;
      }
      fired = cif_settle_fires(p, fired, beta);
    }
    token_after[t] = fired;
  }
  for (int64_t t = length; t < T; ++t) {
    prefix[t + 1] = p;
    token_after[t] = fired;
  }
  cif_row_finish(cfg, length, fired, scale, p - static_cast<double>(fired) * beta, info, real);
}

// Fire frame of token k (k < total), by binary search on token_after.
CIFOPS_HD int64_t cif_fire_frame(const int64_t* token_after, const CifRowInfo& info, int64_t k) {
  if (k >= info.complete) return info.length - 1;  // the tail token
  // first t with token_after[t] > k
  int64_t lo = 0, hi = info.length - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (token_after[mid] > k)
      hi = mid;
    else
      lo = mid + 1;
  }
  return lo;
}

// The sequential half of the backward for one utterance: from the per-frame dot
// products dots[t] = {D1[t], D0[t]} to dLoss/dalpha (see the header comment).
// Overwrites dots[t][0] with G[t]. O(T), one thread per utterance.
template <typename alpha_t>
CIFOPS_HD void cif_alpha_grad_row(const alpha_t* alphas, const alpha_t* grad_alpha_sum,
                                  const CifConfig& cfg, int64_t n_out, const double* prefix,
                                  const int64_t* token_after, const CifRowInfo& info,
                                  const CifRowReal& real, double* dots, alpha_t* grad_alphas) {
  const double beta = cfg.threshold;
  const int64_t L = info.length;
  const int64_t n = info.complete;
  // Tail normalisation: c_tail = (beta / r) u, so dLoss/dr = -(1/r) g . c_tail,
  // and r = P[L] - n beta moves with P[L].
  double tail_term = 0.0;
  if (info.has_tail && cfg.tail_normalize && n < n_out) {
    const int64_t first = n == 0 ? 0 : cif_fire_frame(token_after, info, n - 1);
    for (int64_t t = first; t < L; ++t)
      tail_term += cif_overlap(prefix[t], prefix[t + 1], n, beta) * dots[2 * t];
    tail_term = -tail_term / real.residual;
  }
  // G[j] = sum_{t >= j} dP[t+1], and sum_j a[j] G[j] for the scaling.
  double running = 0.0, weighted = 0.0;
  for (int64_t t = L - 1; t >= 0; --t) {
    double dp = dots[2 * t] - (t + 1 < L ? dots[2 * (t + 1) + 1] : 0.0);
    if (t == L - 1) dp += tail_term;
    running += dp;
    dots[2 * t] = running;  // D1[t] is not read again
    weighted += static_cast<double>(alphas[t]) * running;
  }
  const double scale = real.scale;
  const double sum = real.alpha_sum;
  const double extra = grad_alpha_sum ? static_cast<double>(*grad_alpha_sum) : 0.0;
  for (int64_t t = 0; t < cfg.frames; ++t) {
    double g = 0.0;
    if (t < L) {
      const double G = dots[2 * t];
      if (!info.scaled)
        g = G;
      else if (sum > 0.0)
        g = scale * (G - weighted / sum);  // s_b = (beta tgt + eps) / S_b
      g += extra;                          // the alpha_sum output
    }
    grad_alphas[t] = static_cast<alpha_t>(g);
  }
}

// ----------------------------------------------------------------------------
// Streaming (cifops.cif_stream_step): the same recursion continued chunk by chunk.
//
// The state of an utterance after the frames seen so far is what the whole-input
// scan carries from one frame to the next: the float64 prefix sum P, the number of
// tokens fired, the number of frames consumed, and `partial`, the weighted sum of
// the open token's frames (accumulated in acc_t: float32, or float64 for float64).
// A chunk continues P with the same additions in the same order, so the fire
// decisions are those of cif_scan_row on the concatenated input, bit for bit, and
// each embedding is summed over the same frames in the same order as the CPU
// forward's. Tokens completed in the chunk are emitted; the tail is the flush's.

// Per-utterance results of a chunk's scan (an int64 [B][4] workspace tensor).
struct CifStreamRowInfo {
  int64_t length = 0;       // valid frames of the chunk (0 when rejected)
  int64_t status = kCifOk;  // CifStatus
  int64_t where = -1;       // offending frame of the chunk (a CifStreamStateError), or -1
  int64_t count = 0;        // tokens completed in the chunk (before max_tokens)
};
constexpr int kStreamInfo = static_cast<int>(sizeof(CifStreamRowInfo) / sizeof(int64_t));
static_assert(sizeof(CifStreamRowInfo) == kStreamInfo * sizeof(int64_t),
              "CifStreamRowInfo: int64 fields only");

// Why a stream state is one that no step returns (CifStreamRowInfo::where with
// kCifBadStreamState); the checks in this order, the first that fails.
enum CifStreamStateError : int64_t {
  kStateOk = 0,
  kStateNegativeFrames = 1,  // frames < 0
  kStateNegativeTokens = 2,  // tokens < 0
  kStateBadPrefix = 3,       // prefix negative, NaN or infinite
  kStatePrefixNoFrames = 4,  // prefix != 0 but no frame seen (frames == 0)
  kStateTokensDisagree = 5,  // tokens != the number of boundaries (k+1) beta <= prefix
};

// A step leaves frames >= 0, a finite prefix >= 0 (0 while frames == 0) and tokens =
// #{k : cif_boundary(k) <= prefix} (>= firing: the count cif_settle_fires settles on);
// anything else was edited, recycled or made at another threshold. O(1).
CIFOPS_HD int64_t cif_stream_check_state(double prefix, int64_t tokens, int64_t frames,
                                         double beta) {
  if (frames < 0) return kStateNegativeFrames;
  if (tokens < 0) return kStateNegativeTokens;
  if (!(prefix >= 0.0) || prefix - prefix != 0.0) return kStateBadPrefix;
  if (frames == 0 && prefix != 0.0) return kStatePrefixNoFrames;
  if ((tokens > 0 && cif_boundary(tokens - 1, beta) > prefix) ||
      cif_boundary(tokens, beta) <= prefix)
    return kStateTokensDisagree;
  return kStateOk;
}

struct CifStreamConfig {
  int64_t batch = 0;       // B
  int64_t frames = 0;      // Tc, frames of the chunk
  int64_t dim = 0;         // D
  int64_t n_out = 0;       // N, tokens emitted per utterance at most
  double threshold = 1.0;  // beta
};

// Scratch of a chunk: prefix [B][Tc+1], token_after [B][Tc], info [B].
struct CifStreamWorkspace {
  double* prefix = nullptr;
  int64_t* token_after = nullptr;
  CifStreamRowInfo* info = nullptr;
};

// The state in and out (new_partial holds the old partial on entry, in acc_t).
struct CifStreamState {
  const double* prefix = nullptr;   // [B]
  const int64_t* tokens = nullptr;  // [B]
  const int64_t* frames = nullptr;  // [B]
  double* new_prefix = nullptr;     // [B]
  int64_t* new_tokens = nullptr;    // [B]
  int64_t* new_frames = nullptr;    // [B]
  void* new_partial = nullptr;      // [B][D], acc_t
};

// The arguments of the streaming entry points, filled by name (as CifParams); host
// pointers for the CPU, device pointers for CUDA; every array is dense.
struct CifStreamParams {
  CifStreamConfig cfg;
  CifStreamState st;      // the state in; the scan writes its new_* fields, the embedding
                          // pass updates new_partial
  CifStreamWorkspace ws;  // written by the scan, read by the embedding pass

  // Scan: reads alphas and lengths (null: every frame valid); writes token_lengths.
  ScalarKind alpha_kind = ScalarKind::kFloat32;  // float32 or float64
  const void* alphas = nullptr;                  // [B][Tc]
  const int64_t* lengths = nullptr;              // [B]
  int64_t* token_lengths = nullptr;              // [B]

  // Embedding pass, after the scan: embeds and fire_frames from hidden, in the compute
  // dtype (float32 or float64: hidden_kind, which is also new_partial's).
  ScalarKind hidden_kind = ScalarKind::kFloat32;
  const void* hidden = nullptr;    // [B][Tc][D]
  void* embeds = nullptr;          // [B][N][D]
  int64_t* fire_frames = nullptr;  // [B][N]
};

// The chunk's part of the state update for utterance b, O(Tc), one thread per
// utterance: validation, the prefix sums ws.prefix[b][0..Tc] continuing from the state's
// prefix (ws.prefix[b][0] = st.prefix[b]), the absolute fire counts ws.token_after[b][t],
// the new prefix, tokens and frames, and the emitted count token_lengths[b]. A chunk with
// a bad state, length or alpha leaves the state as it was and emits nothing; its status
// (ws.info[b]) says why.
template <typename alpha_t>
CIFOPS_HD void cif_stream_scan_row(const CifStreamParams& params, int64_t b) {
  const CifStreamConfig& cfg = params.cfg;
  const alpha_t* alphas = static_cast<const alpha_t*>(params.alphas) + b * cfg.frames;
  const int64_t* length_ptr = params.lengths ? params.lengths + b : nullptr;
  const double prefix0 = params.st.prefix[b];
  const int64_t tokens0 = params.st.tokens[b], frames0 = params.st.frames[b];
  double* prefix = params.ws.prefix + b * (cfg.frames + 1);
  int64_t* token_after = params.ws.token_after + b * cfg.frames;
  CifStreamRowInfo& info = params.ws.info[b];
  double* new_prefix = params.st.new_prefix + b;
  int64_t* new_tokens = params.st.new_tokens + b;
  int64_t* new_frames = params.st.new_frames + b;
  int64_t* token_lengths = params.token_lengths + b;
  const int64_t T = cfg.frames;
  const double beta = cfg.threshold;
  *new_prefix = prefix0;
  *new_tokens = tokens0;
  *new_frames = frames0;
  *token_lengths = 0;
  info = CifStreamRowInfo{};
  for (int64_t t = 0; t <= T; ++t) prefix[t] = prefix0;
  for (int64_t t = 0; t < T; ++t) token_after[t] = tokens0;
  const int64_t state_error = cif_stream_check_state(prefix0, tokens0, frames0, beta);
  if (state_error != kStateOk) {
    info.status = kCifBadStreamState;
    info.where = state_error;
    return;
  }
  const int64_t length = length_ptr ? *length_ptr : T;
  if (length < 0 || length > T) {
    info.status = kCifBadLength;
    return;
  }
  for (int64_t t = 0; t < length; ++t) {
    const double a = static_cast<double>(alphas[t]);
    if (!(a >= 0.0) || a - a != 0.0) {  // NaN, negative or +inf (as cif_scan_row)
      info.status = kCifBadAlpha;
      info.where = t;
      return;
    }
  }
  double p = prefix0;
  int64_t fired = tokens0;
  for (int64_t t = 0; t < length; ++t) {
    p += static_cast<double>(alphas[t]);  // cif_scan_row's p += a * 1.0, exactly
    if (cif_boundary(fired, beta) <= p) {
      if (p / beta >= 9007199254740992.0) {  // 2^53 (as cif_scan_row)
        for (int64_t u = 0; u <= T; ++u) prefix[u] = prefix0;
        for (int64_t u = 0; u < T; ++u) token_after[u] = tokens0;
        info.status = kCifTooManyTokens;
        info.where = t;
        return;
      }
      fired = cif_settle_fires(p, fired, beta);
    }
    prefix[t + 1] = p;
    token_after[t] = fired;
  }
  for (int64_t t = length; t < T; ++t) {
    prefix[t + 1] = p;
    token_after[t] = fired;
  }
  info.length = length;
  info.count = fired - tokens0;
  *new_prefix = p;
  *new_tokens = fired;
  *new_frames = frames0 + length;
  *token_lengths = fired - tokens0 < cfg.n_out ? fired - tokens0 : cfg.n_out;
}

// The chunk's embeddings for utterance b after its scan, over the dimensions
// d = d_begin, d_begin + d_step, ... < D (the CPU passes 0, 1; a CUDA block its
// threads). new_partial[b] [D] holds the open token's sum on entry and on exit;
// embeds[b] [N][D] and fire_frames[b] [N] (written where d_begin == 0) receive the
// completed tokens, padding zero / -1. hidden and embeds are in acc_t.
template <typename acc_t>
CIFOPS_HD void cif_stream_embed_row(const CifStreamParams& params, int64_t b, int64_t d_begin,
                                    int64_t d_step) {
  const CifStreamConfig& cfg = params.cfg;
  const int64_t T = cfg.frames;
  const acc_t* hidden = static_cast<const acc_t*>(params.hidden) + b * T * cfg.dim;
  const int64_t tokens0 = params.st.tokens[b], frames0 = params.st.frames[b];
  const double* prefix = params.ws.prefix + b * (T + 1);
  const int64_t* token_after = params.ws.token_after + b * T;
  const CifStreamRowInfo& info = params.ws.info[b];
  acc_t* partial = static_cast<acc_t*>(params.st.new_partial) + b * cfg.dim;
  acc_t* embeds = static_cast<acc_t*>(params.embeds) + b * cfg.n_out * cfg.dim;
  int64_t* fire_frames = params.fire_frames + b * cfg.n_out;
  const int64_t D = cfg.dim, N = cfg.n_out;
  const double beta = cfg.threshold;
  int64_t emitted = 0;
  for (int64_t t = 0; t < info.length; ++t) {
    const acc_t* h = hidden + t * D;
    const int64_t k_out = token_after[t];
    for (int64_t k = t == 0 ? tokens0 : token_after[t - 1]; k <= k_out; ++k) {
      if (k < k_out && k - tokens0 >= N) {  // complete but beyond N: dropped, up to k_out
        for (int64_t d = d_begin; d < D; d += d_step) partial[d] = acc_t(0);
        k = k_out;
      }
      const double w = cif_overlap(prefix[t], prefix[t + 1], k, beta);
      if (w > 0.0) {
        const acc_t wa = static_cast<acc_t>(w);
        for (int64_t d = d_begin; d < D; d += d_step) partial[d] += wa * h[d];
      }
      if (k < k_out) {  // token k fired at frame t
        const int64_t j = k - tokens0;
        acc_t* out = embeds + j * D;
        for (int64_t d = d_begin; d < D; d += d_step) {
          out[d] = partial[d];
          partial[d] = acc_t(0);
        }
        if (d_begin == 0) fire_frames[j] = frames0 + t;
        emitted = j + 1;
      }
    }
  }
  for (int64_t j = emitted; j < N; ++j) {
    for (int64_t d = d_begin; d < D; d += d_step) embeds[j * D + d] = acc_t(0);
    if (d_begin == 0) fire_frames[j] = -1;
  }
}

// ----------------------------------------------------------------------------
// CPU entry points (csrc/cif/cif_cpu.cpp), on CifParams (which fields each reads and
// writes is said there); ParallelFor: common/types.h.
void cif_scan_cpu(const CifParams& params, const ParallelFor& parallel_for);
void cif_forward_cpu(const CifParams& params, const ParallelFor& parallel_for);
void cif_backward_cpu(const CifParams& params, const ParallelFor& parallel_for);

// ----------------------------------------------------------------------------
// CUDA entry points (csrc/cif/cif_cuda.cu): the same, with device pointers and the
// stream as a cudaStream_t passed through void*. They return a cudaError_t (as int)
// of the launches.
int cif_scan_cuda(const CifParams& params, void* stream);
int cif_forward_cuda(const CifParams& params, void* stream);
int cif_backward_cuda(const CifParams& params, void* stream);

// Streaming entry points (csrc/cif/cif_stream_cpu.cpp, csrc/cif/cif_stream_cuda.cu), on
// CifStreamParams: the scan (cif_stream_scan_row per utterance), then the embedding pass
// (cif_stream_embed_row). The CUDA ones return a cudaError_t (as int) of the launch.
void cif_stream_scan_cpu(const CifStreamParams& params, const ParallelFor& parallel_for);
void cif_stream_embed_cpu(const CifStreamParams& params, const ParallelFor& parallel_for);
int cif_stream_scan_cuda(const CifStreamParams& params, void* stream);
int cif_stream_embed_cuda(const CifStreamParams& params, void* stream);

}  // namespace cifops
