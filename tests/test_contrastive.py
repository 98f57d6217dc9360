"""Tests of cifops.contrastive_loss / contrastive_accuracy / ContrastiveLoss.

Every result is compared with `naive_infonce`, a float64 InfoNCE written out with
plain torch ops (it builds the N x M logits, which is fine at test sizes). CUDA
tests skip without a GPU.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cifops

CUDA = torch.cuda.is_available() and cifops.build_info()["cuda"]
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a GPU and cifops built with CUDA")


# --- the slow, obviously-correct reference -------------------------------------------


def naive_infonce(
    student,
    teacher,
    targets=None,
    temperature=0.02,
    normalize=True,
    symmetric=False,
    reduction="sum",
    ignore_index=-100,
):
    """InfoNCE in float64 with the N x M logits materialised (the definition)."""
    s, t = student.double(), teacher.double()
    if normalize:
        s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-6)
        t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-6)
    tau = temperature.double() if isinstance(temperature, torch.Tensor) else temperature
    z = s @ t.T / tau
    n = z.shape[0]
    positive = torch.arange(n, device=z.device) if targets is None else targets.long()
    counted = positive != ignore_index
    safe = torch.where(counted, positive, torch.zeros_like(positive))
    row = torch.logsumexp(z, dim=1) - z.gather(1, safe[:, None]).squeeze(1)
    if symmetric:
        row = 0.5 * (row + (torch.logsumexp(z, dim=0) - z.diagonal()))
    row = torch.where(counted, row, torch.zeros_like(row))
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    return row.sum() / counted.sum()


def leaves(*xs):
    return [x.detach().clone().requires_grad_(True) for x in xs]


def close(actual, expected, rtol, atol=0.0, what=""):
    """max |actual - expected| <= atol + rtol * max |expected|, NaN-aware."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), (what, actual, expected)
    finite = ~torch.isnan(expected)
    assert torch.isfinite(actual[finite]).all(), (what, actual)
    if finite.any():
        err = (actual[finite] - expected[finite]).abs().max().item()
        scale = expected[finite].abs().max().item()
        assert err <= atol + rtol * scale, f"{what}: error {err:.3g}, scale {scale:.3g}"


def make_inputs(
    n,
    m,
    d,
    seed,
    dtype=torch.float32,
    ignore_fraction=0.0,
    with_targets=True,
    ignore_index=-100,
    device="cpu",
    student_scale=1.0,
    teacher_scale=1.0,
):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(n, d, generator=gen, dtype=torch.float64) * student_scale
    teacher = torch.randn(m, d, generator=gen, dtype=torch.float64) * teacher_scale
    targets = None
    if with_targets:
        targets = torch.randint(0, max(m, 1), (n,), generator=gen)
        drop = torch.rand(n, generator=gen) < ignore_fraction
        targets[drop] = ignore_index
    student, teacher = student.to(device, dtype), teacher.to(device, dtype)
    return student, teacher, (targets.to(device) if targets is not None else None)


