"""cifops.contrastive_loss: a fused InfoNCE loss as torch custom ops.

The loss is computed by hand-written CPU kernels and, on CUDA, by chunked cuBLAS
products around a hand-written softmax kernel (csrc/contrastive/); neither holds
the whole N x M similarity matrix: they keep per-row statistics (log-sum-exps,
expected and positive logits) from which the backward recomputes what it needs. This module registers their autograd and fake
(meta) kernels with torch.library and wraps them in the public functions and an
nn.Module.
"""

import math
import numbers
from typing import Optional, Union

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

_REDUCTIONS = ("none", "sum", "mean")
# Rows of contrastive_forward's stats output (kStatRows in csrc/contrastive/contrastive.h).
_STAT_ROWS = _C.contrastive_stat_rows
# Whether contrastive_forward finishes the student gradient inside the forward (its
# fused_grad output is then [N, D]): contrastive_fuses_student_grad(fuse_student_grad,
# reduction, symmetric) of csrc/contrastive/contrastive_host.h, which both backends call,
# tabulated once (torch.compile traces a dict lookup, not a call into cifops._C).
_FUSES_STUDENT_GRAD = {
    (fuse, reduction, symmetric): _C.contrastive_fuses_student_grad(fuse, reduction, symmetric)
    for fuse in (False, True)
    for reduction in _REDUCTIONS
    for symmetric in (False, True)
}


def _fuses_student_grad(fuse_student_grad, reduction, symmetric):
    key = (bool(fuse_student_grad), reduction, bool(symmetric))
    if key not in _FUSES_STUDENT_GRAD:  # a bad reduction: the kernels' error
        return _C.contrastive_fuses_student_grad(*key)
    return _FUSES_STUDENT_GRAD[key]


def _check_temperature_device(fn, temperature, student, exc=RuntimeError):
    """The temperature is on the CPU or on student's device, else the message of
    check_contrastive_args (csrc/contrastive/contrastive_host.h)."""
    if temperature.device.type != "cpu" and temperature.device != student.device:
        raise exc(
            f"{fn}: temperature is on {temperature.device} but student is on "
            f"{student.device} (a CPU scalar tensor is also accepted)"
        )


# --- fake kernels: shapes only, so torch.compile can trace the ops -------------------
# The kernels check the arguments (check_contrastive_args and check_backward_tensors in
# csrc/contrastive/contrastive_host.h); a fake kernel checks only what its shapes need and
# that the tensors are on one device: it also runs for a call with one meta argument among
# real ones (the meta dispatch key wins), which would otherwise return uninitialised real
# tensors. Other bad metadata traces, and the kernel names it when the graph runs.


def _check_fake_args(fn, student, teacher, targets, temperature=None):
    check_rank(fn, "student", student, 2, "[N, D]")
    check_float(fn, "student", student)  # the compute dtype of the outputs
    check_same_device(fn, "student", student, teacher=teacher, targets=targets)
    if temperature is not None:
        _check_temperature_device(fn, temperature, student)


@torch.library.register_fake("cifops::contrastive_forward")
def _contrastive_forward_fake(
    student, teacher, targets, temperature, normalize, symmetric, reduction, ignore_index, fuse_student_grad
):
    _check_fake_args("cifops.contrastive_loss", student, teacher, targets, temperature)
    n, d = student.shape
    compute = compute_dtype(student.dtype)
    loss = student.new_empty((n,) if reduction == "none" else ())
    stats = student.new_empty((_STAT_ROWS, n), dtype=compute)
    fused = _fuses_student_grad(fuse_student_grad, reduction, symmetric)
    fused_grad = student.new_empty((n, d) if fused else (0, 0), dtype=compute)
    return loss, stats, fused_grad


@torch.library.register_fake("cifops::contrastive_backward")
def _contrastive_backward_fake(
    grad_loss,
    student,
    teacher,
    targets,
    temperature,
    stats,
    fused_grad,
    normalize,
    symmetric,
    reduction,
    ignore_index,
    need_student,
    need_teacher,
    need_temperature,
):
    _check_fake_args("cifops.contrastive_loss", student, teacher, targets, temperature)
    check_same_device(
        "cifops.contrastive_backward", "student", student, grad_loss=grad_loss, stats=stats, fused_grad=fused_grad
    )
    return (
        student.new_empty(student.shape if need_student else (0,)),
        teacher.new_empty(teacher.shape if need_teacher else (0,)),
        temperature.new_empty(temperature.shape if need_temperature else (0,)),
    )


@torch.library.register_fake("cifops::contrastive_accuracy")
def _contrastive_accuracy_fake(student, teacher, targets, normalize, ignore_index):
    _check_fake_args("cifops.contrastive_accuracy", student, teacher, targets)
    return student.new_empty((), dtype=compute_dtype(student.dtype))


# --- autograd: the backward is its own op ----------------------------------------------


def _setup_context(ctx, inputs, output):
    student, teacher, targets, temperature, normalize, symmetric, reduction, ignore_index, _ = inputs
    _, stats, fused_grad = output
    ctx.save_for_backward(student, teacher, targets, temperature, stats, fused_grad)
    ctx.args = (normalize, symmetric, reduction, ignore_index)
    ctx.mark_non_differentiable(stats, fused_grad)


