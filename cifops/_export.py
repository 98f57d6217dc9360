"""Export of cifops.cif: a pure-PyTorch, loop-free CIF for torch.export and ONNX.

The CPU and CUDA kernels of ``cifops::cif_forward`` are opaque to exporters. Here the
same contract (docs/cif-semantics.md, csrc/cif/cif.h) is written with standard tensor
operations only (cumsum, comparisons, where, gather, sums), with no loop over frames
and no data-dependent shape, so that ``ExportedProgram.run_decompositions`` can replace
the op by it and ``torch.onnx.export(..., dynamo=True)`` turns it into standard ONNX
operators (docs/export.md).

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

Work is O(B (T + N) D), float64 for the [B, T, D] integral. Frames with zero weight are masked, so padding may hold
anything finite or not; a non-finite ``hidden`` at a frame with positive weight makes
this token and the utterance's later ones NaN (the kernel: this token only).
"""
import struct
from typing import Optional

import torch
from torch import Tensor

from cifops._cif import CifOutput, cif

__all__ = ["export_decompositions", "onnx_export"]

_F64, _I64 = torch.float64, torch.int64
_TOO_MANY = 9007199254740992.0  # 2^53 thresholds: token counts stop being exact
_K_CLAMP = float(2**62)         # keeps the float -> int64 cast defined for huge P
# CifStatus in csrc/cif/cif.h
_BAD_ALPHA, _BAD_LENGTH, _BAD_TARGET, _ZERO_SUM_TARGET, _TOO_MANY_TOKENS = 1, 2, 3, 4, 5
# CifStreamStateError in csrc/cif/cif.h
(STATE_NEGATIVE_FRAMES, STATE_NEGATIVE_TOKENS, STATE_BAD_PREFIX, STATE_PREFIX_NO_FRAMES,
 STATE_TOKENS_DISAGREE) = 1, 2, 3, 4, 5


def _acc_dtype(dtype):
    """The kernels' accumulation dtype: float64 for float64, else float32."""
    return _F64 if dtype == _F64 else torch.float32


def _f64(value, like: Tensor) -> Tensor:
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
    beta = _f64(threshold, prefix)
    bad_prefix = ~((prefix >= 0) & (prefix - prefix == 0))
    disagree = (((tokens > 0) & (_boundary(tokens - 1, beta) > prefix))
                | (_boundary(tokens, beta) <= prefix))
    error = torch.where(disagree, STATE_TOKENS_DISAGREE, torch.zeros_like(tokens))
    error = torch.where((frames == 0) & (prefix != 0), STATE_PREFIX_NO_FRAMES, error)
    error = torch.where(bad_prefix, STATE_BAD_PREFIX, error)
    error = torch.where(tokens < 0, STATE_NEGATIVE_TOKENS, error)
    return torch.where(frames < 0, STATE_NEGATIVE_FRAMES, error)


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


def _chunk(hidden, alphas, lengths, prefix, tokens, frames, partial, threshold, scale,
           max_tokens):
    """_cif_chunk, plus the chunk's prefix sums P [B, T+1] (P[:, 0] = prefix) and fire
    counts F [B, T] (tokens fired by the end of each frame, from the utterance's start);
    embeds in the accumulation dtype (float32, or float64 for float64 hidden)."""
    B, T, D = hidden.shape
    beta = _f64(threshold, hidden)
    acc = _acc_dtype(hidden.dtype)
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
    new_partial = torch.bmm(w[:, None, :], h)[:, 0] + torch.where(
        (n_end > tokens)[:, None], 0.0, partial64)
    return (embeds, token_lengths, fire_frames, P[:, -1], n_end, frames + consumed,
            new_partial.to(acc), P, F)


def _cif_chunk(hidden: Tensor, alphas: Tensor, lengths: Optional[Tensor], prefix: Tensor,
               tokens: Tensor, frames: Tensor, partial: Tensor, threshold: float,
               scale: Optional[Tensor], max_tokens: int):
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
    out = _chunk(hidden, alphas, lengths, prefix, tokens, frames, partial, threshold, scale,
                 max_tokens)
    return (out[0].to(hidden.dtype),) + out[1:7]


