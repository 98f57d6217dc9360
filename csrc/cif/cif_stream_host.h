// Host side of cifops::cif_stream_step, shared by its CPU and CUDA bindings: argument
// checks that name the argument, allocation of the outputs and the chunk's workspace,
// and the op body itself around the two backend kernels (scan, then embeddings), written
// once for both backends as the cif ops' (cif_host.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <string>
#include <optional>
#include <tuple>

#include "cif_host.h"

namespace cifops {

using CifStreamOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline void check_cif_stream_args(const at::Tensor& hidden, const at::Tensor& alphas,
                                  const std::optional<at::Tensor>& lengths,
                                  const at::Tensor& prefix, const at::Tensor& tokens,
                                  const at::Tensor& frames, const at::Tensor& partial,
                                  double threshold, int64_t max_tokens) {
  const char* fn = "cifops.cif_stream_step";
  TORCH_CHECK(hidden.dim() == 3, fn, ": hidden must be a 3-D tensor [B, Tc, D], got shape ",
              hidden.sizes());
  TORCH_CHECK(is_supported_float(hidden.scalar_type()), fn,
              ": hidden must be " CIFOPS_FLOAT_DTYPES ", got ", hidden.scalar_type());
  const int64_t B = hidden.size(0), T = hidden.size(1), D = hidden.size(2);
  TORCH_CHECK(alphas.dim() == 2 && alphas.size(0) == B && alphas.size(1) == T, fn,
              ": alphas must have shape [B, Tc] = [", B, ", ", T, "] to match hidden, got ",
              alphas.sizes());
  TORCH_CHECK(is_supported_float(alphas.scalar_type()), fn,
              ": alphas must be " CIFOPS_FLOAT_DTYPES ", got ", alphas.scalar_type());
  check_same_device(alphas, "alphas", hidden, "hidden", fn);
  if (lengths.has_value()) {
    TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == B, fn,
                ": lengths must be a 1-D tensor [B] = [", B, "], got shape ", lengths->sizes());
    TORCH_CHECK(at::isIntegralType(lengths->scalar_type(), /*includeBool=*/false), fn,
                ": lengths must be an integer tensor, got ", lengths->scalar_type());
    check_same_device(*lengths, "lengths", hidden, "hidden", fn);
  }
  // The state: what a previous step (or cifops.cif_stream_state) returned for this batch.
  auto check_state = [&](const at::Tensor& x, const char* name, at::ScalarType dtype,
                         bool per_dim) {
    const bool shape_ok = per_dim ? (x.dim() == 2 && x.size(0) == B && x.size(1) == D)
                                  : (x.dim() == 1 && x.size(0) == B);
    TORCH_CHECK(shape_ok, fn, ": ", name, " must have shape ", per_dim ? "[B, D] = [" : "[B] = [",
                B, per_dim ? ", " : "", per_dim ? std::to_string(D) : std::string(),
                "] to match hidden, got ", x.sizes(), " (a state from another batch or model?)");
    TORCH_CHECK(x.scalar_type() == dtype, fn, ": ", name, " must be ", dtype, " for ",
                hidden.scalar_type(), " hidden, got ", x.scalar_type());
    check_same_device(x, name, hidden, "hidden", fn);
  };
  check_state(prefix, "state.prefix", at::kDouble, false);
  check_state(tokens, "state.tokens", at::kLong, false);
  check_state(frames, "state.frames", at::kLong, false);
  check_state(partial, "state.partial", compute_type(hidden.scalar_type()), true);
  TORCH_CHECK(std::isfinite(threshold) && threshold > 0, fn,
              ": threshold must be a finite number > 0, got ", threshold);
  check_max_tokens(max_tokens, hidden, fn);
}

