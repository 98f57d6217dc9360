"""cifops.cif: continuous integrate-and-fire as a torch custom op.

The contract (docs/cif-semantics.md, repeated in cif's docstring) is
implemented by hand-written CPU and CUDA kernels (csrc/cif/). This module
registers their autograd and fake (meta) kernels with torch.library and wraps
them in the public function and an nn.Module.
"""

import operator
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from cifops import _C
from cifops._checks import (
    call_op,
    check_float,
    check_rank,
    check_same_device,
    check_tensor,
    compute_dtype,
    no_double_backward,
    refuse_forward_mode,
)

_TAIL_MODES = ("keep", "normalize")
_INT64_MAX = 2**63 - 1
# Per-utterance fields of the scan workspace (kRowReal, kRowInfo in csrc/cif/cif.h).
_ROW_REAL, _ROW_INFO = _C.cif_row_real, _C.cif_row_info


def _workspace_size(B, T):
    """(len(scan_real), len(scan_int)): cif_workspace_size in csrc/cif/cif.h (exported as
    cifops._C.cif_workspace_size), here for the fake kernel, whose B and T may be symbolic."""
    return B * (T + 1) + B * _ROW_REAL, B * T + B * _ROW_INFO


class CifOutput(NamedTuple):
    """Result of :func:`cif`.

    embeds:        [B, N, D], hidden's dtype; zero beyond each token_lengths[b].
    token_lengths: [B] int64, tokens emitted (complete + tail), at most N.
    fire_frames:   [B, N] int64, frame index at which each token fired, -1 in padding.
    alpha_sum:     [B], unscaled sum of the valid alphas, float32 (float64 for float64
                   alphas: a float16 sum would overflow at 65504); differentiable, the
                   quantity loss is |alpha_sum - target_lengths|.
    """

    embeds: Tensor
    token_lengths: Tensor
    fire_frames: Tensor
    alpha_sum: Tensor


# --- fake kernels: shapes only, so torch.compile can trace the op ---------------
# The kernels check the arguments (check_cif_args and check_cif_backward_args in
# csrc/cif/cif_host.h); a fake kernel checks only what its shapes need and that the
# tensors are on one device: it also runs for a call with one meta argument among real
# ones (the meta dispatch key wins), which would otherwise return uninitialised real
# tensors. Other bad metadata traces, and the kernel names it when the graph runs.


@torch.library.register_fake("cifops::cif_forward")
def _cif_forward_fake(
    hidden, alphas, lengths, target_lengths, threshold, scale_eps, tail_threshold, tail_normalize, max_tokens
):
    fn = "cifops.cif"
    check_rank(fn, "hidden", hidden, 3, "[B, T, D]")
    check_float(fn, "alphas", alphas)  # alpha_sum's dtype
    check_same_device(fn, "hidden", hidden, alphas=alphas, lengths=lengths, target_lengths=target_lengths)
    B, T, D = hidden.shape
    if max_tokens >= 0:
        n = max_tokens
    else:
        try:
            ctx = torch.library.get_ctx()
        except RuntimeError as exc:  # meta tensors, not FakeTensors
            raise RuntimeError(
                "cifops.cif: meta tensors need max_tokens: the number of tokens depends on "
                "the alphas' values, which meta tensors do not have (give max_tokens, or "
                "trace with FakeTensors as torch.compile does)"
            ) from exc
        n = ctx.new_dynamic_size()
    real, ints = _workspace_size(B, T)
    return (
        hidden.new_empty((B, n, D)),
        hidden.new_empty((B,), dtype=torch.int64),
        hidden.new_empty((B, n), dtype=torch.int64),
        alphas.new_empty((B,), dtype=compute_dtype(alphas.dtype)),
        hidden.new_empty((real,), dtype=torch.float64),
        hidden.new_empty((ints,), dtype=torch.int64),
    )


@torch.library.register_fake("cifops::cif_backward")
def _cif_backward_fake(
    grad_embeds,
    grad_alpha_sum,
    hidden,
    alphas,
    scan_real,
    scan_int,
    threshold,
    scale_eps,
    tail_threshold,
    tail_normalize,
):
    check_same_device("cifops.cif", "hidden", hidden, alphas=alphas)
    check_same_device(
        "cifops.cif_backward",
        "hidden",
        hidden,
        grad_embeds=grad_embeds,
        grad_alpha_sum=grad_alpha_sum,
        scan_real=scan_real,
        scan_int=scan_int,
    )
    return torch.empty_like(hidden), torch.empty_like(alphas)


# --- autograd: the backward is its own op ---------------------------------------