def _tail(prefix, tokens, frames, partial, threshold, tail_threshold, tail_normalize,
          out_dtype):
    """_cif_tail, plus the residual r and the tail scale (beta / r or 1) of the workspace."""
    beta = _f64(threshold, prefix)
    residual = prefix - tokens.to(_F64) * beta  # as cif_scan_row
    if tail_threshold is None:
        has = torch.zeros_like(frames, dtype=torch.bool)
    else:
        has = (frames > 0) & (residual > 0) & (residual >= _f64(tail_threshold, prefix))
    scale = torch.ones_like(residual)
    if tail_normalize:
        # a tensor numerator: python_scalar / tensor is reciprocal(tensor) * scalar in torch
        scale = torch.where(has, beta / torch.where(has, residual, 1.0), 1.0)
    embed = torch.where(has[:, None], (partial.to(_F64) * scale[:, None]).to(partial.dtype),
                        0.0).to(out_dtype)
    return embed, has, torch.where(has, frames - 1, -1), residual, scale


def _cif_tail(prefix: Tensor, tokens: Tensor, frames: Tensor, partial: Tensor,
              threshold: float, tail_threshold: Optional[float], tail_normalize: bool,
              out_dtype: torch.dtype):
    """The contract's tail token from a state of :func:`_cif_chunk`.

    The residual ``r = prefix - tokens * beta`` (as cif_scan_row) is emitted when
    ``tail_threshold`` is set, ``frames > 0``, ``r > 0`` and ``r >= tail_threshold``:
    ``partial`` scaled by ``beta / r`` in float64 (``tail_normalize``) or as is, cast to
    ``out_dtype``. Returns (tail_embed [B, D], has_tail [B] bool, tail_frame [B] int64:
    ``frames - 1``, -1 without a tail).
    """
    return _tail(prefix, tokens, frames, partial, threshold, tail_threshold, tail_normalize,
                 out_dtype)[:3]


def _cif_forward_decomposition(hidden, alphas, lengths, target_lengths, threshold, scale_eps,
                               tail_threshold, tail_normalize, max_tokens):
    """``cifops::cif_forward`` in standard tensor operations: the same six outputs, the
    scan workspace filled as cif_scan_row fills it. Value errors cannot raise in a graph:
    an utterance with negative/NaN/inf alphas, a length outside [0, T], a negative target
    or a positive target for weights summing to zero (or integrating past 2^53
    thresholds) emits no tokens, and its status is in the workspace, as the CUDA kernel
    does with max_tokens."""
    if max_tokens < 0:
        raise ValueError(
            "cifops.cif: max_tokens=None cannot be exported: the number of tokens, and so "
            "the output width, depends on the alphas' values; pass max_tokens=N (an upper "
            "bound on the tokens per utterance) to cifops.cif or cifops.Cif")
    B, T, D = hidden.shape
    beta = _f64(threshold, hidden)
    dev = hidden.device
    t_idx = torch.arange(T, device=dev)
    a = alphas.to(_F64)
    L = torch.full((B,), T, dtype=_I64, device=dev) if lengths is None else lengths.to(_I64)
    valid = t_idx < L[:, None]
    bad = valid & ~((a >= 0) & (a - a == 0))  # as cif_scan_row: NaN, -x, +inf
    a = torch.where(valid & ~bad, a, 0.0)
    S = torch.cumsum(torch.cat([a.new_zeros((B, 1)), a], 1), 1)[:, -1]  # sequential sum
    zero = torch.zeros_like(L)
    status = torch.where(bad.any(1), _BAD_ALPHA, zero)
    scale = None
    if target_lengths is not None:
        tgt = target_lengths.to(_I64)
        positive = S > 0
        scale = torch.where(positive, (beta * tgt.to(_F64) + _f64(scale_eps, hidden))
                            / torch.where(positive, S, 1.0), 0.0)
        status = torch.where(tgt < 0, _BAD_TARGET,
                             torch.where((status == 0) & ~positive & (tgt > 0),
                                         _ZERO_SUM_TARGET, status))
    status = torch.where((L < 0) | (L > T), _BAD_LENGTH, status)
    run = status == 0
    (embeds, _, fire_frames, P_end, n, consumed, partial, P,
     F) = _chunk(hidden, torch.where(run[:, None], a, 0.0), torch.where(run, L, 0),
                 torch.zeros_like(S), zero, zero, hidden.new_zeros((B, D), dtype=_acc_dtype(hidden.dtype)),
                 threshold, scale, max_tokens)
    big = valid & (P[:, 1:] / beta >= _TOO_MANY)
    status = torch.where(run & big.any(1), _TOO_MANY_TOKENS, status)
    ok = status == 0
    where = torch.where(status == _BAD_ALPHA, torch.where(bad, t_idx, T).amin(1),
                        torch.where(status == _TOO_MANY_TOKENS,
                                    torch.where(big, t_idx, T).amin(1), -1))
    tail, has, tail_frame, residual, tail_scale = _tail(
        P_end, n, consumed, partial, threshold, tail_threshold, tail_normalize, partial.dtype)
    n = torch.where(ok, n, 0)
    has = has & ok
    total = n + has.to(_I64)
    slot = has[:, None] & (torch.arange(max_tokens, device=dev) == n[:, None])
    embeds = torch.where(ok[:, None, None], torch.where(slot[..., None], tail[:, None, :],
                                                        embeds), 0.0).to(hidden.dtype)
    fire_frames = torch.where(ok[:, None], torch.where(slot, tail_frame[:, None], fire_frames),
                              -1)
    # the workspace of an invalid utterance: as cif_scan_row leaves it
    reached_sum = (status == 0) | (status >= _ZERO_SUM_TARGET)
    alpha_sum = torch.where(reached_sum, S, 0.0)
    if scale is None:
        scale = torch.ones_like(S)
    # the fields of CifRowReal and CifRowInfo (csrc/cif/cif.h), in their order
    row_real = torch.stack([
        torch.where((status == 0) | (status == _TOO_MANY_TOKENS), scale, 1.0),
        torch.where(has, tail_scale, 1.0), alpha_sum, torch.where(ok, residual, 0.0)], 1)
    row_info = torch.stack([
        total, n, has.to(_I64), torch.where(ok, L, 0), status, where,
        torch.full_like(L, int(target_lengths is not None))], 1)
    scan_real = torch.cat([torch.where(ok[:, None], P, 0.0).reshape(-1), row_real.reshape(-1)])
    scan_int = torch.cat([torch.where(ok[:, None], F, 0).reshape(-1), row_info.reshape(-1)])
    return (embeds, torch.clamp(total, max=max_tokens), fire_frames,
            alpha_sum.to(_acc_dtype(alphas.dtype)), scan_real, scan_int)


