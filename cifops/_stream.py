"""Streaming CIF: cifops.cif_stream_step / cif_stream_flush and the CifStream module.

A chunk at a time, with the state of each utterance held in tensors (so that the step
exports with torch.export and ONNX like any function of tensors):

    state = None
    for hidden, alphas, lengths in chunks:            # [B, Tc, D], [B, Tc], [B]
        out, state = cifops.cif_stream_step(hidden, alphas, lengths, state, max_tokens=16)
        emit(out.embeds, out.token_lengths, out.fire_frames)
    emit(*cifops.cif_stream_flush(state, tail_threshold=0.5)[:3])

For every chunking, the tokens of the steps followed by the flush are those of
``cifops.cif`` on the whole input with the same threshold and tail options: the same
count and fire frames (the float64 prefix sum continues across chunks in the same
order), embeddings equal up to float rounding (docs/cif-semantics.md, "Streaming").
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from cifops import _C
from cifops._checks import FLOAT_DTYPES, check_rank, check_same_device, check_tensor, compute_dtype
from cifops._cif import _TAIL_MODES, CifOutput, _float_arg, _max_tokens
from cifops._cif_math import cif_tail, stream_state_error

_STATE = _C.cif_stream_state_error  # CifStreamStateError in csrc/cif/cif.h


class _StateTensors(NamedTuple):
    prefix: Tensor
    tokens: Tensor
    frames: Tensor
    partial: Tensor


class CifStreamState(_StateTensors):
    """Per-utterance state of a CIF stream (returned by :func:`cif_stream_step`).

    prefix:  [B] float64, the prefix sum of the alphas seen so far.
    tokens:  [B] int64, the complete tokens fired so far.
    frames:  [B] int64, the frames consumed so far.
    partial: [B, D], the weighted sum of the still-open token's frames, in the compute
             dtype (float32 for float16/bfloat16/float32 hidden, float64 for float64).

    A tuple of these four tensors; besides, ``threshold`` records the threshold of the
    steps that made the state (a float), so that a later step or the flush cannot use
    another. It is None for a state no step returned (:func:`cif_stream_state`, one
    built by hand or with ``_replace``): the call's threshold is then taken as given.
    """

    threshold: Optional[float] = None  # set on the states cif_stream_step returns


# The fake (meta) kernel: shapes only, so torch.compile and torch.export can trace a step.
# The kernels check the arguments (check_cif_stream_args in csrc/cif/cif_stream_host.h);
# this checks what its shapes need and that the tensors are on one device (a meta argument
# among real ones also comes here, and would get uninitialised real tensors back).
@torch.library.register_fake("cifops::cif_stream_step")
def _cif_stream_step_fake(hidden, alphas, lengths, prefix, tokens, frames, partial, threshold, max_tokens):
    fn = "cifops.cif_stream_step"
    check_rank(fn, "hidden", hidden, 3, "[B, Tc, D]")
    check_same_device(
        fn,
        "hidden",
        hidden,
        alphas=alphas,
        lengths=lengths,
        **{"state.prefix": prefix, "state.tokens": tokens, "state.frames": frames, "state.partial": partial},
    )
    B, _, D = hidden.shape
    if max_tokens >= 0:
        n = max_tokens
    else:
        try:
            n = torch.library.get_ctx().new_dynamic_size()
        except RuntimeError as exc:  # meta tensors, not FakeTensors
            raise RuntimeError("cifops.cif_stream_step: meta tensors need max_tokens") from exc
    return (
        hidden.new_empty((B, n, D)),
        hidden.new_empty((B,), dtype=torch.int64),
        hidden.new_empty((B, n), dtype=torch.int64),
        torch.empty_like(prefix),
        torch.empty_like(tokens),
        torch.empty_like(frames),
        torch.empty_like(partial),
    )


def _no_gradients(ctx, *grads):
    raise RuntimeError(
        "cifops.cif_stream_step: streaming CIF is for inference and has no "
        "gradients; train with cifops.cif on whole utterances (its results "
        "are the same), or call the step under torch.no_grad()"
    )


def _setup_nothing(ctx, inputs, output):
    pass


torch.library.register_autograd("cifops::cif_stream_step", _no_gradients, setup_context=_setup_nothing)


def cif_stream_state(batch: int, dim: int, *, dtype: torch.dtype = torch.float32, device=None) -> CifStreamState:
    """The state of ``batch`` fresh utterances with ``dim``-dimensional frames in ``dtype``
    (what ``cif_stream_step(..., state=None)`` starts from)."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"cifops.cif_stream_state: dtype must be float16, bfloat16, float32 or float64, got {dtype}")
    acc = compute_dtype(dtype)
    return CifStreamState(
        torch.zeros(batch, dtype=torch.float64, device=device),
        torch.zeros(batch, dtype=torch.int64, device=device),
        torch.zeros(batch, dtype=torch.int64, device=device),
        torch.zeros(batch, dim, dtype=acc, device=device),
    )