# The Autograd kernel of cifops::cif_forward, registered directly on the dispatcher. It
# is what torch.library.register_autograd would build, less the per-call work that makes
# that one slow for an op of nine arguments (its setup_context path rebuilds the schema's
# argument list several times per call, and the backward op went through its own
# autograd kernel): the forward runs the op below autograd and saves the scan workspace
# (prefix sums, fire counts, per-utterance results) with the inputs, so the backward runs
# no second scan; the backward calls cifops::cif_backward below autograd too, unless a
# graph of the backward is being recorded (create_graph=True), where that op's autograd
# kernel (no_double_backward) must see the call. benchmarks/bench_host_time.py measures it.
# It is the one formula registered this way: every other (contrastive_forward's, and the
# refusals of cif_backward, contrastive_backward and cif_stream_step) uses the public
# torch.library.register_autograd. Through register_autograd, cif_forward's own host time
# per forward+backward measured ~95 us against ~45 us here (bench_host_time, cif_step -
# torch_ref, issue 29); the contrastive loss, one call per training step beside its
# milliseconds of kernels, keeps the public API instead of a second hand-written kernel
# on torch's private _AutoDispatchBelowAutograd.
_FORWARD_OP = torch.ops.cifops.cif_forward.default
_BACKWARD_OP = torch.ops.cifops.cif_backward.default


class _CifAutograd(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, alphas, lengths, target_lengths, threshold, scale_eps, tail_threshold, tail_normalize, max_tokens
    ):
        with torch._C._AutoDispatchBelowAutograd():
            out = _FORWARD_OP(
                hidden,
                alphas,
                lengths,
                target_lengths,
                threshold,
                scale_eps,
                tail_threshold,
                tail_normalize,
                max_tokens,
            )
        ctx.save_for_backward(hidden, alphas, out[4], out[5])
        ctx.args = (threshold, scale_eps, tail_threshold, tail_normalize)
        return out

    @staticmethod
    def backward(ctx, grad_embeds, grad_token_lengths, grad_fire_frames, grad_alpha_sum, grad_scan_real, grad_scan_int):
        hidden, alphas, scan_real, scan_int = ctx.saved_tensors
        if grad_embeds is None:
            grad_embeds = hidden.new_zeros((hidden.shape[0], 0, hidden.shape[2]))
        args = (grad_embeds, grad_alpha_sum, hidden, alphas, scan_real, scan_int, *ctx.args)
        if torch.is_grad_enabled():
            grad_hidden, grad_alphas = _BACKWARD_OP(*args)
        else:
            with torch._C._AutoDispatchBelowAutograd():
                grad_hidden, grad_alphas = _BACKWARD_OP(*args)
        return grad_hidden, grad_alphas, None, None, None, None, None, None, None


def _cif_forward_autograd(
    hidden, alphas, lengths, target_lengths, threshold, scale_eps, tail_threshold, tail_normalize, max_tokens
):
    args = (hidden, alphas, lengths, target_lengths, threshold, scale_eps, tail_threshold, tail_normalize, max_tokens)
    # here rather than in cif(): a module traced with torch.jit.trace calls the op, not
    # cif(), and forward mode through it would give a silently zero tangent
    refuse_forward_mode("cifops.cif", hidden, alphas)
    if torch.is_grad_enabled() and (hidden.requires_grad or alphas.requires_grad):
        return _CifAutograd.apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return _FORWARD_OP(*args)


_LIB = torch.library.Library("cifops", "FRAGMENT")
_LIB.impl("cif_forward", _cif_forward_autograd, "Autograd")
# The backward is not differentiable: a second-order gradient raises, naming the op,
# instead of silently being zero.
torch.library.register_autograd("cifops::cif_backward", no_double_backward("cifops.cif"))


# --- the public API ----------------------------------------------------------------


