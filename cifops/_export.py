"""Export of cifops.cif and cifops.cif_stream_step for torch.export and ONNX.

The CPU and CUDA kernels of ``cifops::cif_forward`` and ``cifops::cif_stream_step`` are
opaque to exporters. :func:`export_decompositions` gives ``ExportedProgram.run_decompositions``
each op written in standard tensor operations, by the loop-free CIF of
cifops/_cif_math.py, and ``torch.onnx.export(..., dynamo=True)`` turns them into standard
ONNX operators (:func:`onnx_export`; docs/export.md).
"""

import torch

from cifops import _C
from cifops._checks import compute_dtype
from cifops._cif_math import TOO_MANY_THRESHOLDS, chunk_scan, f64, stream_state_error, tail_scan

__all__ = ["export_decompositions", "onnx_export"]

_F64, _I64 = torch.float64, torch.int64
_STATUS = _C.cif_status  # CifStatus in csrc/cif/cif.h


def _cif_forward_decomposition(
    hidden, alphas, lengths, target_lengths, threshold, scale_eps, tail_threshold, tail_normalize, max_tokens
):
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
            "bound on the tokens per utterance) to cifops.cif or cifops.Cif"
        )
    B, T, D = hidden.shape
    beta = f64(threshold, hidden)
    dev = hidden.device
    t_idx = torch.arange(T, device=dev)
    a = alphas.to(_F64)
    L = torch.full((B,), T, dtype=_I64, device=dev) if lengths is None else lengths.to(_I64)
    valid = t_idx < L[:, None]
    bad = valid & ~((a >= 0) & (a - a == 0))  # as cif_scan_row: NaN, -x, +inf
    a = torch.where(valid & ~bad, a, 0.0)
    S = torch.cumsum(torch.cat([a.new_zeros((B, 1)), a], 1), 1)[:, -1]  # sequential sum
    zero = torch.zeros_like(L)
    status = torch.where(bad.any(1), _STATUS["bad_alpha"], zero)
    scale = None
    if target_lengths is not None:
        tgt = target_lengths.to(_I64)
        positive = S > 0
        scale = torch.where(
            positive, (beta * tgt.to(_F64) + f64(scale_eps, hidden)) / torch.where(positive, S, 1.0), 0.0
        )
        status = torch.where(
            tgt < 0,
            _STATUS["bad_target"],
            torch.where((status == 0) & ~positive & (tgt > 0), _STATUS["zero_sum_target"], status),
        )
    status = torch.where((L < 0) | (L > T), _STATUS["bad_length"], status)
    run = status == 0
    (embeds, _, fire_frames, P_end, n, consumed, partial, P, F) = chunk_scan(
        hidden,
        torch.where(run[:, None], a, 0.0),
        torch.where(run, L, 0),
        torch.zeros_like(S),
        zero,
        zero,
        hidden.new_zeros((B, D), dtype=compute_dtype(hidden.dtype)),
        threshold,
        scale,
        max_tokens,
    )
    big = valid & (P[:, 1:] / beta >= TOO_MANY_THRESHOLDS)
    status = torch.where(run & big.any(1), _STATUS["too_many_tokens"], status)
    ok = status == 0
    where = torch.where(
        status == _STATUS["bad_alpha"],
        torch.where(bad, t_idx, T).amin(1),
        torch.where(status == _STATUS["too_many_tokens"], torch.where(big, t_idx, T).amin(1), -1),
    )
    tail, has, tail_frame, residual, tail_scale = tail_scan(
        P_end, n, consumed, partial, threshold, tail_threshold, tail_normalize, partial.dtype
    )
    n = torch.where(ok, n, 0)
    has = has & ok
    total = n + has.to(_I64)
    slot = has[:, None] & (torch.arange(max_tokens, device=dev) == n[:, None])
    embeds = torch.where(ok[:, None, None], torch.where(slot[..., None], tail[:, None, :], embeds), 0.0).to(
        hidden.dtype
    )
    fire_frames = torch.where(ok[:, None], torch.where(slot, tail_frame[:, None], fire_frames), -1)
    # the workspace of an invalid utterance: as cif_scan_row leaves it
    reached_sum = (status == 0) | (status >= _STATUS["zero_sum_target"])
    alpha_sum = torch.where(reached_sum, S, 0.0)
    if scale is None:
        scale = torch.ones_like(S)
    # the fields of CifRowReal and CifRowInfo (csrc/cif/cif.h), in their order
    row_real = torch.stack(
        [
            torch.where((status == 0) | (status == _STATUS["too_many_tokens"]), scale, 1.0),
            torch.where(has, tail_scale, 1.0),
            alpha_sum,
            torch.where(ok, residual, 0.0),
        ],
        1,
    )
    row_info = torch.stack(
        [
            total,
            n,
            has.to(_I64),
            torch.where(ok, L, 0),
            status,
            where,
            torch.full_like(L, int(target_lengths is not None)),
        ],
        1,
    )
    scan_real = torch.cat([torch.where(ok[:, None], P, 0.0).reshape(-1), row_real.reshape(-1)])
    scan_int = torch.cat([torch.where(ok[:, None], F, 0).reshape(-1), row_info.reshape(-1)])
    return (
        embeds,
        torch.clamp(total, max=max_tokens),
        fire_frames,
        alpha_sum.to(compute_dtype(alphas.dtype)),
        scan_real,
        scan_int,
    )