def check_against_reference(
    student,
    teacher,
    targets,
    *,
    temperature=0.02,
    normalize=True,
    symmetric=False,
    reduction="sum",
    ignore_index=-100,
    rtol=None,
    teacher_grad=True,
):
    """Loss and gradients (student, teacher, temperature) against naive_infonce."""
    if rtol is None:
        rtol = 1e-9 if student.dtype == torch.float64 else 2e-5
    s, t = leaves(student, teacher)
    t.requires_grad_(teacher_grad)
    tau = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
    loss = cifops.contrastive_loss(
        s,
        t,
        targets,
        temperature=tau,
        normalize=normalize,
        symmetric=symmetric,
        reduction=reduction,
        ignore_index=ignore_index,
    )
    s64, t64 = leaves(student.double(), teacher.double())
    tau64 = tau.detach().clone().requires_grad_(True)
    ref = naive_infonce(s64, t64, targets, tau64, normalize, symmetric, reduction, ignore_index)
    assert loss.dtype == student.dtype and loss.shape == ref.shape
    # losses summed over rows carry the row count in their rounding
    rows = max(1, student.shape[0]) if reduction == "sum" else 1
    close(loss, ref, rtol, atol=rtol * rows / temperature * 0.05, what="loss")
    if torch.isnan(ref).any() or not ref.requires_grad:
        return
    upstream = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(ref.device)
    inputs = (s, t, tau) if teacher_grad else (s, tau)
    grads = torch.autograd.grad(loss, inputs, upstream.to(loss.dtype))
    ref_grads = torch.autograd.grad(ref, (s64, t64, tau64) if teacher_grad else (s64, tau64), upstream)
    names = ("student", "teacher", "temperature") if teacher_grad else ("student", "temperature")

    def floor(x, other):
        # A gradient that is exactly 0 (D = 1, a single column) is round-off: the
        # logits z/tau carry an error of ulp(|z|/tau), G = P - 1 inherits it, and
        # dL/dx multiplies it by |b| / (tau ||x||), summed over the other side.
        if x.numel() == 0 or other.numel() == 0:
            return 0.0
        eps = 1e-15 if x.dtype == torch.float64 else 2e-7
        norm = x.double().norm(dim=1).clamp_min(1e-6).min().item() if normalize else 1.0
        other_max = 1.0 if normalize else other.double().norm(dim=1).max().item()
        logit_max = other_max * (1.0 if normalize else x.double().norm(dim=1).max().item())
        return (
            eps
            * upstream.abs().max().item()
            * max(1.0, logit_max / temperature)
            * other_max
            / temperature
            / norm
            * math.sqrt(max(other.shape[0], 1))
        )

    # dL/dtau sums N row terms of size up to |z| / tau^2 (|z| <= 1 normalised), each with
    # its round-off: about an ulp of the input dtype per unit, whatever the sum comes to
    # after cancellation (float32: n=30, tau=0.71, symmetric gave 2.7e-8 on 58.7 units)
    tau_eps = 1e-10 if student.dtype == torch.float64 else 1e-7
    tau_floor = tau_eps * upstream.abs().max().item() * max(1, student.shape[0]) / temperature**2
    floors = {"student": floor(student, teacher), "teacher": floor(teacher, student), "temperature": tau_floor}
    for name, g, r in zip(names, grads, ref_grads):
        assert g.dtype == (torch.float64 if name == "temperature" else student.dtype)
        # dL/dtau sums terms of both signs: its relative error is larger
        close(g, r, rtol * (5 if name == "temperature" else 0.5), atol=floors[name], what=f"grad {name}")


# --- agreement with the reference ----------------------------------------------------

SIZES = [  # (N, M, D): edges of the 48-row blocks, 16-wide panels and 64-column tiles
    (1, 1, 1),
    (1, 7, 3),
    (3, 3, 1),
    (5, 9, 2),
    (47, 48, 15),
    (48, 49, 16),
    (49, 64, 17),
    (64, 65, 33),
    (97, 130, 40),
    (200, 200, 8),
    (257, 300, 70),
]