def _backward(ctx, grad_loss, grad_stats, grad_fused):
    student, teacher, targets, temperature, stats, fused_grad = ctx.saved_tensors
    need_student, need_teacher, _, need_temperature = ctx.needs_input_grad[:4]
    grad_student, grad_teacher, grad_temperature = torch.ops.cifops.contrastive_backward(
        grad_loss,
        student,
        teacher,
        targets,
        temperature,
        stats,
        fused_grad,
        *ctx.args,
        need_student,
        need_teacher,
        need_temperature,
    )
    return (
        grad_student if need_student else None,
        grad_teacher if need_teacher else None,
        None,
        grad_temperature if need_temperature else None,
        None,
        None,
        None,
        None,
        None,
    )


# The public registration (cif_forward registers its Autograd kernel directly, for host
# time: cifops/_cif.py says why this op does not).
torch.library.register_autograd("cifops::contrastive_forward", _backward, setup_context=_setup_context)
# The backward is not differentiable: a second-order gradient raises, naming the op,
# instead of silently being zero.
torch.library.register_autograd("cifops::contrastive_backward", no_double_backward("cifops.contrastive_loss"))


# --- the public API ----------------------------------------------------------------------


def _check_tensors(fn, student, teacher, targets):
    # Types and devices are checked here as well as in the ops: inputs on different
    # devices would otherwise be dispatched to one backend's kernel (or to the fake
    # kernel, for "meta") before any check could name them.
    check_tensor(fn, "student", student)
    check_tensor(fn, "teacher", teacher)
    check_tensor(fn, "targets", targets, optional=True)
    check_same_device(fn, "student", student, exc=ValueError, teacher=teacher, targets=targets)


def _temperature_tensor(temperature):
    if isinstance(temperature, Tensor):
        return temperature
    # numbers.Real: numpy's ints and floats too (numpy registers its scalars there)
    if isinstance(temperature, bool) or not (
        isinstance(temperature, (int, float)) or isinstance(temperature, numbers.Real)
    ):
        raise TypeError(
            "cifops.contrastive_loss: temperature must be a float or a 0-dim "
            "tensor (a Python or numpy real number, or a float16, bfloat16, "
            "float32 or float64 tensor of one element), got "
            f"{type(temperature).__name__}"
        )
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"cifops.contrastive_loss: temperature must be a finite number > 0, got {temperature}")
    return torch.tensor(temperature, dtype=torch.float64)


