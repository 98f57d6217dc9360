"""cifops: CIF integration and a fused contrastive loss as PyTorch custom ops.

import cifops
out = cifops.cif(hidden, alphas, lengths, target_lengths=target_lengths)
out.embeds, out.token_lengths, out.fire_frames, out.alpha_sum
loss = cifops.contrastive_loss(student, teacher, temperature=0.02)
cifops.onnx_export(model, (hidden, alphas, lengths), "model.onnx")  # cif with max_tokens
"""

from cifops._loader import build_info, load_library
from cifops._version import __version__ as __version__

load_library()

from cifops._cif import Cif, CifOutput, cif  # noqa: E402
from cifops._stream import (  # noqa: E402
    CifStream,
    CifStreamState,
    cif_stream_flush,
    cif_stream_state,
    cif_stream_step,
)
from cifops._contrastive import (  # noqa: E402
    ContrastiveLoss,
    contrastive_accuracy,
    contrastive_loss,
)
from cifops._export import export_decompositions, onnx_export  # noqa: E402

__all__ = [
    "cif",
    "Cif",
    "CifOutput",
    "cif_stream_step",
    "cif_stream_flush",
    "cif_stream_state",
    "CifStream",
    "CifStreamState",
    "contrastive_loss",
    "contrastive_accuracy",
    "ContrastiveLoss",
    "export_decompositions",
    "onnx_export",
    "build_info",
]
