"""Argument checks and autograd guards shared by cifops.cif and cifops.contrastive_loss.

The kernels check their arguments in C++ (csrc/common/host.h, csrc/cif/cif_host.h,
csrc/contrastive/contrastive_host.h); what is here runs where they cannot: in the fake
(meta) kernels, which check what their shapes need and that the tensors are on one
device (a single meta argument among real ones also reaches them), in the public
functions, and around the autograd registrations, for the kinds of differentiation the
ops do not support.
"""

import torch
from torch import Tensor
import torch.autograd.forward_ad as fwAD

from cifops import _C

# The four floating dtypes the kernels take (is_supported_float in csrc/common/host.h), and
# the dtype each computes in (compute_type there, exported by csrc/ops.cpp).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_NAMES = "float16, bfloat16, float32 or float64"
_COMPUTE_DTYPES = {getattr(torch, k): getattr(torch, v) for k, v in _C.compute_dtypes.items()}


def compute_dtype(dtype):
    """The dtype an op computes in for inputs of ``dtype`` (float32 for the half types)."""
    return _COMPUTE_DTYPES[dtype]


def _shape(x):
    return list(x.shape)


def check_float(fn, name, x):
    """The kernels' dtype check of a floating argument, for a fake kernel that needs it."""
    torch._check(x.dtype in FLOAT_DTYPES, lambda: f"{fn}: {name} must be {_FLOAT_NAMES}, got {x.dtype}")


def check_rank(fn, name, x, rank, dims):
    """x.dim() == rank, else "<fn>: <name> must be a <rank>-D tensor <dims>, got shape [..]"."""
    torch._check(x.dim() == rank, lambda: f"{fn}: {name} must be a {rank}-D tensor {dims}, got shape {_shape(x)}")


def check_tensor(fn, name, x, optional=False):
    if x is None and optional:
        return
    if not isinstance(x, Tensor):
        kind = "a Tensor or None" if optional else "a Tensor"
        raise TypeError(f"{fn}: {name} must be {kind}, got {type(x).__name__}")


def check_same_device(fn, ref_name, ref, exc=RuntimeError, **tensors):
    """Raise exc(f"{fn}: {name} is on X but {ref_name} is on Y") for the first tensor of
    ``tensors`` (None skipped) not on ref's device: the message of check_same_device in
    csrc/common/host.h."""
    for name, x in tensors.items():
        if x is not None and x.device != ref.device:
            raise exc(f"{fn}: {name} is on {x.device} but {ref_name} is on {ref.device}")


def no_double_backward(fn):
    """An autograd formula for a backward op that refuses to be differentiated: without
    one, autograd only warns and a second-order gradient comes out as zero."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{fn}: second-order gradients are not supported: a gradient through {fn} taken "
            f"with create_graph=True is being differentiated again (for example "
            f"torch.autograd.grad(..., create_graph=True) and then backward(), a gradient "
            f"penalty, torch.autograd.functional.jvp or hessian). Only first-order gradients "
            f"are: take them without create_graph=True, or detach the inputs of {fn} in the "
            f"part of the graph that is differentiated twice."
        )

    return backward


def refuse_forward_mode(fn, *tensors):
    """Forward-mode AD has no formula for the ops: without this check the tangent of the
    output is silently zero (torch.func.jvp) or missing (torch.autograd.forward_ad)."""
    if torch.compiler.is_compiling():
        return
    for x in tensors:
        if isinstance(x, Tensor) and fwAD.unpack_dual(x).tangent is not None:
            raise RuntimeError(
                f"{fn}: forward-mode differentiation (torch.func.jvp, jacfwd, "
                f"torch.autograd.forward_ad) is not supported; use reverse mode, "
                f"Tensor.backward() or torch.autograd.grad"
            )


def call_op(fn, op, *args):
    """op(*args), with torch.func's error about autograd.Function internals (the
    autograd formulas registered with torch.library cannot run under its differentiating
    transforms) replaced by one that says what is supported."""
    if torch.compiler.is_compiling():
        return op(*args)
    try:
        return op(*args)
    except RuntimeError as exc:
        text = str(exc)
        if "functorch" not in text or "setup_context" not in text:
            raise
        raise RuntimeError(
            f"{fn}: torch.func transforms that differentiate through it (torch.func.grad, "
            f"grad_and_value, vjp, jacrev, hessian, ...) are not supported. Use "
            f"torch.autograd.grad or Tensor.backward() for its gradients. torch.func.vmap "
            f"works, and so do torch.func transforms with respect to tensors that its "
            f"inputs do not depend on."
        ) from exc
