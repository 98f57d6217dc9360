// CPU kernels of the streaming CIF step (the math is in cif.h): the chunk's scan and
// its embeddings, one utterance per task.
#include "cif.h"
#include "common/dispatch.h"

namespace cifops {
namespace {

const ThrowUnsupported kUnsupportedAlphas{"cifops CPU kernels take float32/float64 alphas"};
const ThrowUnsupported kUnsupportedHidden{"cifops CPU kernels take float32/float64 hidden"};

}  // namespace

void cif_stream_scan_cpu(const CifStreamParams& p, const ParallelFor& parallel_for) {
  dispatch(
      CpuTypes{}, p.alpha_kind,
      [&](auto tag) {
        using alpha_t = decltype(tag);
        parallel_for(p.cfg.batch, 256, [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b) cif_stream_scan_row<alpha_t>(p, b);
        });
      },
      kUnsupportedAlphas);
}

void cif_stream_embed_cpu(const CifStreamParams& p, const ParallelFor& parallel_for) {
  const int64_t TD = p.cfg.frames * p.cfg.dim;
  // Chunks are short: about 256 Ki hidden elements per task (a batch of 32 chunks of
  // 16 x 512 is one task), so that a step pays the thread pool's wake-up (milliseconds
  // on a loaded machine) only where the work is larger than that.
  const int64_t grain = TD > 0 ? ((int64_t(1) << 18) + TD - 1) / TD : p.cfg.batch + 1;
  dispatch(
      CpuTypes{}, p.hidden_kind,
      [&](auto tag) {
        using acc_t = decltype(tag);
        parallel_for(p.cfg.batch, grain, [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b)
            cif_stream_embed_row<acc_t>(p, b, /*d_begin=*/0, /*d_step=*/1);
        });
      },
      kUnsupportedHidden);
}

}  // namespace cifops