def cif(
    hidden: Tensor,
    alphas: Tensor,
    lengths: Optional[Tensor] = None,
    *,
    threshold: float = 1.0,
    target_lengths: Optional[Tensor] = None,
    scale_eps: float = 1e-4,
    tail_threshold: Optional[float] = None,
    tail_mode: str = "normalize",
    max_tokens: Optional[int] = None,
) -> CifOutput:
    r"""Continuous integrate-and-fire: integrate frame weights into token embeddings.

    Per utterance b with valid length L_b, prefix sums in float64
    ``P_0 = 0, P_t = P_{t-1} + alpha_t`` place frame t on ``[P_{t-1}, P_t)`` and token
    k on ``[k*threshold, (k+1)*threshold)``; the weight of frame t in token k is their
    overlap ``w_{t,k}`` and the token embedding is ``c_k = sum_t w_{t,k} h_t``.
    ``floor(P_L / threshold)`` complete tokens fire (a frame whose weight exceeds the
    threshold fires several); token k fires at the frame with
    ``P_{t-1} < (k+1)*threshold <= P_t``. The residual ``r = P_L - n*threshold`` is
    emitted as one more token when ``tail_threshold`` is set and ``r >= tail_threshold``
    (and ``r > 0``): raw (``tail_mode="keep"``) or scaled by ``threshold / r``
    (``"normalize"``); its fire frame is ``L_b - 1``.

    With ``target_lengths`` (training), the alphas are first scaled by
    ``(threshold * target_lengths + scale_eps) / sum(alpha)`` so that exactly
    ``target_lengths`` tokens fire; gradients flow through the scaling.

    Args:
        hidden: [B, T, D] float16/bfloat16/float32/float64 frame features.
        alphas: [B, T] float16/bfloat16/float32/float64, >= 0 and finite, the frame
            weights (any of the four dtypes, whatever hidden's).
        lengths: [B] integer valid lengths in [0, T]; None: all T frames are valid.
            Frames t >= lengths[b] count as weight 0 and get zero gradient.
        threshold: the firing threshold beta (> 0).
        target_lengths: [B] integer target token counts (training-time scaling).
        scale_eps: the eps of the scaling, in [0, threshold); checked (and used) only
            with target_lengths.
        tail_threshold: emit the incomplete last token when its weight reaches this; None
            drops it (the usual choice in training).
        tail_mode: "normalize" or "keep" (see above).
        max_tokens: the output width N. Tokens beyond it are dropped, and no
            device-to-host synchronisation happens, so the op can be captured in a CUDA
            graph and traced by ``torch.compile(fullgraph=True)``. None: N is the largest
            token count in the batch (one small device-to-host copy on CUDA). An int (or
            numpy integer) in [0, 2**63 - 1] whose outputs fit in memory; required for
            meta tensors.

    All tensors must be on one device (a meta tensor among real ones is an error that
    names it).

    Returns:
        :class:`CifOutput` ``(embeds [B, N, D], token_lengths [B] int64,
        fire_frames [B, N] int64, alpha_sum [B])``. ``embeds`` has hidden's dtype;
        ``alpha_sum`` is float32 for float16/bfloat16/float32 alphas (a float16 sum
        would overflow at 65504) and float64 for float64.

    Differentiable with respect to ``hidden`` and ``alphas`` (through the scaling, the
    tail normalisation and ``alpha_sum``), with the fire decisions held fixed, in
    reverse mode and to first order: ``backward()`` and ``torch.autograd.grad`` work;
    a second-order gradient (differentiating a gradient taken with
    ``create_graph=True``), forward mode (``torch.func.jvp``, ``torch.autograd.forward_ad``)
    and the differentiating ``torch.func`` transforms (``grad``, ``vjp``, ``jacrev``, ...)
    with respect to its inputs raise. ``torch.func.vmap`` works.
    Accumulation is in float32 for float16/bfloat16/float32 inputs and float64 for
    float64; fire decisions are identical on CPU and CUDA.

    Value errors (negative/NaN/inf alphas, lengths outside [0, T], a positive target
    for weights that sum to zero) raise on CPU, and on CUDA when ``max_tokens`` is None.
    On CUDA with ``max_tokens`` given (no synchronisation), such an utterance emits no
    tokens instead.
    """
    check_tensor("cifops.cif", "hidden", hidden)
    check_tensor("cifops.cif", "alphas", alphas)
    check_tensor("cifops.cif", "lengths", lengths, optional=True)
    check_tensor("cifops.cif", "target_lengths", target_lengths, optional=True)
    # checked here as well as in the op: a meta tensor among real ones would otherwise go
    # to the fake kernel, whose error comes from inside torch.library
    check_same_device(
        "cifops.cif", "hidden", hidden, exc=ValueError, alphas=alphas, lengths=lengths, target_lengths=target_lengths
    )
    if tail_mode not in _TAIL_MODES:
        raise ValueError(f"cifops.cif: tail_mode must be 'keep' or 'normalize', got {tail_mode!r}")
    max_tokens = _max_tokens(max_tokens)
    threshold = _float_arg("cifops.cif", "threshold", threshold)
    scale_eps = _float_arg("cifops.cif", "scale_eps", scale_eps)
    tail_threshold = _float_arg("cifops.cif", "tail_threshold", tail_threshold)
    out = call_op(
        "cifops.cif",
        torch.ops.cifops.cif_forward,
        hidden,
        alphas,
        lengths,
        target_lengths,
        float(threshold),
        float(scale_eps),
        tail_threshold,
        tail_mode == "normalize",
        max_tokens,
    )
    return CifOutput(*out[:4])


# --- torch.jit.script ----------------------------------------------------------
# TorchScript cannot compile cif() (keyword-only arguments, Python-only checks). When a
# scripted function or module calls cif, torch.jit.script compiles what
# cif.__prepare_scriptable__() returns instead: this twin, which takes the same
# arguments (positionally or by keyword) and calls the op, whose kernels check them.