def _check_state(fn, state):
    if not isinstance(state, tuple) or len(state) != 4:
        raise TypeError(
            f"{fn}: state must be the CifStreamState a previous step returned "
            f"(or None to start), got {type(state).__name__}"
        )
    for name, x in zip(CifStreamState._fields, state):
        check_tensor(fn, f"state.{name}", x)
    return state if type(state) is CifStreamState else CifStreamState(*state)


def _stream_threshold(fn, threshold, state):
    """The threshold of a step or flush: the one given, which must be the state's record
    when it has one; not given, the state's record (1.0 without one)."""
    recorded = state.threshold if isinstance(state, CifStreamState) else None
    if threshold is None:
        return 1.0 if recorded is None else recorded
    threshold = _float_arg(fn, "threshold", threshold)
    if recorded is not None and threshold != recorded:
        raise ValueError(
            f"{fn}: threshold={threshold} but the state was made by steps at "
            f"threshold={recorded}: a stream keeps one threshold (pass the same, "
            f"or none to use the state's)"
        )
    return threshold


def _check_state_values(fn, state, error, threshold):
    """Raise for the first utterance whose state no step returns (error: its
    stream_state_error), naming the field, with the messages of throw_bad_stream_state in
    csrc/cif/cif_stream_host.h (the step's check). A device-to-host copy on CUDA."""
    bad = error.nonzero()
    if bad.numel() == 0:
        return
    b = int(bad[0, 0])
    code, prefix = int(error[b]), float(state.prefix[b])
    tokens, frames = int(state.tokens[b]), int(state.frames[b])
    edited = ": not a state that a step returned (edited, or from another stream?)"
    if code == _STATE["negative_frames"]:
        message = f"state.frames[{b}] = {frames} is negative{edited}"
    elif code == _STATE["negative_tokens"]:
        message = f"state.tokens[{b}] = {tokens} is negative{edited}"
    elif code == _STATE["bad_prefix"]:
        message = f"state.prefix[{b}] = {prefix:g} must be finite and >= 0{edited}"
    elif code == _STATE["prefix_no_frames"]:
        message = (
            f"state.prefix[{b}] = {prefix:g} but state.frames[{b}] = 0: a stream that "
            f"has seen no frame has prefix 0 (a recycled batch slot? start a new "
            f"utterance from cifops.cif_stream_state's zeros)"
        )
    else:
        message = (
            f"state.prefix[{b}] = {prefix:g} and state.tokens[{b}] = {tokens} disagree "
            f"at threshold {threshold:g}: a step leaves tokens = the number of "
            f"thresholds in prefix (from steps at another threshold, or edited?)"
        )
    raise ValueError(f"{fn}: {message}")


def _check_state_tensors(fn, state):
    """The flush's twin of the step's metadata checks: one device, shapes [B] and
    [B, D], dtypes float64, int64, int64 and float32/float64, naming the field."""
    devices = {name: x.device for name, x in zip(state._fields, state)}
    if len(set(devices.values())) > 1:
        raise ValueError(
            f"{fn}: the state's tensors must be on one device, got "
            + ", ".join(f"state.{n} on {d}" for n, d in devices.items())
        )
    B = state.prefix.shape[0] if state.prefix.dim() == 1 else None
    for name, x, dtypes in (
        ("prefix", state.prefix, (torch.float64,)),
        ("tokens", state.tokens, (torch.int64,)),
        ("frames", state.frames, (torch.int64,)),
        ("partial", state.partial, (torch.float32, torch.float64)),
    ):
        dims = 2 if name == "partial" else 1
        if x.dim() != dims or (B is not None and x.shape[0] != B):
            want = "[B, D]" if dims == 2 else "[B]"
            raise ValueError(
                f"{fn}: state.{name} must have shape {want} with B = "
                f"{B if B is not None else 'len(state.prefix)'}, got "
                f"{list(x.shape)}"
            )
        if x.dtype not in dtypes:
            raise ValueError(f"{fn}: state.{name} must be {' or '.join(str(d) for d in dtypes)}, got {x.dtype}")