def _cif_stream_step_decomposition(hidden, alphas, lengths, prefix, tokens, frames, partial,
                                   threshold, max_tokens):
    """``cifops::cif_stream_step`` in standard tensor operations (:func:`_cif_chunk`).
    Value errors cannot raise in a graph: an utterance whose state is not one a step
    returns (:func:`stream_state_error`), or whose chunk has a length outside [0, Tc] or
    a negative/NaN/inf valid alpha (or integrates past 2^53 thresholds) emits no tokens
    and keeps its state, as the CUDA kernel does with max_tokens."""
    if max_tokens < 0:
        raise ValueError(
            "cifops.cif_stream_step: max_tokens=None cannot be exported: the output width "
            "depends on the alphas' values; pass max_tokens=N (the most tokens one chunk can "
            "complete) to cifops.cif_stream_step or cifops.CifStream")
    B, T, _ = hidden.shape
    L = torch.full_like(frames, T) if lengths is None else lengths.to(_I64)
    valid = torch.arange(T, device=hidden.device) < L[:, None]
    a = alphas.to(_F64)
    bad = ((L < 0) | (L > T) | (valid & ~((a >= 0) & (a - a == 0))).any(1)
           | (stream_state_error(prefix, tokens, frames, threshold) != 0))
    clean = torch.where(bad[:, None], 0.0, a)  # no NaN/inf inside the graph's sums
    zero = torch.zeros_like(tokens)  # and a bad state's values in no index
    out = _chunk(hidden, clean, torch.where(bad, 0, L), torch.where(bad, 0.0, prefix),
                 torch.where(bad, zero, tokens), torch.where(bad, zero, frames), partial,
                 threshold, None, max_tokens)
    bad = bad | (out[3] / _f64(threshold, prefix) >= _TOO_MANY)
    embeds, counts, fires, new_prefix, new_tokens, new_frames, new_partial = out[:7]
    return (torch.where(bad[:, None, None], 0.0, embeds).to(hidden.dtype),
            torch.where(bad, 0, counts), torch.where(bad[:, None], -1, fires),
            torch.where(bad, prefix, new_prefix), torch.where(bad, tokens, new_tokens),
            torch.where(bad, frames, new_frames), torch.where(bad[:, None], partial, new_partial))


