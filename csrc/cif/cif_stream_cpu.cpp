// CPU kernels of the streaming CIF step (the math is in cif.h): the chunk's scan and
// its embeddings, one utterance per task.
#include "cif.h"
#include "common/dispatch.h"

namespace cifops {
namespace {

template <typename alpha_t>
void stream_scan_impl(const alpha_t* alphas, const int64_t* lengths, const CifStreamConfig& cfg,
                      CifStreamState st, CifStreamWorkspace ws, int64_t* token_lengths,
                      const ParallelFor& parallel_for) {
  const int64_t T = cfg.frames;
  parallel_for(cfg.batch, 256, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      cif_stream_scan_row(alphas + b * T, lengths ? lengths + b : nullptr, cfg, st.prefix[b],
                          st.tokens[b], st.frames[b], ws.prefix + b * (T + 1),
                          ws.token_after + b * T, ws.info[b], st.new_prefix + b,
                          st.new_tokens + b, st.new_frames + b, token_lengths + b);
  });
}

template <typename acc_t>
void stream_embed_impl(const acc_t* hidden, const CifStreamConfig& cfg, CifStreamState st,
                       CifStreamWorkspace ws, acc_t* embeds, int64_t* fire_frames,
                       const ParallelFor& parallel_for) {
  const int64_t T = cfg.frames, D = cfg.dim, N = cfg.n_out;
  acc_t* partial = static_cast<acc_t*>(st.new_partial);
  // Chunks are short: about 256 Ki hidden elements per task (a batch of 32 chunks of
  // 16 x 512 is one task), so that a step pays the thread pool's wake-up (milliseconds
  // on a loaded machine) only where the work is larger than that.
  const int64_t grain = T * D > 0 ? ((int64_t(1) << 18) + T * D - 1) / (T * D) : cfg.batch + 1;
  parallel_for(cfg.batch, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      cif_stream_embed_row(hidden + b * T * D, cfg, st.tokens[b], st.frames[b],
                           ws.prefix + b * (T + 1), ws.token_after + b * T,
                           ws.info[b], partial + b * D, embeds + b * N * D,
                           fire_frames + b * N, /*d_begin=*/0, /*d_step=*/1);
  });
}

const ThrowUnsupported kUnsupportedAlphas{"cifops CPU kernels take float32/float64 alphas"};
const ThrowUnsupported kUnsupportedHidden{"cifops CPU kernels take float32/float64 hidden"};

}  // namespace

void cif_stream_scan_cpu(const void* alphas, ScalarKind alpha_kind, const int64_t* lengths,
                         const CifStreamConfig& cfg, CifStreamState st, CifStreamWorkspace ws,
                         int64_t* token_lengths, const ParallelFor& parallel_for) {
  dispatch(CpuTypes{}, alpha_kind, [&](auto tag) {
    using alpha_t = decltype(tag);
    stream_scan_impl(static_cast<const alpha_t*>(alphas), lengths, cfg, st, ws, token_lengths,
                     parallel_for);
  }, kUnsupportedAlphas);
}

void cif_stream_embed_cpu(const void* hidden, ScalarKind hidden_kind, const CifStreamConfig& cfg,
                          CifStreamState st, CifStreamWorkspace ws, void* embeds,
                          int64_t* fire_frames, const ParallelFor& parallel_for) {
  dispatch(CpuTypes{}, hidden_kind, [&](auto tag) {
    using acc_t = decltype(tag);
    stream_embed_impl(static_cast<const acc_t*>(hidden), cfg, st, ws,
                      static_cast<acc_t*>(embeds), fire_frames, parallel_for);
  }, kUnsupportedHidden);
}

}  // namespace cifops
