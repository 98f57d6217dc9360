"""torch_cif's ``cif_function`` on top of :func:`cifops.cif`.

A drop-in replacement for ``torch_cif.cif_function`` (torch-cif 0.2.0)::

    from cifops.compat.torch_cif import cif_function
    out = cif_function(inputs, alpha, padding_mask=padding_mask, target_lengths=target_lengths)
    out["cif_out"][0], out["cif_lengths"][0], out["alpha_sum"][0], out["delays"][0]

Same signature, defaults and output dictionary (every value a one-element list; the same
keys, shapes and dtypes), and the same semantics, which torch_cif shares with the contract
(docs/cif-semantics.md): multi-fire for ``alpha > beta`` (allowed with
``unbound_alpha=True``), any ``beta``, the target-length scaling
``alpha * (beta * target + eps) / sum(alpha)`` with gradients through it, and the tail.
In particular it matches torch_cif in:

- ``padding_mask`` (True/1 = padding): masked frames have weight 0, whatever the pattern.
- training (``target_lengths`` given): ``cif_lengths = target_lengths``, ``T = max(target)``
  rows, no tail, ``tail_weights = []``.
- inference: ``floor(sum(alpha) / beta)`` tokens, plus the incomplete last token when its
  weight ``tail_weights >= tail_thres``, scaled by ``beta / tail_weights`` with the scale
  *detached* (no gradient through it, as in torch_cif; :func:`cifops.cif`'s own
  ``tail_mode="normalize"`` differentiates through it); ``T = max(cif_lengths)``.
- ``delays[b, k] = sum_t w[t, k] * (t + 1) / beta``, the weight-averaged 1-based source
  position of token k: differentiable, and for an emitted tail token unscaled, as in
  torch_cif. (It is not the fire frame: ``cifops.cif``'s ``fire_frames`` is the last frame.)
- ``alpha_sum`` (unscaled, in alpha's dtype), ``tail_weights``, and the scatter internals
  ``scaled_alpha``, ``cumsum_alpha``, ``right_indices``, ``right_weights``, ``left_indices``,
  ``left_weights``; the range check on alpha unless ``unbound_alpha``.

Deliberate differences (and why):

- Fire decisions and weights come from float64 prefix sums (contract, "Why prefix sums in
  float64"); torch_cif integrates in float32 (``alpha.float()``), even for float64 inputs,
  so results agree to float32 rounding and a prefix sum within float32 rounding of a
  multiple of ``beta`` may fire in one and not the other. The internals are computed in
  float64 and returned in torch_cif's dtypes.
- Rows at and beyond ``cif_lengths[b]`` are zero in ``cif_out`` and ``delays`` (contract,
  "Outputs"). torch_cif leaves partial sums of the incomplete token there: the
  ``eps``-weighted residual in training (row ``target[b]`` of ``cif_out`` and ``delays``)
  and the non-emitted tail in ``delays`` at inference.
- A residual of exactly 0 is never emitted as a tail token (contract: ``r > 0``);
  torch_cif emits it when ``tail_thres <= 0`` and scales it by ``beta / 0``, giving NaN.
- Negative alphas raise (the op requires ``alpha >= 0``); torch_cif accepts down to
  ``-eps``. ``target_lengths`` are used as integers (torch_cif's scaling uses their float
  value, the same for integer-valued targets).

Cost: two :func:`cifops.cif` calls (the embeddings, and a one-channel call for the delays
with the same fire decisions) and a few O(B*S) tensor ops for the internals.
"""

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import cifops

__all__ = ["cif_function"]