def _cif_script(
    hidden: Tensor,
    alphas: Tensor,
    lengths: Optional[Tensor] = None,
    threshold: float = 1.0,
    target_lengths: Optional[Tensor] = None,
    scale_eps: float = 1e-4,
    tail_threshold: Optional[float] = None,
    tail_mode: str = "normalize",
    max_tokens: Optional[int] = None,
) -> CifOutput:
    """cifops.cif as TorchScript compiles it (see cif.__prepare_scriptable__)."""
    # refuse_forward_mode (cifops/_checks.py) in TorchScript: the op has no forward-mode
    # formula, and a tangent would otherwise be dropped (torch.func.jvp gave zeros). The
    # dual level is always 0 (forward AD does not nest); an empty input carries no tangent.
    if torch._VF._unpack_dual(hidden, 0)[1].numel() > 0 or torch._VF._unpack_dual(alphas, 0)[1].numel() > 0:
        raise RuntimeError(
            "cifops.cif: forward-mode differentiation (torch.func.jvp, jacfwd, "
            "torch.autograd.forward_ad) is not supported; use reverse mode, "
            "Tensor.backward() or torch.autograd.grad"
        )
    if tail_mode != "keep" and tail_mode != "normalize":
        raise ValueError("cifops.cif: tail_mode must be 'keep' or 'normalize', got " + tail_mode)
    width = -1
    if max_tokens is not None:
        if max_tokens < 0:
            raise ValueError("cifops.cif: max_tokens must be an int in [0, 2**63 - 1] or None, got " + str(max_tokens))
        width = max_tokens
    out = torch.ops.cifops.cif_forward(
        hidden, alphas, lengths, target_lengths, threshold, scale_eps, tail_threshold, tail_mode == "normalize", width
    )
    return CifOutput(out[0], out[1], out[2], out[3])


cif.__prepare_scriptable__ = lambda: _cif_script


def _max_tokens(max_tokens, fn="cifops.cif") -> int:
    """max_tokens as the op's int (-1 for None): an int or numpy integer in [0, 2**63 - 1]."""
    if max_tokens is None:
        return -1
    value = None
    if not isinstance(max_tokens, bool):
        try:
            value = operator.index(max_tokens)
        except TypeError:
            pass
    if value is None or not 0 <= value <= _INT64_MAX:
        raise ValueError(f"{fn}: max_tokens must be an int in [0, 2**63 - 1] or None, got {max_tokens!r}")
    return value


def _float_arg(fn, name, value):
    """A float option of an op as a Python float (None stays None). A tensor works in eager
    mode; one whose value torch.export cannot read (a buffer is a fake tensor while
    tracing) raises naming the option and what to do, instead of a
    GuardOnDataDependentSymNode."""
    if not isinstance(value, Tensor):
        return None if value is None else float(value)
    try:
        return float(value)
    except Exception as exc:
        if not torch.compiler.is_exporting():
            raise
        raise ValueError(
            f"{fn}: {name} is a tensor whose value torch.export cannot read (a module's "
            f"buffer or parameter is traced without its value); the op takes it as a Python "
            f"float, fixed in the exported graph: pass a Python float (keep it as a float "
            f"attribute of the module, not a buffer)"
        ) from exc


class Cif(torch.nn.Module):
    """:func:`cif` as a module; the keyword arguments of :func:`cif` are its settings.

    ``forward(hidden [B, T, D], alphas [B, T], lengths [B] = None, target_lengths [B] = None)``
    returns a :class:`CifOutput`.
    """

    # the settings' types, for torch.jit.script (which would otherwise type threshold=1 as int)
    threshold: float
    scale_eps: float
    tail_threshold: Optional[float]
    tail_mode: str
    max_tokens: Optional[int]

    def __init__(
        self,
        threshold: float = 1.0,
        scale_eps: float = 1e-4,
        tail_threshold: Optional[float] = None,
        tail_mode: str = "normalize",
        max_tokens: Optional[int] = None,
    ):
        super().__init__()
        self.threshold = threshold
        self.scale_eps = scale_eps
        self.tail_threshold = tail_threshold
        self.tail_mode = tail_mode
        self.max_tokens = max_tokens

    def forward(
        self, hidden: Tensor, alphas: Tensor, lengths: Optional[Tensor] = None, target_lengths: Optional[Tensor] = None
    ) -> CifOutput:
        return cif(
            hidden,
            alphas,
            lengths,
            threshold=self.threshold,
            target_lengths=target_lengths,
            scale_eps=self.scale_eps,
            tail_threshold=self.tail_threshold,
            tail_mode=self.tail_mode,
            max_tokens=self.max_tokens,
        )

    def extra_repr(self) -> str:
        return (
            f"threshold={self.threshold}, tail_threshold={self.tail_threshold}, "
            f"tail_mode={self.tail_mode!r}, max_tokens={self.max_tokens}"
        )