def _cif_stream_step_decomposition(hidden, alphas, lengths, prefix, tokens, frames, partial, threshold, max_tokens):
    """``cifops::cif_stream_step`` in standard tensor operations (:func:`cif_chunk`).
    Value errors cannot raise in a graph: an utterance whose state is not one a step
    returns (:func:`stream_state_error`), or whose chunk has a length outside [0, Tc] or
    a negative/NaN/inf valid alpha (or integrates past 2^53 thresholds) emits no tokens
    and keeps its state, as the CUDA kernel does with max_tokens."""
    if max_tokens < 0:
        raise ValueError(
            "cifops.cif_stream_step: max_tokens=None cannot be exported: the output width "
            "depends on the alphas' values; pass max_tokens=N (the most tokens one chunk can "
            "complete) to cifops.cif_stream_step or cifops.CifStream"
        )
    B, T, _ = hidden.shape
    L = torch.full_like(frames, T) if lengths is None else lengths.to(_I64)
    valid = torch.arange(T, device=hidden.device) < L[:, None]
    a = alphas.to(_F64)
    bad = (
        (L < 0)
        | (L > T)
        | (valid & ~((a >= 0) & (a - a == 0))).any(1)
        | (stream_state_error(prefix, tokens, frames, threshold) != 0)
    )
    clean = torch.where(bad[:, None], 0.0, a)  # no NaN/inf inside the graph's sums
    zero = torch.zeros_like(tokens)  # and a bad state's values in no index
    out = chunk_scan(
        hidden,
        clean,
        torch.where(bad, 0, L),
        torch.where(bad, 0.0, prefix),
        torch.where(bad, zero, tokens),
        torch.where(bad, zero, frames),
        partial,
        threshold,
        None,
        max_tokens,
    )
    bad = bad | (out[3] / f64(threshold, prefix) >= TOO_MANY_THRESHOLDS)
    embeds, counts, fires, new_prefix, new_tokens, new_frames, new_partial = out[:7]
    return (
        torch.where(bad[:, None, None], 0.0, embeds).to(hidden.dtype),
        torch.where(bad, 0, counts),
        torch.where(bad[:, None], -1, fires),
        torch.where(bad, prefix, new_prefix),
        torch.where(bad, tokens, new_tokens),
        torch.where(bad, frames, new_frames),
        torch.where(bad[:, None], partial, new_partial),
    )


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