def contrastive_loss(
    student: Tensor,
    teacher: Tensor,
    targets: Optional[Tensor] = None,
    *,
    temperature: Union[float, Tensor] = 0.02,
    normalize: bool = True,
    symmetric: bool = False,
    reduction: str = "sum",
    ignore_index: int = -100,
) -> Tensor:
    r"""Fused contrastive (InfoNCE) loss of student rows against teacher rows.

    With ``normalize``, ``s_i = student_i / max(||student_i||, 1e-6)`` and ``t_j``
    likewise (else the raw rows); the logits are ``z_ij = (s_i . t_j) / temperature``
    and row ``i``'s loss is ``l_i = logsumexp_j z_ij - z_{i, targets_i}``: a
    cross-entropy over all ``M`` teacher rows with the positive at ``targets_i``.
    ``targets=None`` pairs student ``i`` with teacher ``i`` (then ``M >= N``; teacher
    rows beyond ``N`` are extra negatives). Rows whose target is ``ignore_index``
    give 0 and are not counted.

    ``symmetric=True`` (CLIP-style; needs ``targets=None`` and ``N == M``) averages
    both directions: row ``i``'s loss is ``(l_i + l'_i) / 2`` where
    ``l'_i = logsumexp_k z_ki - z_ii`` is teacher ``i``'s loss over all students.

    The ``N x M`` logit matrix is never stored whole: on the CPU the kernels stream
    tiles of it with an online log-sum-exp; on CUDA it is formed in chunks of rows
    (cuBLAS products into a fixed workspace, ``CIFOPS_CONTRASTIVE_CHUNK_MIB``, default
    64 MiB), so memory is ``O((N + M) D)`` plus that workspace, and the backward
    recomputes what it needs from per-row statistics. For a scalar loss that is not
    symmetric, the student gradient is finished in the forward (the logits are formed
    once) when the student requires grad, and the backward only scales it. A teacher
    that does not require grad costs no teacher-gradient work.

    Args:
        student: [N, D] float16/bfloat16/float32/float64.
        teacher: [M, D], same dtype and device as student.
        targets: [N] integer positives in [0, M), or ``ignore_index``; None: ``arange(N)``.
        temperature: a float (Python or numpy real number) or a 1-element float16,
            bfloat16, float32 or float64 tensor, ``> 0``, on the CPU or student's device.
            A tensor that requires grad gets its gradient. On CUDA a CUDA temperature is
            not checked (that would need a sync); a non-positive one gives NaN.
        normalize: L2-normalise the rows first (cosine similarities).
        symmetric: average the student-to-teacher and teacher-to-student losses.
        reduction: "sum" (default, as in the HKD recipe), "mean" over counted rows
            (NaN when no row counts, as torch's cross_entropy), or "none" ([N]).
        ignore_index: the target value of rows to leave out.

    Returns:
        the loss in student's dtype: ``[]`` for "sum"/"mean", ``[N]`` for "none".

    Differentiable in reverse mode and to first order (``backward()``,
    ``torch.autograd.grad``); a second-order gradient (differentiating a gradient taken
    with ``create_graph=True``), forward mode (``torch.func.jvp``) and the differentiating
    ``torch.func`` transforms (``grad``, ``vjp``, ``jacrev``, ...) raise;
    ``torch.func.vmap`` works. All tensors must be on one device (the temperature may
    also be a CPU scalar tensor); a meta tensor among real ones is an error that names it.

    Precision: float16/bfloat16/float32 compute in float32 and float64 in float64.
    On CUDA, float16/bfloat16 products run on the tensor cores with float32
    accumulation and float32 logits (the gradient weights are stored in the input
    dtype, rescaled so that float16 keeps small weights); float32 products follow
    torch's matmul precision setting (``torch.backends.cuda.matmul.allow_tf32`` /
    ``torch.set_float32_matmul_precision``): full float32, no TF32, by default;
    float64 products run in float64. The loss and gradients are bitwise identical run
    to run on each device (no atomics; fixed-order reductions): on CUDA for the same
    GPU model, torch and CUDA versions, matmul precision setting and shapes (the chunk
    of rows, which the cuBLAS products see, is sized from N, M and D), with
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` where cuBLAS runs on several streams (as
    ``torch.use_deterministic_algorithms`` requires); the CPU and CUDA results agree
    to rounding, not bitwise. On CUDA, targets are not checked against
    ``[0, M)`` (that would need a sync): a row with an out-of-range target gives a
    NaN loss.
    """
    _check_tensors("cifops.contrastive_loss", student, teacher, targets)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"cifops.contrastive_loss: reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    temperature = _temperature_tensor(temperature)
    _check_temperature_device("cifops.contrastive_loss", temperature, student, ValueError)
    fuse = torch.is_grad_enabled() and student.requires_grad and _fuses_student_grad(True, reduction, symmetric)
    refuse_forward_mode("cifops.contrastive_loss", student, teacher, temperature)
    loss, _, _ = call_op(
        "cifops.contrastive_loss",
        torch.ops.cifops.contrastive_forward,
        student,
        teacher,
        targets,
        temperature,
        bool(normalize),
        bool(symmetric),
        reduction,
        int(ignore_index),
        fuse,
    )
    return loss


def contrastive_accuracy(
    student: Tensor,
    teacher: Tensor,
    targets: Optional[Tensor] = None,
    *,
    normalize: bool = True,
    ignore_index: int = -100,
) -> Tensor:
    r"""Fraction of counted student rows whose most similar teacher row is the positive.

    The same logits as :func:`contrastive_loss` (the temperature does not change the
    argmax): ``mean over rows with targets_i != ignore_index of
    [argmax_j z_ij == targets_i]``, ties going to the first maximal column as in
    ``torch.argmax``. No gradient, no ``N x M`` memory. Returns a 0-dim float32 tensor
    (float64 for float64 inputs), NaN when no row counts.

    Args:
        student: [N, D]; teacher: [M, D]; targets: [N] or None (``arange(N)``, M >= N).
    """
    _check_tensors("cifops.contrastive_accuracy", student, teacher, targets)
    return torch.ops.cifops.contrastive_accuracy(
        student.detach(), teacher.detach(), targets, bool(normalize), int(ignore_index)
    )


class ContrastiveLoss(torch.nn.Module):
    """:func:`contrastive_loss` as a module; the keyword arguments are its settings.

    ``forward(student [N, D], teacher [M, D], targets [N] = None)`` returns the loss
    (``[]``, or ``[N]`` with ``reduction="none"``). ``temperature`` may be a float or a
    tensor (pass an ``nn.Parameter`` to learn it).
    """

    def __init__(
        self,
        temperature: Union[float, Tensor] = 0.02,
        normalize: bool = True,
        symmetric: bool = False,
        reduction: str = "sum",
        ignore_index: int = -100,
    ):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"cifops.ContrastiveLoss: reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
        self.temperature = temperature
        self.normalize = normalize
        self.symmetric = symmetric
        self.reduction = reduction
        self.ignore_index = ignore_index

    def forward(self, student: Tensor, teacher: Tensor, targets: Optional[Tensor] = None) -> Tensor:
        return contrastive_loss(
            student,
            teacher,
            targets,
            temperature=self.temperature,
            normalize=self.normalize,
            symmetric=self.symmetric,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        temperature = self.temperature if not isinstance(self.temperature, Tensor) else "tensor"
        return (
            f"temperature={temperature}, normalize={self.normalize}, "
            f"symmetric={self.symmetric}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}"
        )