// The error of a state that no step returns (cif_stream_check_state): names the field.
// The same messages as _state_error in cifops/_stream.py (the flush's check).
[[noreturn]] inline void throw_bad_stream_state(const char* fn, int64_t error, int64_t b,
                                                double prefix, int64_t tokens, int64_t frames,
                                                double threshold) {
  const char* edited = ": not a state that a step returned (edited, or from another stream?)";
  switch (error) {
    case kStateNegativeFrames:
      TORCH_CHECK_VALUE(false, fn, ": state.frames[", b, "] = ", frames, " is negative", edited);
    case kStateNegativeTokens:
      TORCH_CHECK_VALUE(false, fn, ": state.tokens[", b, "] = ", tokens, " is negative", edited);
    case kStateBadPrefix:
      TORCH_CHECK_VALUE(false, fn, ": state.prefix[", b, "] = ", prefix, " must be finite and >= 0",
                        edited);
    case kStatePrefixNoFrames:
      TORCH_CHECK_VALUE(false, fn, ": state.prefix[", b, "] = ", prefix, " but state.frames[", b,
                        "] = 0: a stream that has seen no frame has prefix 0 (a recycled batch "
                        "slot? start a new utterance from cifops.cif_stream_state's zeros)");
    default:
      TORCH_CHECK_VALUE(false, fn, ": state.prefix[", b, "] = ", prefix, " and state.tokens[", b,
                        "] = ", tokens, " disagree at threshold ", threshold,
                        ": a step leaves tokens = the number of thresholds in prefix (from "
                        "steps at another threshold, or edited?)");
  }
}

// Raise the first per-utterance error of a chunk's scan (info on the CPU); returns the
// largest number of tokens completed in the chunk.
inline int64_t check_stream_status(const at::Tensor& info_cpu, const at::Tensor& alphas,
                                   const std::optional<at::Tensor>& lengths,
                                   const at::Tensor& prefix, const at::Tensor& tokens,
                                   const at::Tensor& frames, double threshold) {
  const auto* info = reinterpret_cast<const CifStreamRowInfo*>(info_cpu.data_ptr<int64_t>());
  int64_t max_count = 0;
  for (int64_t b = 0; b < info_cpu.size(0); ++b) {
    const CifStreamRowInfo& row = info[b];
    const int64_t where = row.where;
    switch (row.status) {
      case kCifOk:
        break;
      case kCifBadStreamState:
        throw_bad_stream_state(
            "cifops.cif_stream_step", where, b, prefix.select(0, b).item<double>(),
            tokens.select(0, b).item<int64_t>(), frames.select(0, b).item<int64_t>(), threshold);
      case kCifBadAlpha:
        TORCH_CHECK(false, "cifops.cif_stream_step: alphas must be finite and >= 0, got alphas[", b,
                    ", ", where, "] = ", alphas.select(0, b).select(0, where).item<double>());
      case kCifBadLength:
        TORCH_CHECK(false, "cifops.cif_stream_step: lengths must be in [0, Tc] = [0, ",
                    alphas.size(1), "], got lengths[", b,
                    "] = ", lengths->select(0, b).item<int64_t>());
      case kCifTooManyTokens:
        TORCH_CHECK(false, "cifops.cif_stream_step: the alphas of utterance ", b,
                    " integrate to more than 2^53 thresholds by frame ", where,
                    " of the chunk; token counts would not be exact");
      default:
        TORCH_CHECK(false, "cifops.cif_stream_step: internal error, unknown status");
    }
    if (row.count > max_count) max_count = row.count;
  }
  return max_count;
}