def cif_stream_step(
    hidden: Tensor,
    alphas: Tensor,
    lengths: Optional[Tensor] = None,
    state: Optional[CifStreamState] = None,
    *,
    threshold: Optional[float] = None,
    max_tokens: Optional[int] = None,
):
    r"""Integrate the next chunk of a batch of streams; returns ``(CifOutput, new state)``.

    Args:
        hidden: [B, Tc, D] float16/bfloat16/float32/float64, the chunk's frames.
        alphas: [B, Tc], their weights (>= 0 and finite).
        lengths: [B] integers in [0, Tc], the chunk's valid frames per utterance (0 for an
            utterance that has ended or has nothing new); None: all Tc.
        state: the state the previous step returned for the same batch, or None at the
            start (:func:`cif_stream_state`).
        threshold: the firing threshold beta (> 0); the same for every step of a stream
            and its flush. None: the threshold the state records (1.0 for a new stream);
            a threshold other than the state's raises.
        max_tokens: the output width N, the most tokens one utterance can complete in
            this chunk (more are dropped from the output; the state stays exact). Given,
            no device-to-host synchronisation happens (CUDA); None: N is the largest
            count of the batch.

    Returns:
        ``(out, state)``: ``out`` is a :class:`CifOutput` of the tokens completed in this
        chunk: ``embeds`` [B, N, D] (hidden's dtype), ``token_lengths`` [B],
        ``fire_frames`` [B, N] counted from the utterance's first frame (-1 in padding),
        ``alpha_sum`` [B] the sum of the utterance's alphas so far (the state's float64
        prefix sum in the compute dtype of ``hidden``: float32, or float64 for float64
        hidden; ``cifops.cif`` follows the alphas' dtype). ``state`` is the new
        :class:`CifStreamState`.

    The tail (the incomplete last token) is emitted by :func:`cif_stream_flush`. Inference
    only: no gradients. Value errors (negative/NaN/inf alphas, lengths outside [0, Tc], a
    state that no step returns: negative frames or tokens, a negative or non-finite
    prefix, tokens that disagree with the prefix at this threshold) raise naming the
    argument or field on CPU, and on CUDA when max_tokens is None; on CUDA with
    max_tokens given such an utterance emits nothing in this chunk and keeps its state.
    """
    fn = "cifops.cif_stream_step"
    check_tensor(fn, "hidden", hidden)
    check_tensor(fn, "alphas", alphas)
    check_tensor(fn, "lengths", lengths, optional=True)
    if hidden.dim() != 3:
        raise ValueError(f"{fn}: hidden must be a 3-D tensor [B, Tc, D], got shape {tuple(hidden.shape)}")
    if state is None:
        if hidden.dtype not in FLOAT_DTYPES:  # else the op says it; here the default state would
            raise ValueError(f"{fn}: hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
        state = cif_stream_state(hidden.shape[0], hidden.shape[2], dtype=hidden.dtype, device=hidden.device)
    state = _check_state(fn, state)  # devices, shapes, dtypes and values: checked by the op
    threshold = _stream_threshold(fn, threshold, state)
    n = _max_tokens(max_tokens, fn)
    out = torch.ops.cifops.cif_stream_step(hidden, alphas, lengths, *state, threshold, n)
    new_state = CifStreamState(*out[3:])
    if not torch.compiler.is_compiling():
        new_state.threshold = threshold
    return CifOutput(out[0], out[1], out[2], _alpha_sum(new_state)), new_state


def _alpha_sum(state):
    return state.prefix.to(state.partial.dtype)


def cif_stream_flush(
    state: CifStreamState,
    *,
    threshold: Optional[float] = None,
    tail_threshold: Optional[float] = None,
    tail_mode: str = "normalize",
) -> CifOutput:
    """The tail token of each stream, under the contract's tail rule (cifops.cif).

    The residual ``r = prefix - tokens * threshold`` is emitted as one more token when
    ``tail_threshold`` is set, ``r >= tail_threshold`` and ``r > 0`` (and the stream saw a
    frame): raw (``tail_mode="keep"``) or scaled by ``threshold / r`` ("normalize"); its
    fire frame is the stream's last frame. ``threshold``: the steps' (None: the one the
    state records, 1.0 without a record; another raises). Returns a :class:`CifOutput`
    with N = 1: ``embeds`` [B, 1, D] in the state's compute dtype, ``token_lengths`` [B]
    (0 or 1), ``fire_frames`` [B, 1], ``alpha_sum`` [B]. The state is not changed (start
    the next utterances from None).

    The state is checked as the step checks it (one device, shapes, dtypes, and values a
    step can leave: ValueError naming the field; on CUDA, one device-to-host copy).
    """
    fn = "cifops.cif_stream_flush"
    state = _check_state(fn, state)
    _check_state_tensors(fn, state)
    if tail_mode not in _TAIL_MODES:
        raise ValueError(f"{fn}: tail_mode must be 'keep' or 'normalize', got {tail_mode!r}")
    threshold = _stream_threshold(fn, threshold, state)
    if not threshold > 0 or threshold == float("inf"):
        raise ValueError(f"{fn}: threshold must be a finite number > 0, got {threshold}")
    error = stream_state_error(state.prefix, state.tokens, state.frames, threshold)
    if not torch.compiler.is_compiling() and state.prefix.device.type != "meta":
        _check_state_values(fn, state, error, threshold)
    if tail_threshold is not None:
        tail_threshold = _float_arg(fn, "tail_threshold", tail_threshold)
        if not 0 <= tail_threshold < float("inf"):
            raise ValueError(f"{fn}: tail_threshold must be a finite number >= 0 or None, got {tail_threshold}")
    embed, has_tail, frame = cif_tail(*state, threshold, tail_threshold, tail_mode == "normalize", state.partial.dtype)
    ok = error == 0  # in a graph, which cannot raise: a bad state emits no tail
    return CifOutput(
        torch.where(ok[:, None], embed, 0.0).unsqueeze(1),
        (has_tail & ok).to(torch.int64),
        torch.where(ok, frame, -1).unsqueeze(1),
        _alpha_sum(state),
    )


class CifStream(torch.nn.Module):
    """A CIF stream that holds its state: ``out = stream(hidden, alphas, lengths)`` per
    chunk, ``stream.flush()`` at the end (the tail tokens), ``stream.reset()`` before the
    next batch of utterances. The settings are those of :func:`cif_stream_step` and
    :func:`cif_stream_flush`."""

    def __init__(
        self,
        threshold: float = 1.0,
        tail_threshold: Optional[float] = None,
        tail_mode: str = "normalize",
        max_tokens: Optional[int] = None,
    ):
        super().__init__()
        if tail_mode not in _TAIL_MODES:
            raise ValueError(f"cifops.CifStream: tail_mode must be 'keep' or 'normalize', got {tail_mode!r}")
        self.threshold = threshold
        self.tail_threshold = tail_threshold
        self.tail_mode = tail_mode
        self.max_tokens = max_tokens
        self.state: Optional[CifStreamState] = None
        self._dtype: Optional[torch.dtype] = None

    def forward(self, hidden: Tensor, alphas: Tensor, lengths: Optional[Tensor] = None) -> CifOutput:
        out, self.state = cif_stream_step(
            hidden, alphas, lengths, self.state, threshold=self.threshold, max_tokens=self.max_tokens
        )
        self._dtype = hidden.dtype
        return out

    def flush(self) -> CifOutput:
        """The tail tokens of the current utterances (see :func:`cif_stream_flush`), in the
        chunks' dtype."""
        if self.state is None:
            raise RuntimeError("cifops.CifStream.flush: no chunk has been integrated since the last reset")
        out = cif_stream_flush(
            self.state, threshold=self.threshold, tail_threshold=self.tail_threshold, tail_mode=self.tail_mode
        )
        return out._replace(embeds=out.embeds.to(self._dtype))  # hidden's dtype, as cif's

    def reset(self) -> None:
        """Forget the state: the next chunk starts new utterances."""
        self.state = None
        self._dtype = None

    def extra_repr(self) -> str:
        return (
            f"threshold={self.threshold}, tail_threshold={self.tail_threshold}, "
            f"tail_mode={self.tail_mode!r}, max_tokens={self.max_tokens}"
        )
