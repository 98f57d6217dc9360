"""The loop-free CIF: the contract (docs/cif-semantics.md, csrc/cif/cif.h) in standard
tensor operations only (cumsum, comparisons, where, gather, sums), with no loop over
frames and no data-dependent shape.

It is what cifops.export_decompositions puts in place of the ops (cifops/_export.py), so
that torch.export and ONNX see standard operators, and what cifops.cif_stream_flush
computes the tail with (cifops/_stream.py): a chunk of frames from a state
(:func:`cif_chunk`), the still-open token (:func:`cif_tail`), and the check of a stream
state (:func:`stream_state_error`).

The algorithm (per utterance; state carried between chunks, zero for a whole input):

* prefix sums ``P = cumsum(cat([prefix, scale * alpha]))`` in float64: ``torch.cumsum``
  on the CPU and ONNX Runtime's CumSum add sequentially, so ``P`` is bit for bit the
  kernel's (cif_scan_row adds in the same order, the product rounded separately);
* fire counts ``F_t = #{k : double(k+1) * beta <= P_t}``, elementwise: ``floor(P / beta)``
  corrected by comparisons with the boundaries computed as cif_boundary does, so the
  ``>=`` decisions are the kernel's (cif_settle_fires);
* fire frame of token k: the number of frames t with ``F_t <= k``, as a cumsum over k of
  the number of frames with each count (a scatter-add over t);
* embeddings from the float64 running integral ``H_t = partial + sum_{s<t} dP_s h_s``:
  the integral up to the boundary ``B_k = (k+1) beta`` of token k, which lies in frame
  ``f_k``, is ``G_k = H_{f_k} + (B_k - P_{f_k}) h_{f_k}``, and ``c_k = G_k - G_{k-1}``
  (``G_{-1} = 0``; the open token's ``partial`` is in ``H_0``). In float64 the
  cancellation costs about ``1e-16 * P_T / beta`` of a token's norm;
* the still-open token's weighted sum (the tail, the next chunk's ``partial``) is summed
  directly with the kernel's overlap weights, not as a difference, so a normalised tail
  ``beta / r`` with a tiny residual ``r`` is as accurate as the kernel's.

Work is O(B (T + N) D), float64 for the [B, T, D] integral. Frames with zero weight are
masked, so padding may hold anything finite or not; a non-finite ``hidden`` at a frame
with positive weight makes this token and the utterance's later ones NaN (the kernel:
this token only).
"""

import struct
from typing import Optional

import torch
from torch import Tensor

from cifops import _C
from cifops._checks import compute_dtype

_F64, _I64 = torch.float64, torch.int64
TOO_MANY_THRESHOLDS = 9007199254740992.0  # 2^53 thresholds: token counts stop being exact
_K_CLAMP = float(2**62)  # keeps the float -> int64 cast defined for huge P
_STATE = _C.cif_stream_state_error  # CifStreamStateError in csrc/cif/cif.h


def f64(value, like: Tensor) -> Tensor:
    """``value`` as an exact float64 0-d tensor in an exported graph. The ONNX exporter
    passes Python floats as float32 (an op's scalar operand, or scalar_tensor's value: a
    scale_eps of 1e-4 became 9.99999974738e-05 and moved every prefix sum), so the value
    is written as the sum of three float32 numbers, each exact, added in float64 (exact:
    together they hold its 53 bits). A value outside float32's range, where the split is
    not exact, is passed as is (and may be rounded to float32 in ONNX)."""
    value = float(value)
    parts, rest = [], value
    try:
        for _ in range(3):
            part = struct.unpack("f", struct.pack("f", rest))[0]  # rounded to float32
            parts.append(part)
            rest -= part
    except OverflowError:
        rest = value
    if rest != 0.0:
        parts = [value]
    out = torch.scalar_tensor(parts[0], dtype=_F64, device=like.device)
    for part in parts[1:]:
        out = out + torch.scalar_tensor(part, dtype=_F64, device=like.device)
    return out


def _boundary(k: Tensor, beta: Tensor) -> Tensor:
    """cif_boundary: double(k + 1) * beta."""
    return (k + 1).to(_F64) * beta