def cif_function(
    inputs: Tensor,
    alpha: Tensor,
    beta: float = 1.0,
    tail_thres: float = 0.5,
    padding_mask: Optional[Tensor] = None,
    target_lengths: Optional[Tensor] = None,
    eps: float = 1e-4,
    unbound_alpha: bool = False,
) -> Dict[str, List[Tensor]]:
    """torch_cif's ``cif_function``, computed by :func:`cifops.cif`; see the module docstring.

    Args:
        inputs: (N, S, C) features to integrate.
        alpha: (N, S) frame weights, in [0, 1] unless ``unbound_alpha``.
        beta: the firing threshold.
        tail_thres: inference only: emit the incomplete last token when its weight reaches it.
        padding_mask: (N, S), True/1 at padded frames.
        target_lengths: (N,) training: scale alpha so that exactly this many tokens fire.
        eps: the eps of the scaling.
        unbound_alpha: skip the check ``0 <= alpha <= 1 + eps``.

    Returns:
        ``{"cif_out": [(N, T, C)], "cif_lengths": [(N,)], "alpha_sum": [(N,)],
        "delays": [(N, T)], "tail_weights": [(N,)] (``[]`` in training),
        "scaled_alpha", "cumsum_alpha", "right_indices", "right_weights", "left_indices",
        "left_weights": [(N, S)] each}``.
    """
    B, S, C = inputs.shape
    if tuple(alpha.shape) != (B, S):
        raise ValueError(f"cif_function: alpha has shape {tuple(alpha.shape)}, expected {(B, S)}")
    if not unbound_alpha and not bool((alpha.le(1.0 + eps) & alpha.ge(-eps)).all()):
        raise ValueError("cif_function: alpha must be in [0, 1] (unbound_alpha=True lifts the upper bound)")
    lengths = None
    if padding_mask is not None:
        padding_mask = padding_mask.bool()
        alpha = alpha.masked_fill(padding_mask, 0)
        frame_numbers = torch.arange(1, S + 1, device=alpha.device).expand(B, S)
        lengths = frame_numbers.masked_fill(padding_mask, 0).amax(1)  # 1 + last unpadded frame

    training = target_lengths is not None
    opts = dict(threshold=beta, scale_eps=eps)
    if training:
        target_lengths = target_lengths.long()
        opts.update(target_lengths=target_lengths, max_tokens=int(target_lengths.max()))
    else:
        opts.update(tail_threshold=tail_thres, tail_mode="keep")
    out = cifops.cif(inputs, alpha, lengths, **opts)
    opts["max_tokens"] = out.embeds.shape[1]
    positions = torch.arange(1, S + 1, dtype=inputs.dtype, device=inputs.device)
    delays = cifops.cif(positions.expand(B, S).unsqueeze(-1), alpha, lengths, **opts)
    delays = delays.embeds.squeeze(-1) / beta

    # torch_cif's scatter internals, from float64 prefix sums. right_idx needs no clip at T:
    # floor(P_t / beta) <= floor(P_S / beta) <= T, as torch_cif's clip(max=T) assumes.
    scaled = alpha.double()
    if training:
        scaled = scaled * ((beta * target_lengths.double() + eps) / scaled.sum(1)).unsqueeze(1)
    csum = scaled.cumsum(1)
    right_idx = torch.floor(csum / beta).long()
    left_idx = F.pad(right_idx[:, :-1], (1, 0))
    right_weight = torch.where(right_idx > left_idx, csum - right_idx * beta, 0.0)
    left_weight = scaled - right_weight - (right_idx - left_idx - 1).clamp(min=0) * beta
    alpha_dtype = torch.promote_types(torch.float32, inputs.dtype) if training else torch.float32

    embeds, cif_lengths, tail_weights = out.embeds, target_lengths, []
    if not training:
        complete = right_idx[:, -1]  # floor(sum / beta): the tail, if emitted, is this row
        residual = csum[:, -1] - complete * beta
        scale = torch.where(out.token_lengths > complete, beta / residual, 1.0).detach()
        tail_row = torch.arange(embeds.shape[1], device=embeds.device) == complete.unsqueeze(1)
        row_scale = torch.where(tail_row, scale.unsqueeze(1), 1.0).to(embeds.dtype)
        embeds = embeds * row_scale.unsqueeze(-1)
        cif_lengths, tail_weights = out.token_lengths, [residual.to(inputs.dtype)]

    return {
        "cif_out": [embeds],
        "cif_lengths": [cif_lengths],
        "alpha_sum": [out.alpha_sum.to(alpha.dtype)],  # cifops.cif's is float32 for half
        "delays": [delays],
        "tail_weights": tail_weights,
        "scaled_alpha": [scaled.to(alpha_dtype)],
        "cumsum_alpha": [csum.to(alpha_dtype)],
        "right_indices": [right_idx],
        "right_weights": [right_weight.to(inputs.dtype)],
        "left_indices": [left_idx],
        "left_weights": [left_weight.to(inputs.dtype)],
    }