@pytest.mark.parametrize("n,m,d", SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_reference_default_targets(n, m, d, dtype):
    student, teacher, _ = make_inputs(n, m, d, seed=n * 1000 + m, dtype=dtype, with_targets=False)
    for reduction in ("sum", "mean", "none"):
        check_against_reference(student, teacher, None, reduction=reduction)


@pytest.mark.parametrize("n,m,d", SIZES[1:], ids=lambda v: str(v))
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_matches_reference_targets_with_ignore(n, m, d, reduction):
    student, teacher, targets = make_inputs(n, m, d, seed=n + 7 * m, ignore_fraction=0.25)
    check_against_reference(student, teacher, targets, reduction=reduction, temperature=0.05)


@pytest.mark.parametrize("n,d", [(1, 4), (3, 1), (48, 16), (49, 33), (130, 64), (300, 20)])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_reference_symmetric(n, d, reduction, dtype):
    student, teacher, _ = make_inputs(n, n, d, seed=3 * n + d, dtype=dtype, with_targets=False)
    check_against_reference(student, teacher, None, symmetric=True, reduction=reduction)


@pytest.mark.parametrize("temperature", [0.01, 0.02, 0.07, 0.3, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference_temperatures(temperature, normalize):
    scale = 1.0 if normalize else 0.15  # keeps the unnormalised logits moderate
    student, teacher, targets = make_inputs(
        90, 110, 24, seed=int(temperature * 100), ignore_fraction=0.1, student_scale=scale, teacher_scale=scale
    )
    for reduction in ("sum", "none"):
        check_against_reference(
            student, teacher, targets, temperature=temperature, normalize=normalize, reduction=reduction
        )


@pytest.mark.parametrize(
    "student_scale,teacher_scale", [(1e-30, 1.0), (1.0, 1e-30), (1e-8, 1e-8), (1e-3, 1e15), (1e30, 1e30), (1e-20, 1e20)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_extreme_norms_stay_finite(student_scale, teacher_scale, dtype):
    # float32 squares overflow above 1.8e19 and underflow below 1e-23: the norms must
    # not be computed as plain float32 sums of squares.
    student, teacher, targets = make_inputs(
        60, 70, 40, seed=11, dtype=dtype, student_scale=student_scale, teacher_scale=teacher_scale, ignore_fraction=0.1
    )
    student[3] = 0.0  # a zero row: its unit vector is 0, its logits are 0
    for reduction in ("sum", "none"):
        check_against_reference(student, teacher, targets, reduction=reduction)


def test_rows_below_the_norm_clamp_get_the_constant_scaling_gradient():
    student, teacher, _ = make_inputs(20, 20, 5, seed=5, dtype=torch.float64, with_targets=False)
    student[:10] *= 1e-9  # ||x|| < 1e-6: s = x / 1e-6, ds/dx = I / 1e-6
    check_against_reference(student, teacher, None, reduction="mean")
    check_against_reference(student, teacher, None, reduction="none", symmetric=True)


def test_all_rows_ignored():
    student, teacher, _ = make_inputs(6, 4, 3, seed=1, with_targets=False)
    targets = torch.full((6,), -100)
    s, t = leaves(student, teacher)
    assert cifops.contrastive_loss(s, t, targets, reduction="sum").item() == 0.0
    mean = cifops.contrastive_loss(s, t, targets, reduction="mean")
    assert math.isnan(mean.item())  # as torch's cross_entropy
    mean.backward()
    assert torch.equal(s.grad, torch.zeros_like(s)) and torch.equal(t.grad, torch.zeros_like(t))


def test_no_teacher_rows_when_all_rows_ignored():
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(0, 4, requires_grad=True)
    loss = cifops.contrastive_loss(student, teacher, torch.full((3,), -1), ignore_index=-1)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
    assert teacher.grad.shape == (0, 4)


def test_empty_student():
    student, teacher = torch.randn(0, 4, requires_grad=True), torch.randn(5, 4)
    assert cifops.contrastive_loss(student, teacher).item() == 0.0
    assert cifops.contrastive_loss(student, teacher, reduction="none").shape == (0,)


def test_custom_ignore_index_inside_the_column_range():
    # ignore_index = 2 is also a valid column: rows with target 2 are dropped
    student, teacher, targets = make_inputs(40, 10, 8, seed=9)
    check_against_reference(student, teacher, targets, ignore_index=2, reduction="mean")


def test_half_inputs_on_cpu_compute_in_float32():
    student, teacher, targets = make_inputs(50, 60, 32, seed=4, ignore_fraction=0.2)
    for dtype in (torch.float16, torch.bfloat16):
        s, t = leaves(student.to(dtype), teacher.to(dtype))
        loss = cifops.contrastive_loss(s, t, targets, reduction="mean")
        assert loss.dtype == dtype
        ref = naive_infonce(s.double(), t.double(), targets, reduction="mean")
        close(loss.float(), ref.detach(), rtol=1e-2, what=str(dtype))
        loss.backward()
        assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()


def test_non_contiguous_inputs():
    student, wide, targets = make_inputs(30, 40, 48, seed=2, ignore_fraction=0.1)
    student = student[:, :24].t().contiguous().t()  # column-major
    teacher = wide[:, ::2]  # every other column
    assert not student.is_contiguous() and not teacher.is_contiguous()
    check_against_reference(student, teacher, targets)
    check_against_reference(student[::2], teacher[::2], None)


def test_fused_forward_gradient_matches_recomputed_backward():
    # "sum" fuses the student gradient into the forward; "none" with a ones upstream
    # recomputes it in the backward: both must agree.
    student, teacher, targets = make_inputs(150, 170, 40, seed=8, ignore_fraction=0.2)
    s1, s2 = leaves(student, student)
    cifops.contrastive_loss(s1, teacher, targets, reduction="sum").backward()
    cifops.contrastive_loss(s2, teacher, targets, reduction="none").sum().backward()
    close(s1.grad, s2.grad, rtol=1e-5, what="fused vs recomputed")


def test_frozen_teacher_and_no_grad():
    student, teacher, targets = make_inputs(20, 30, 8, seed=3)
    s = student.clone().requires_grad_(True)
    loss = cifops.contrastive_loss(s, teacher, targets)
    loss.backward()
    assert teacher.grad is None and s.grad is not None
    with torch.no_grad():
        again = cifops.contrastive_loss(s, teacher, targets)
    assert not again.requires_grad and again.item() == pytest.approx(loss.item())
    # the backward op returns nothing for gradients that are not asked for
    _, stats, fused = torch.ops.cifops.contrastive_forward(
        student, teacher, targets, torch.tensor(0.02), True, False, "sum", -100, False
    )
    gs, gt, gtau = torch.ops.cifops.contrastive_backward(
        torch.tensor(1.0),
        student,
        teacher,
        targets,
        torch.tensor(0.02),
        stats,
        fused,
        True,
        False,
        "sum",
        -100,
        True,
        False,
        False,
    )
    assert gs.shape == student.shape and gt.numel() == 0 and gtau.numel() == 0


def test_learnable_temperature_module():
    student, teacher, targets = make_inputs(40, 50, 16, seed=6, ignore_fraction=0.1)
    log_tau = torch.nn.Parameter(torch.tensor(math.log(0.05)))
    module = cifops.ContrastiveLoss(reduction="mean")
    module.temperature = log_tau.exp()
    loss = module(student, teacher, targets)
    loss.backward()
    ref_log_tau = torch.tensor(math.log(0.05), dtype=torch.float64, requires_grad=True)
    ref = naive_infonce(student, teacher, targets, ref_log_tau.exp(), reduction="mean")
    ref.backward()
    close(log_tau.grad, ref_log_tau.grad, rtol=1e-4, what="d loss / d log tau")
    assert "reduction='mean'" in repr(cifops.ContrastiveLoss(reduction="mean"))


def test_temperature_as_float32_tensor_keeps_its_dtype():
    student, teacher, _ = make_inputs(10, 10, 4, seed=1, with_targets=False)
    tau = torch.tensor(0.1, requires_grad=True)
    cifops.contrastive_loss(student, teacher, temperature=tau).backward()
    assert tau.grad.dtype == torch.float32 and tau.grad.shape == ()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 120),
    extra=st.integers(0, 80),
    d=st.integers(1, 70),
    temperature=st.floats(0.01, 1.0),
    reduction=st.sampled_from(["sum", "mean", "none"]),
    normalize=st.booleans(),
    mode=st.sampled_from(["arange", "targets", "symmetric"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_against_reference(n, extra, d, temperature, reduction, normalize, mode, dtype, seed):
    m = n if mode == "symmetric" else n + extra
    scale = 1.0 if normalize else 0.3 / math.sqrt(d)
    student, teacher, targets = make_inputs(
        n,
        m,
        d,
        seed,
        dtype=dtype,
        ignore_fraction=0.2,
        with_targets=mode == "targets",
        student_scale=scale,
        teacher_scale=scale,
    )
    check_against_reference(
        student,
        teacher,
        targets,
        temperature=temperature,
        normalize=normalize,
        symmetric=mode == "symmetric",
        reduction=reduction,
    )


# --- autograd, opcheck, compile --------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        dict(reduction="sum"),
        dict(reduction="mean", targets=True),
        dict(reduction="none"),
        dict(reduction="mean", symmetric=True),
        dict(reduction="none", symmetric=True),
        dict(reduction="sum", normalize=False, targets=True),
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_gradcheck(config):
    config = dict(config)
    with_targets = config.pop("targets", False)
    n = 4
    student, teacher, targets = make_inputs(
        n,
        n + (0 if config.get("symmetric") else 2),
        3,
        seed=12,
        dtype=torch.float64,
        with_targets=with_targets,
        ignore_fraction=0.25,
    )
    tau = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    s, t = leaves(student, teacher)

    def fn(s, t, tau):
        return cifops.contrastive_loss(s, t, targets, temperature=tau, **config)

    assert torch.autograd.gradcheck(fn, (s, t, tau))


def _opcheck_args():
    student, teacher, targets = make_inputs(13, 17, 5, seed=21, ignore_fraction=0.2)
    s, t = leaves(student, teacher)
    tau = torch.tensor(0.1, requires_grad=True)
    sym_s, sym_t = leaves(student, teacher[:13])
    return [
        (s, t, targets, tau, True, False, "sum", -100, True),
        (s, t, targets, tau, True, False, "mean", -100, False),
        (s, t.detach(), None, torch.tensor(0.05, dtype=torch.float64), False, False, "none", -100, False),
        (sym_s, sym_t, None, tau, True, True, "mean", -100, True),
    ]


@pytest.mark.parametrize("index", range(4))
def test_opcheck_forward(index):
    torch.library.opcheck(torch.ops.cifops.contrastive_forward.default, _opcheck_args()[index])


def test_opcheck_backward_and_accuracy():
    student, teacher, targets = make_inputs(13, 17, 5, seed=22, ignore_fraction=0.2)
    tau = torch.tensor(0.1)
    for reduction, fuse in (("none", False), ("mean", True)):
        _, stats, fused = torch.ops.cifops.contrastive_forward(
            student, teacher, targets, tau, True, False, reduction, -100, fuse
        )
        grad = torch.randn(13) if reduction == "none" else torch.tensor(2.0)
        torch.library.opcheck(
            torch.ops.cifops.contrastive_backward.default,
            (grad, student, teacher, targets, tau, stats, fused, True, False, reduction, -100, True, True, True),
        )
    torch.library.opcheck(torch.ops.cifops.contrastive_accuracy.default, (student, teacher, targets, True, -100))


def test_torch_compile_traces_the_ops():
    student, teacher, targets = make_inputs(24, 30, 8, seed=23, ignore_fraction=0.2)

    def step(s, t, tau):
        loss = cifops.contrastive_loss(s, t, targets, temperature=tau, reduction="mean")
        return loss, cifops.contrastive_accuracy(s, t, targets)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for fn in (step, compiled):
        s, t = leaves(student, teacher)
        tau = torch.tensor(0.07, requires_grad=True)
        loss, acc = fn(s, t, tau)
        loss.backward()
        if fn is step:
            expected = (loss.detach(), acc, s.grad, t.grad, tau.grad)
        else:
            for a, b in zip((loss.detach(), acc, s.grad, t.grad, tau.grad), expected):
                torch.testing.assert_close(a, b)


# --- accuracy --------------------------------------------------------------------------


def naive_accuracy(student, teacher, targets=None, normalize=True, ignore_index=-100):
    s, t = student.double(), teacher.double()
    if normalize:
        s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-6)
        t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-6)
    best = (s @ t.T).argmax(dim=1)
    positive = torch.arange(len(s)) if targets is None else targets
    counted = positive != ignore_index
    return ((best == positive) & counted).sum().double() / counted.sum()


@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (10, 10, 3), (49, 70, 16), (130, 300, 24)])
@pytest.mark.parametrize("with_targets", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_accuracy_matches_reference(n, m, d, with_targets, normalize):
    student, teacher, targets = make_inputs(
        n, m, d, seed=n + d, dtype=torch.float64, with_targets=with_targets, ignore_fraction=0.2
    )
    # a student close to its positive so that the accuracy is not trivially 0
    positive = targets if targets is not None else torch.arange(n)
    keep = positive >= 0
    student[keep] += 2 * teacher[positive[keep]]
    acc = cifops.contrastive_accuracy(student, teacher, targets, normalize=normalize)
    ref = naive_accuracy(student, teacher, targets, normalize)
    assert acc.dtype == torch.float64 and acc.shape == ()
    if torch.isnan(ref):
        assert torch.isnan(acc)
    else:
        assert acc.item() == ref.item()


def test_accuracy_ties_go_to_the_first_column_and_float32():
    teacher = torch.eye(4)
    teacher = torch.cat([teacher, teacher])  # rows 4..7 repeat rows 0..3
    student = torch.eye(4) * 3
    assert cifops.contrastive_accuracy(student, teacher).item() == 1.0
    assert cifops.contrastive_accuracy(student, teacher, torch.tensor([4, 5, 6, 7])).item() == 0
    assert cifops.contrastive_accuracy(student, teacher).dtype == torch.float32
    assert math.isnan(cifops.contrastive_accuracy(student, teacher, torch.full((4,), -100)).item())


# --- errors that name the argument -----------------------------------------------------


def test_errors_name_the_argument():
    s, t = torch.randn(4, 8), torch.randn(6, 8)
    loss = cifops.contrastive_loss
    with pytest.raises(RuntimeError, match=r"student must be a 2-D tensor \[N, D\]"):
        loss(torch.randn(8), t)
    with pytest.raises(RuntimeError, match=r"teacher must be a 2-D tensor \[M, D\]"):
        loss(s, torch.randn(2, 6, 8))
    with pytest.raises(RuntimeError, match=r"teacher must have D = 8 columns"):
        loss(s, torch.randn(6, 5))
    with pytest.raises(
        RuntimeError,
        match=r"targets must be in \[0, M\) = \[0, 6\) or "
        r"ignore_index = -100, got targets\[2\] = 6",
    ):
        loss(s, t, torch.tensor([0, 1, 6, 2]))
    with pytest.raises(RuntimeError, match=r"targets must be in .* got targets\[0\] = -1"):
        loss(s, t, torch.tensor([-1, 1, 2, 3]))
    with pytest.raises(RuntimeError, match=r"targets must be a 1-D tensor \[N\] = \[4\]"):
        loss(s, t, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match=r"targets must be an integer tensor"):
        loss(s, t, torch.zeros(4))
    with pytest.raises(
        RuntimeError,
        match=r"teacher has M = 3 rows but targets is None.*"
        r"M >= N = 4",
    ):
        loss(s, torch.randn(3, 8))
    with pytest.raises(RuntimeError, match=r"symmetric=True needs as many teacher rows"):
        loss(s, t, symmetric=True)
    with pytest.raises(RuntimeError, match=r"symmetric=True needs targets=None"):
        loss(s, s, torch.arange(4), symmetric=True)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got -1"):
        loss(s, t, temperature=-1)
    with pytest.raises(RuntimeError, match=r"temperature must be a finite number > 0, got -0.5"):
        loss(s, t, temperature=torch.tensor(-0.5))
    with pytest.raises(RuntimeError, match=r"temperature must be a float or a 0-dim tensor"):
        loss(s, t, temperature=torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match=r"temperature must be a float or a 0-dim tensor"):
        loss(s, t, temperature="0.1")
    with pytest.raises(
        RuntimeError,
        match=r"teacher has dtype Double but student has dtype "
        r"Float",
    ):
        loss(s, t.double())
    with pytest.raises(ValueError, match=r"teacher is on meta but student is on cpu"):
        loss(s, t.to("meta"))
    with pytest.raises(ValueError, match=r"targets is on meta but student is on cpu"):
        loss(s, t, torch.arange(4, device="meta"))
    with pytest.raises(ValueError, match=r"reduction must be 'none', 'sum' or 'mean'"):
        loss(s, t, reduction="avg")
    with pytest.raises(RuntimeError, match=r"reduction must be 'none', 'sum' or 'mean'"):
        torch.ops.cifops.contrastive_forward(s, t, None, torch.tensor(0.1), True, False, "avg", -100, False)
    with pytest.raises(TypeError, match=r"student must be a Tensor"):
        loss([[1.0]], t)
    with pytest.raises(RuntimeError, match=r"student must be float16, bfloat16, float32"):
        loss(torch.ones(4, 8, dtype=torch.long), torch.ones(6, 8, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"contrastive_accuracy: teacher must have D = 8"):
        cifops.contrastive_accuracy(s, torch.randn(6, 5))


@needs_cuda
def test_cuda_errors_name_the_argument():
    s, t = torch.randn(4, 8, device="cuda"), torch.randn(6, 8)
    with pytest.raises(ValueError, match=r"teacher is on cpu but student is on cuda"):
        cifops.contrastive_loss(s, t)
    with pytest.raises(RuntimeError, match=r"teacher is on cpu but student is on cuda"):
        torch.ops.cifops.contrastive_forward(s, t, None, torch.tensor(0.1), True, False, "sum", -100, False)


# --- the portable (non-AVX2) CPU build ------------------------------------------------------


def test_portable_simd_build_matches_reference():
    """CIFOPS_CPU_SIMD=portable selects the kernels built without AVX2: this file's reference
    tests, run again in a child process that selects them."""
    env = dict(os.environ, CIFOPS_CPU_SIMD="portable")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            __file__,
            "-k",
            "test_matches_reference and not cuda",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and " passed" in out.stdout and " failed" not in out.stdout, (
        out.stdout[-2000:] + out.stderr[-2000:]
    )


def test_cuda_kernels_under_cpu_emulation(tmp_path):
    """The CUDA path runs on the CPU under tests/native/contrastive_cuda_emulation: the
    kernels of contrastive_cuda.cu (emulated blocks, warps and barriers) and the chunk loop
    of contrastive_cuda_op.cpp restated in C++, against the CPU kernels (float32, float64;
    float16 / bfloat16 against float64). Under a minute: three compilations and the run."""
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("needs g++ >= 12")
    script = os.path.join(os.path.dirname(__file__), "native", "contrastive_cuda_emulation", "run.sh")
    env = dict(os.environ, CIFOPS_EMU_BUILD_DIR=str(tmp_path))
    out = subprocess.run(["bash", script, "--strict"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0 and out.stdout.count("-> PASS") == 1, out.stdout[-8000:] + out.stderr[-4000:]


# --- CUDA -------------------------------------------------------------------------------------

CUDA_CASES = [
    dict(n=1, m=1, d=1),
    dict(n=37, m=50, d=9, targets=True),
    dict(n=64, m=64, d=64),
    dict(n=130, m=257, d=100, targets=True),
    dict(n=200, m=200, d=384, symmetric=True),
    dict(n=65, m=130, d=17, normalize=False),
    dict(n=300, m=300, d=48, symmetric=True),
]


def _cuda_case_inputs(case, dtype, seed=0):
    n, m, d = case["n"], case["m"], case["d"]
    scale = 1.0 if case.get("normalize", True) else 0.3 / math.sqrt(d)
    return make_inputs(
        n,
        m,
        d,
        seed,
        dtype=dtype,
        with_targets=case.get("targets", False),
        ignore_fraction=0.2,
        student_scale=scale,
        teacher_scale=scale,
    )


@needs_cuda
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_cuda_matches_cpu_and_reference(case, dtype, reduction):
    student, teacher, targets = _cuda_case_inputs(case, dtype)
    kwargs = dict(normalize=case.get("normalize", True), symmetric=case.get("symmetric", False), reduction=reduction)
    results = []
    for device in ("cpu", "cuda"):
        s, t = leaves(student.to(device), teacher.to(device))
        tau = torch.tensor(0.05, device=device, requires_grad=True)
        y = targets.to(device) if targets is not None else None
        loss = cifops.contrastive_loss(s, t, y, temperature=tau, **kwargs)
        up = torch.ones_like(loss)
        loss.backward(up)
        results.append([x.detach().cpu() for x in (loss, s.grad, t.grad, tau.grad)])
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    for name, a, b in zip(("loss", "student", "teacher", "temperature"), *results):
        close(b, a, rtol, atol=1e-30, what=name)
    check_against_reference(
        student.cuda(), teacher.cuda(), targets.cuda() if targets is not None else None, temperature=0.05, **kwargs
    )


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", CUDA_CASES[1:], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_cuda_half_within_twice_the_naive_error(case, dtype):
    """The flash-attention rule: error against float64 at most twice the error of the
    naive loss computed in the same low precision (plus a hair for exact cases)."""
    student, teacher, targets = _cuda_case_inputs(case, torch.float32, seed=1)
    kwargs = dict(
        normalize=case.get("normalize", True),
        symmetric=case.get("symmetric", False),
        reduction="mean",
        temperature=0.05,
    )
    y = targets.cuda() if targets is not None else None
    s_low, t_low = leaves(student.cuda().to(dtype), teacher.cuda().to(dtype))
    s64, t64 = leaves(s_low.double(), t_low.double())
    ref = naive_infonce(s64, t64, y, **kwargs)
    ref.backward()
    sn, tn = leaves(s_low, t_low)
    naive = naive_infonce_low_precision(sn, tn, y, **kwargs)
    naive.backward()
    sf, tf = leaves(s_low, t_low)
    fused = cifops.contrastive_loss(sf, tf, y, **kwargs)
    fused.backward()
    for name, f, n, r in (
        ("loss", fused, naive, ref),
        ("student", sf.grad, sn.grad, s64.grad),
        ("teacher", tf.grad, tn.grad, t64.grad),
    ):
        fused_err = (f.double() - r).abs().max().item()
        naive_err = (n.double() - r).abs().max().item()
        assert fused_err <= 2 * naive_err + 1e-6 * r.abs().max().item(), (name, fused_err, naive_err)


def naive_infonce_low_precision(student, teacher, targets, temperature, normalize, symmetric, reduction):
    """The naive loss the way a user writes it, in the inputs' own dtype."""
    import torch.nn.functional as F

    s, t = (F.normalize(student, dim=1), F.normalize(teacher, dim=1)) if normalize else (student, teacher)
    z = s @ t.T / temperature
    positive = torch.arange(len(z), device=z.device) if targets is None else targets
    loss = F.cross_entropy(z, positive, reduction=reduction)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(z.T, positive, reduction=reduction))
    return loss


@needs_cuda
def test_cuda_student_gradient_is_deterministic_and_uses_the_current_stream():
    student, teacher, targets = make_inputs(333, 444, 96, seed=4, ignore_fraction=0.1, device="cuda")
    grads = []
    stream = torch.cuda.Stream()
    for _ in range(2):
        s = student.clone().requires_grad_(True)
        with torch.cuda.stream(stream):
            cifops.contrastive_loss(s, teacher, targets).backward()
        stream.synchronize()
        grads.append(s.grad)
    assert torch.equal(grads[0], grads[1])


@needs_cuda
def test_cuda_device_temperature_and_accuracy():
    student, teacher, targets = make_inputs(100, 120, 32, seed=5, ignore_fraction=0.2, device="cuda")
    tau = torch.tensor(0.07, device="cuda", requires_grad=True)
    loss = cifops.contrastive_loss(student, teacher, targets, temperature=tau)
    loss.backward()
    ref_tau = torch.tensor(0.07, dtype=torch.float64, device="cuda", requires_grad=True)
    ref = naive_infonce(student, teacher, targets, ref_tau)
    ref.backward()
    close(loss, ref, 1e-4)
    close(tau.grad, ref_tau.grad, 1e-3)
    acc = cifops.contrastive_accuracy(student.double(), teacher.double(), targets)
    assert acc.item() == naive_accuracy(student.cpu(), teacher.cpu(), targets.cpu()).item()


@needs_cuda
@pytest.mark.parametrize("symmetric", [False, True], ids=["rows", "symmetric"])
def test_cuda_chunked_and_float16_mean_in_range(monkeypatch, symmetric):
    """Many chunks (a 4 MiB workspace bound: 128 rows per chunk here) and a float16
    'mean' loss over N = M = 4096, where the gradient weights (1/N times softmax
    probabilities near 1/M, about 6e-8) underflow float16 unless G is rescaled: student
    and teacher gradients within 1e-2 of float64 (relative norm), and within twice the
    naive float16 loss's error (which underflows)."""
    monkeypatch.setenv("CIFOPS_CONTRASTIVE_CHUNK_MIB", "4")
    g = torch.Generator(device="cuda").manual_seed(9)
    n, d = 4096, 64
    s0 = torch.randn(n, d, device="cuda", generator=g).half()
    t0 = (s0.float() + 2.0 * torch.randn(n, d, device="cuda", generator=g)).half()
    kwargs = dict(normalize=True, symmetric=symmetric, reduction="mean", temperature=1.0)
    s64, t64 = leaves(s0.double(), t0.double())
    naive_infonce(s64, t64, None, **kwargs).backward()
    sn, tn = leaves(s0, t0)
    naive_infonce_low_precision(sn, tn, None, **kwargs).backward()
    sf, tf = leaves(s0, t0)
    cifops.contrastive_loss(sf, tf, **kwargs).backward()
    for name, f, nv, r in (("student", sf.grad, sn.grad, s64.grad), ("teacher", tf.grad, tn.grad, t64.grad)):
        err = ((f.double() - r).norm() / r.norm()).item()
        naive_err = ((nv.double() - r).norm() / r.norm()).item()
        assert err <= 2 * naive_err + 1e-4 and err < 1e-2, (name, err, naive_err)