def stream_state_error(prefix: Tensor, tokens: Tensor, frames: Tensor, threshold) -> Tensor:
    """cif_stream_check_state (csrc/cif/cif.h) per utterance: 0 for a state that a step
    can return, else the first check that fails (a STATE_* code): frames < 0, tokens < 0,
    a negative or non-finite prefix, a prefix != 0 with no frame seen, tokens other than
    the number of boundaries (k+1) beta <= prefix."""
    beta = f64(threshold, prefix)
    bad_prefix = ~((prefix >= 0) & (prefix - prefix == 0))
    disagree = ((tokens > 0) & (_boundary(tokens - 1, beta) > prefix)) | (_boundary(tokens, beta) <= prefix)
    error = torch.where(disagree, _STATE["tokens_disagree"], torch.zeros_like(tokens))
    error = torch.where((frames == 0) & (prefix != 0), _STATE["prefix_no_frames"], error)
    error = torch.where(bad_prefix, _STATE["bad_prefix"], error)
    error = torch.where(tokens < 0, _STATE["negative_tokens"], error)
    return torch.where(frames < 0, _STATE["negative_frames"], error)


def _fired(p: Tensor, beta: Tensor) -> Tensor:
    """Tokens fired once the prefix sum reaches p >= 0, #{k >= 0 : double(k+1)*beta <= p}
    (cif_settle_fires from 0): floor(p / beta), then settled on the boundary comparisons.
    p / beta is within an ulp of the quotient and the boundaries within half an ulp of
    (k+1) beta, so two steps each way settle every p below 2^52 thresholds."""
    q = p / beta
    q = torch.where(q < _K_CLAMP, q, _K_CLAMP)  # also NaN: the caller discards those
    k = q.floor().to(_I64)
    for _ in range(2):
        k = torch.where(_boundary(k - 1, beta) > p, k - 1, k)
    for _ in range(2):
        k = torch.where(_boundary(k, beta) <= p, k + 1, k)
    return k


def chunk_scan(hidden, alphas, lengths, prefix, tokens, frames, partial, threshold, scale, max_tokens):
    """cif_chunk, plus the chunk's prefix sums P [B, T+1] (P[:, 0] = prefix) and fire
    counts F [B, T] (tokens fired by the end of each frame, from the utterance's start);
    embeds in the accumulation dtype (float32, or float64 for float64 hidden)."""
    B, T, D = hidden.shape
    beta = f64(threshold, hidden)
    acc = compute_dtype(hidden.dtype)
    N = int(max_tokens)
    a = alphas.to(_F64)
    if lengths is None:
        consumed = torch.full_like(frames, T)
    else:
        consumed = lengths.to(_I64).clamp(0, T)
        a = torch.where(torch.arange(T, device=a.device) < consumed[:, None], a, 0.0)
    if scale is not None:
        a = a * scale[:, None]
    P = torch.cumsum(torch.cat([prefix.to(_F64)[:, None], a], 1), 1)
    F_all = torch.maximum(_fired(P, beta), tokens[:, None])
    F, n_end = F_all[:, 1:], F_all[:, -1]
    partial64 = partial.to(_F64)
    dP = P[:, 1:] - P[:, :-1]
    # weightless frames take no part (masked before the cast to float64: half the bytes;
    # in acc, as everything in the graph: ONNX Runtime's CPU provider has no bfloat16 Where)
    h = torch.where((dP > 0)[..., None], hidden.to(acc), 0.0).to(_F64)
    H = torch.cumsum(torch.cat([partial64[:, None], dP[..., None] * h], 1), 1)  # [B,T+1,D]
    # tokens tokens[b] + k, k < N: fire frame f = #{t : F_t <= tokens + k} (T: not
    # completed in this chunk), from the number of frames with each count (a scatter-add)
    g = tokens[:, None] + torch.arange(N, device=hidden.device)
    j = (F - tokens[:, None]).clamp(max=N)
    f = torch.cumsum(j.new_zeros((B, N + 1)).scatter_add(1, j, torch.ones_like(j)), 1)[:, :N]
    done = g < n_end[:, None]
    Hf = torch.gather(H, 1, f[..., None].expand(B, N, D))
    # f = T (a token not completed here) reads a zero row: also defined for an empty chunk
    hf = torch.gather(torch.cat([h, h.new_zeros((B, 1, D))], 1), 1, f[..., None].expand(B, N, D))
    G = Hf + (_boundary(g, beta) - torch.gather(P, 1, f))[..., None] * hf
    c = G - torch.cat([G.new_zeros((B, 1, D)), G[:, :-1]], 1)
    embeds = torch.where(done[..., None], c, 0.0).to(acc)  # the callers cast to hidden's
    fire_frames = torch.where(done, frames[:, None] + f, -1)
    token_lengths = torch.clamp(n_end - tokens, max=N)
    # the open token: the overlap of each frame with [B_{n-1}, P_T), as cif_overlap
    w = P[:, 1:] - torch.maximum(P[:, :-1], _boundary(n_end - 1, beta)[:, None])
    w = torch.where(w > 0, w, 0.0)
    new_partial = torch.bmm(w[:, None, :], h)[:, 0] + torch.where((n_end > tokens)[:, None], 0.0, partial64)
    return (embeds, token_lengths, fire_frames, P[:, -1], n_end, frames + consumed, new_partial.to(acc), P, F)


