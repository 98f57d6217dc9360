"""FunASR's CIF functions on top of :func:`cifops.cif`.

Drop-in replacements for ``cif``, ``cif_v1`` and ``cif_wo_hidden`` of
``funasr.models.paraformer.cif_predictor`` (``cif`` and ``cif_wo_hidden`` are also copied in
``funasr.models.bicif_paraformer.cif_predictor`` and ``funasr.utils.timestamp_tools``)::

    from cifops.compat.funasr import cif
    acoustic_embeds, cif_peak = cif(hidden, alphas, threshold)

Matched exactly, for weights ``0 <= alpha <= 1`` and ``threshold == 1`` (where FunASR's
``cif`` loop, its vectorised ``cif_v1`` and the contract agree):

- ``embeds`` ``[B, N, D]``: the tokens in firing order, zero rows after each utterance's
  last fired token, ``N = round(max_b sum_t alphas[b, t])`` rows, rounded like FunASR (half to
  even, on ``alphas.sum(-1)`` in the alphas' dtype), so there can be a trailing zero row.
- ``fires`` ``[B, T]``: for each frame, the weight integrated since the last firing boundary
  *before* firing, frame included: ``fires[t] >= threshold`` exactly on the frames that fire,
  and after a fire the excess carries on. Differentiable in ``alphas`` like FunASR's.
- No lengths argument: padded frames must have weight 0, as in FunASR; FunASR's tail
  handling (``tail_process_fn`` appending a ``tail_threshold`` pseudo-frame) happens in the
  predictor, before ``cif``, and stays the caller's job.
- Gradients with respect to ``hidden`` and ``alphas`` (fire decisions held fixed).

Deliberate differences (the contract, docs/cif-semantics.md, and why):

- Fire decisions use float64 prefix sums of the alphas, like :func:`cifops.cif`. FunASR's
  ``cif`` integrates in float32 by repeated subtraction and ``cif_v1`` rounds its float64
  prefix sums to float32 before ``floor``, so when a prefix sum lies within float32 rounding
  of a multiple of the threshold the peers may fire where this does not, or the reverse.
  This happens in practice when alphas are rescaled to sum *exactly* to the target length
  (FunASR's predictors do ``alphas *= target_length / alphas.sum(-1)`` in training): whether
  the last token fires is then decided by rounding, here and in FunASR. For training, prefer
  ``cifops.cif(hidden, alphas, lengths, target_lengths=...)``, whose ``scale_eps`` makes
  exactly ``target_length`` tokens fire.
- ``alpha > threshold`` (multi-fire): the frame fires several tokens, each complete token's
  weights summing to ``threshold`` (contract, "Definition"). FunASR's ``cif`` fires one token
  per frame and carries the excess, which later gives negative weights; ``cif_v1`` merges
  the tokens into one. ``fires[t]`` is then ``P_t - threshold * floor(P_{t-1} / threshold)``
  (float64 prefix sums ``P``), which can exceed ``2 * threshold``.
- ``threshold != 1``: tokens fire at, and are split at, multiples of ``threshold``. FunASR's
  ``cif`` compares with ``threshold`` but subtracts 1, and ``cif_v1`` ignores ``threshold``.
  (FunASR's ``cif_wo_hidden`` is consistent, and matches this one for
  ``alpha <= threshold``.) The row count is ``max(N, largest token count)`` so that no token
  is ever dropped; for ``threshold == 1`` that is FunASR's ``N``, since ``floor <= round``.
- dtypes: ``embeds`` has ``hidden``'s dtype and ``fires`` ``promote_types(alphas.dtype,
  float32)``. That is FunASR's for float32 inputs, and ``cif_v1``'s for all; FunASR's ``cif``
  returns float32 ``fires`` for float64 alphas.

Cost: one :func:`cifops.cif` call (fused CPU/CUDA kernel) and a float64 cumulative sum; one
device-to-host copy on CUDA for ``N`` (FunASR's functions need it too).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

import cifops

__all__ = ["cif", "cif_v1", "cif_wo_hidden"]


def cif(hidden: Tensor, alphas: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """FunASR's ``cif(hidden [B, T, D], alphas [B, T], threshold)`` -> ``(embeds [B, N, D],
    fires [B, T])``, computed by :func:`cifops.cif`; see the module docstring."""
    embeds = cifops.cif(hidden, alphas, threshold=threshold).embeds
    rows = max(embeds.shape[1], int(torch.round(alphas.sum(-1)).max()))
    embeds = F.pad(embeds, (0, 0, 0, rows - embeds.shape[1]))
    return embeds, cif_wo_hidden(alphas, threshold)


cif_v1 = cif  # FunASR's vectorised version: same conventions as its loop for alpha <= 1


def cif_wo_hidden(alphas: Tensor, threshold: float) -> Tensor:
    """FunASR's ``cif_wo_hidden(alphas [B, T], threshold)`` -> ``fires [B, T]``: the weight
    integrated since the last firing boundary, frame t included,
    ``P_t - threshold * floor(P_{t-1} / threshold)`` with float64 prefix sums ``P``."""
    prefix = torch.cumsum(alphas, dim=1, dtype=torch.float64)
    before = F.pad(prefix[:, :-1], (1, 0)).detach()
    fires = prefix - threshold * torch.floor(before / threshold)
    return fires.to(torch.promote_types(alphas.dtype, torch.float32))