def export_decompositions():
    """The decomposition table for ``ExportedProgram.run_decompositions``: torch.export's
    default table plus ``cifops::cif_forward`` and ``cifops::cif_stream_step`` written in
    standard tensor operations, so that the exported program no longer contains the custom
    ops (ONNX, or any runtime without cifops). The ops must be called with ``max_tokens``
    (a fixed output width).

    Example::

        ep = torch.export.export(model, (hidden, alphas, lengths),
                                 dynamic_shapes=...)
        ep = ep.run_decompositions(cifops.export_decompositions())
    """
    default = getattr(torch.export, "default_decompositions", None)  # torch >= 2.6
    table = default() if default is not None else torch._decomp.core_aten_decompositions()
    table[torch.ops.cifops.cif_forward.default] = _cif_forward_decomposition
    table[torch.ops.cifops.cif_stream_step.default] = _cif_stream_step_decomposition
    return table


def onnx_export(model, args, f=None, *, dynamic_shapes=None, **kwargs):
    """Export a model that calls :func:`cifops.cif` (with ``max_tokens``) to ONNX.

    ``torch.export.export(model, args, dynamic_shapes=dynamic_shapes)``, then
    ``run_decompositions(cifops.export_decompositions())``, then
    ``torch.onnx.export(program, args, f, dynamo=True, **kwargs)``; returns its
    ``ONNXProgram``. The graph holds only standard ONNX operators (float64 prefix sums
    included, so fire decisions are those of eager PyTorch where the cumsum adds
    sequentially, as on the CPU) and runs in ONNX Runtime.

    Example::

        model = torch.nn.Sequential(...)  # whose forward calls cifops.cif(..., max_tokens=64)
        B, T = torch.export.Dim("B"), torch.export.Dim("T")
        cifops.onnx_export(model, (hidden, alphas, lengths), "model.onnx",
                           dynamic_shapes=({0: B, 1: T}, {0: B, 1: T}, {0: B}))

    torch.export specialises a dimension whose example size is 0 or 1: give example inputs
    with B, T >= 2 for the dynamic dimensions (the graph then runs with B = 1 or T = 1 too).
    """
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    program = program.run_decompositions(export_decompositions())
    return torch.onnx.export(program, args, f, dynamo=True, **kwargs)


# --- torch.jit.script ----------------------------------------------------------
# TorchScript cannot compile cif() (keyword-only arguments, Python-only checks). When a
# scripted function or module calls cif, torch.jit.script compiles what
# cif.__prepare_scriptable__() returns instead: this twin, which takes the same
# arguments (positionally or by keyword) and calls the op, whose kernels check them.

def _cif_script(hidden: Tensor, alphas: Tensor, lengths: Optional[Tensor] = None,
                threshold: float = 1.0, target_lengths: Optional[Tensor] = None,
                scale_eps: float = 1e-4, tail_threshold: Optional[float] = None,
                tail_mode: str = "normalize", max_tokens: Optional[int] = None) -> CifOutput:
    """cifops.cif as TorchScript compiles it (see cif.__prepare_scriptable__)."""
    # refuse_forward_mode (cifops/_checks.py) in TorchScript: the op has no forward-mode
    # formula, and a tangent would otherwise be dropped (torch.func.jvp gave zeros). The
    # dual level is always 0 (forward AD does not nest); an empty input carries no tangent.
    if (torch._VF._unpack_dual(hidden, 0)[1].numel() > 0
            or torch._VF._unpack_dual(alphas, 0)[1].numel() > 0):
        raise RuntimeError("cifops.cif: forward-mode differentiation (torch.func.jvp, jacfwd, "
                           "torch.autograd.forward_ad) is not supported; use reverse mode, "
                           "Tensor.backward() or torch.autograd.grad")
    if tail_mode != "keep" and tail_mode != "normalize":
        raise ValueError("cifops.cif: tail_mode must be 'keep' or 'normalize', got " + tail_mode)
    width = -1
    if max_tokens is not None:
        if max_tokens < 0:
            raise ValueError("cifops.cif: max_tokens must be an int in [0, 2**63 - 1] or None, "
                             "got " + str(max_tokens))
        width = max_tokens
    out = torch.ops.cifops.cif_forward(hidden, alphas, lengths, target_lengths, threshold,
                                       scale_eps, tail_threshold, tail_mode == "normalize",
                                       width)
    return CifOutput(out[0], out[1], out[2], out[3])


cif.__prepare_scriptable__ = lambda: _cif_script