def cif_chunk(
    hidden: Tensor,
    alphas: Tensor,
    lengths: Optional[Tensor],
    prefix: Tensor,
    tokens: Tensor,
    frames: Tensor,
    partial: Tensor,
    threshold: float,
    scale: Optional[Tensor],
    max_tokens: int,
):
    """CIF over one chunk of frames, continuing from a state; loop-free and exportable.

    Args:
        hidden [B, T, D], alphas [B, T] (any float dtypes; alphas >= 0 and finite, not
        checked), lengths [B] int64 in [0, T] or None (frames t >= lengths[b] contribute
        nothing), threshold beta, scale [B] float64 or None (the alphas are integrated as
        ``scale * alpha``), max_tokens N >= 0 (tokens past N are dropped from the
        outputs, the state stays exact).
        The state, all zero at an utterance's start:
        prefix [B] float64, the prefix sum P after the last frame consumed;
        tokens [B] int64, complete tokens fired so far;
        frames [B] int64, frames consumed so far;
        partial [B, D] in the accumulation dtype (float64 for float64 hidden, else
        float32), the unscaled weighted sum of the still-open token's frames.

    Returns:
        (embeds [B, N, D] hidden's dtype, token_lengths [B] int64, fire_frames [B, N]
        int64, new_prefix, new_tokens, new_frames, new_partial): the tokens completed in
        this chunk (the first includes ``partial``), fire frames counted from the
        utterance's first frame, zeros and -1 in padding; then the state after the chunk.
        Prefix sums and fire decisions are bit for bit those of ``cifops.cif`` on the
        whole input, whatever the chunking, where cumsum adds sequentially (the CPU, ONNX
        Runtime's CPU provider; a GPU's parallel cumsum may differ in the last bit).
    """
    out = chunk_scan(hidden, alphas, lengths, prefix, tokens, frames, partial, threshold, scale, max_tokens)
    return (out[0].to(hidden.dtype),) + out[1:7]


def tail_scan(prefix, tokens, frames, partial, threshold, tail_threshold, tail_normalize, out_dtype):
    """cif_tail, plus the residual r and the tail scale (beta / r or 1) of the workspace."""
    beta = f64(threshold, prefix)
    residual = prefix - tokens.to(_F64) * beta  # as cif_scan_row
    if tail_threshold is None:
        has = torch.zeros_like(frames, dtype=torch.bool)
    else:
        has = (frames > 0) & (residual > 0) & (residual >= f64(tail_threshold, prefix))
    scale = torch.ones_like(residual)
    if tail_normalize:
        # a tensor numerator: python_scalar / tensor is reciprocal(tensor) * scalar in torch
        scale = torch.where(has, beta / torch.where(has, residual, 1.0), 1.0)
    embed = torch.where(has[:, None], (partial.to(_F64) * scale[:, None]).to(partial.dtype), 0.0).to(out_dtype)
    return embed, has, torch.where(has, frames - 1, -1), residual, scale


def cif_tail(
    prefix: Tensor,
    tokens: Tensor,
    frames: Tensor,
    partial: Tensor,
    threshold: float,
    tail_threshold: Optional[float],
    tail_normalize: bool,
    out_dtype: torch.dtype,
):
    """The contract's tail token from a state of :func:`cif_chunk`.

    The residual ``r = prefix - tokens * beta`` (as cif_scan_row) is emitted when
    ``tail_threshold`` is set, ``frames > 0``, ``r > 0`` and ``r >= tail_threshold``:
    ``partial`` scaled by ``beta / r`` in float64 (``tail_normalize``) or as is, cast to
    ``out_dtype``. Returns (tail_embed [B, D], has_tail [B] bool, tail_frame [B] int64:
    ``frames - 1``, -1 without a tail).
    """
    return tail_scan(prefix, tokens, frames, partial, threshold, tail_threshold, tail_normalize, out_dtype)[:3]
