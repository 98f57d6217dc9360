"""Argument checks and autograd guards shared by cifops.cif and cifops.contrastive_loss.

The kernels check their arguments in C++ (csrc/cif/cif_host.h, csrc/contrastive/
contrastive_host.h); what is here runs where they cannot: in the fake (meta) kernels,
which a single meta argument among real ones also reaches.
"""
from torch import Tensor


def check_tensor(fn, name, x, optional=False):
    if x is None and optional:
        return
    if not isinstance(x, Tensor):
        kind = "a Tensor or None" if optional else "a Tensor"
        raise TypeError(f"{fn}: {name} must be {kind}, got {type(x).__name__}")


def check_same_device(fn, ref_name, ref, exc=RuntimeError, **tensors):
    """Raise exc(f"{fn}: {name} is on X but {ref_name} is on Y") for the first tensor of
    ``tensors`` (None skipped) not on ref's device: the message of check_same_device in
    csrc/cif/cif_host.h."""
    for name, x in tensors.items():
        if x is not None and x.device != ref.device:
            raise exc(f"{fn}: {name} is on {x.device} but {ref_name} is on {ref.device}")