// cifops::cif_stream_step on a Backend (cif_host.h: the device guard, kStatusOnHost,
// stream_scan and stream_embed). hidden and alphas go to the kernels in the compute dtype.
// Without max_tokens, or where the statuses are on the host, the scan's statuses and
// counts are read back (a device-to-host copy on CUDA) to raise errors and size the
// outputs; with max_tokens on CUDA a chunk with bad values emits nothing and leaves its
// utterance's state as it was.
template <typename Backend>
CifStreamOutputs cif_stream_step_op(const at::Tensor& hidden, const at::Tensor& alphas,
                                    const std::optional<at::Tensor>& lengths,
                                    const at::Tensor& prefix, const at::Tensor& tokens,
                                    const at::Tensor& frames, const at::Tensor& partial,
                                    double threshold, int64_t max_tokens) {
  // checked before the device guard: a CPU hidden with a CUDA state must get the message
  // that names the argument, not the guard's
  check_cif_stream_args(hidden, alphas, lengths, prefix, tokens, frames, partial, threshold,
                        max_tokens);
  const Backend backend(hidden.device());
  const at::Tensor h = to_compute(hidden), a = to_compute(alphas);
  const auto len = to_long(lengths);
  const int64_t B = hidden.size(0), T = hidden.size(1), D = hidden.size(2);
  CifStreamParams p;
  p.cfg.batch = B;
  p.cfg.frames = T;
  p.cfg.dim = D;
  // not given: every token (token_lengths = the count), then N = the largest count
  p.cfg.n_out = max_tokens >= 0 ? max_tokens : std::numeric_limits<int64_t>::max();
  p.cfg.threshold = threshold;
  const auto opts = hidden.options();
  at::Tensor ws_prefix = at::empty({B, T + 1}, opts.dtype(at::kDouble));
  at::Tensor ws_after = at::empty({B, T}, opts.dtype(at::kLong));
  at::Tensor ws_info = at::empty({B, kStreamInfo}, opts.dtype(at::kLong));
  at::Tensor new_prefix = at::empty({B}, opts.dtype(at::kDouble));
  at::Tensor new_tokens = at::empty({B}, opts.dtype(at::kLong));
  at::Tensor new_frames = at::empty({B}, opts.dtype(at::kLong));
  at::Tensor token_lengths = at::empty({B}, opts.dtype(at::kLong));
  at::Tensor new_partial = partial.contiguous().clone();
  const at::Tensor p0 = prefix.contiguous(), k0 = tokens.contiguous(), f0 = frames.contiguous();
  p.st.prefix = p0.data_ptr<double>();
  p.st.tokens = k0.data_ptr<int64_t>();
  p.st.frames = f0.data_ptr<int64_t>();
  p.st.new_prefix = new_prefix.data_ptr<double>();
  p.st.new_tokens = new_tokens.data_ptr<int64_t>();
  p.st.new_frames = new_frames.data_ptr<int64_t>();
  p.st.new_partial = new_partial.data_ptr();
  p.ws.prefix = ws_prefix.data_ptr<double>();
  p.ws.token_after = ws_after.data_ptr<int64_t>();
  p.ws.info = reinterpret_cast<CifStreamRowInfo*>(ws_info.data_ptr<int64_t>());
  p.alpha_kind = scalar_kind(a.scalar_type());
  p.alphas = a.data_ptr();
  p.lengths = maybe_ptr(len);
  p.token_lengths = token_lengths.data_ptr<int64_t>();
  backend.stream_scan(p);
  if (max_tokens < 0 || Backend::kStatusOnHost) {
    const at::Tensor info = Backend::kStatusOnHost ? ws_info : ws_info.cpu();
    const int64_t max_count =
        check_stream_status(info, alphas, len, prefix, tokens, frames, threshold);
    if (max_tokens < 0) p.cfg.n_out = max_count;
  }
  at::Tensor embeds = at::empty({B, p.cfg.n_out, D}, h.options());
  at::Tensor fire_frames = at::empty({B, p.cfg.n_out}, opts.dtype(at::kLong));
  p.hidden_kind = scalar_kind(h.scalar_type());
  p.hidden = h.data_ptr();
  p.embeds = embeds.data_ptr();
  p.fire_frames = fire_frames.data_ptr<int64_t>();
  backend.stream_embed(p);
  return {embeds.to(hidden.scalar_type()),
          token_lengths,
          fire_frames,
          new_prefix,
          new_tokens,
          new_frames,
          new_partial};
}

}  // namespace cifops
