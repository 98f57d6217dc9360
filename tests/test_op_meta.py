"""The ops' metadata has one source, the C++: the fake (meta) kernels and the loop-free
CIF read the constants and rules that cifops._C exports, the kernels name bad metadata (the
fake kernels check only what their shapes need, with the kernels' messages), and the
Autocast kernels let a model under torch.autocast call the ops without casts of its own."""

import pytest
import torch

import cifops
from cifops import _C

META = torch.device("meta")
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def on(device, tensors):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()}


# --- the exported metadata ------------------------------------------------------------------


def test_exported_constants_are_the_kernels():
    assert _C.compute_dtypes == {
        "float16": "float32",
        "bfloat16": "float32",
        "float32": "float32",
        "float64": "float64",
    }
    assert (_C.cif_row_real, _C.cif_row_info, _C.contrastive_stat_rows) == (4, 7, 6)
    assert _C.contrastive_fuses_student_grad(True, "sum", False)
    assert not _C.contrastive_fuses_student_grad(True, "none", False)
    assert not _C.contrastive_fuses_student_grad(True, "mean", True)
    assert not _C.contrastive_fuses_student_grad(False, "mean", False)
    with pytest.raises(RuntimeError, match="reduction must be 'none', 'sum' or 'mean'"):
        _C.contrastive_fuses_student_grad(True, "avg", False)


def test_exported_cif_constants_are_the_kernels():
    # CifStatus and CifStreamStateError (csrc/cif/cif.h), by name
    assert _C.cif_status == {
        "ok": 0,
        "bad_alpha": 1,
        "bad_length": 2,
        "bad_target": 3,
        "zero_sum_target": 4,
        "too_many_tokens": 5,
        "bad_stream_state": 6,
    }
    assert _C.cif_stream_state_error == {
        "ok": 0,
        "negative_frames": 1,
        "negative_tokens": 2,
        "bad_prefix": 3,
        "prefix_no_frames": 4,
        "tokens_disagree": 5,
    }
    # cif_workspace_size: prefix sums [B][T+1] and B 4-double records; fire counts [B][T]
    # and B 7-int64 records; the fake kernel's workspace has the same sizes
    for B, T in [(0, 0), (1, 0), (2, 5), (3, 1000)]:
        sizes = (B * (T + 1) + 4 * B, B * T + 7 * B)
        assert _C.cif_workspace_size(B, T) == sizes
        fake = torch.ops.cifops.cif_forward(
            torch.empty(B, T, 2, device=META), torch.empty(B, T, device=META), None, None, 1.0, 1e-4, None, True, 3
        )
        assert (fake[4].shape[0], fake[5].shape[0]) == sizes


def cif_args(dtype, B=2, T=5, D=3):
    g = torch.Generator().manual_seed(22)
    return dict(
        hidden=torch.randn(B, T, D, generator=g).to(dtype),
        alphas=(torch.rand(B, T, generator=g) + 0.2).to(dtype),
        lengths=torch.tensor([T, T - 2]),
        target_lengths=None,
        threshold=1.0,
        scale_eps=1e-4,
        tail_threshold=0.5,
        tail_normalize=True,
        max_tokens=4,
    )


@pytest.mark.parametrize("dtype", FLOATS)
def test_cif_fake_outputs_match_the_kernels(dtype):
    args = cif_args(dtype)
    real = torch.ops.cifops.cif_forward(**args)
    fake = torch.ops.cifops.cif_forward(**on(META, args))
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
    grad = dict(
        grad_embeds=torch.ones_like(real[0]),
        grad_alpha_sum=torch.ones_like(real[3]),
        hidden=args["hidden"],
        alphas=args["alphas"],
        scan_real=real[4],
        scan_int=real[5],
        threshold=1.0,
        scale_eps=1e-4,
        tail_threshold=0.5,
        tail_normalize=True,
    )
    real_grads = torch.ops.cifops.cif_backward(**grad)
    fake_grads = torch.ops.cifops.cif_backward(**on(META, grad))
    assert [(t.shape, t.dtype) for t in fake_grads] == [(t.shape, t.dtype) for t in real_grads]


def contrastive_args(dtype, N=5, M=7, D=4, symmetric=False, reduction="sum", fuse=True):
    g = torch.Generator().manual_seed(22)
    if symmetric:
        M = N
    return dict(
        student=torch.randn(N, D, generator=g).to(dtype),
        teacher=torch.randn(M, D, generator=g).to(dtype),
        targets=None,
        temperature=torch.tensor(0.1),
        normalize=True,
        symmetric=symmetric,
        reduction=reduction,
        ignore_index=-100,
        fuse_student_grad=fuse,
    )


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "reduction,symmetric,fuse",
    [("sum", False, True), ("mean", False, False), ("none", False, True), ("mean", True, True)],
)
def test_contrastive_fake_outputs_match_the_kernels(dtype, reduction, symmetric, fuse):
    args = contrastive_args(dtype, symmetric=symmetric, reduction=reduction, fuse=fuse)
    real = torch.ops.cifops.contrastive_forward(**args)
    # the temperature stays on the CPU: a CPU scalar is accepted with meta inputs too
    fake = torch.ops.cifops.contrastive_forward(**on(META, args) | {"temperature": args["temperature"]})
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
    acc_args = {k: args[k] for k in ("student", "teacher", "targets", "normalize", "ignore_index")}
    real_acc = torch.ops.cifops.contrastive_accuracy(**acc_args)
    fake_acc = torch.ops.cifops.contrastive_accuracy(**on(META, acc_args))
    assert (fake_acc.shape, fake_acc.dtype) == (real_acc.shape, real_acc.dtype)


# --- the kernels name bad metadata; the fake kernels check what their shapes need ----------
# (with the kernels' messages; dtypes are named the Python way by the fake kernels,
# torch.float32, and the C++ way, Float, by the kernels). Other bad metadata on meta tensors
# traces, and the kernel names it when it runs.
FAKE_CHECKS = {"hidden 2-D", "student 3-D", "student int"}


def real_and_fake(cases):
    """(case, device): every case on the CPU, and on meta those the fake kernels check."""
    return [(case, "cpu") for case in cases] + [(case, "meta") for case in cases if case in FAKE_CHECKS]


def _bad_cif(**change):
    args = cif_args(torch.float32)
    args.update(change)
    return args


CIF_BAD = {
    "hidden 2-D": (_bad_cif(hidden=torch.zeros(2, 5)), r"hidden must be a 3-D tensor \[B, T, D\]"),
    "hidden int": (
        _bad_cif(hidden=torch.zeros(2, 5, 3, dtype=torch.int32)),
        r"hidden must be float16, bfloat16, float32 or float64, got ",
    ),
    "alphas 3-D": (_bad_cif(alphas=torch.zeros(2, 5, 1)), r"alphas must be a 2-D tensor"),
    "alphas T": (
        _bad_cif(alphas=torch.zeros(2, 4)),
        r"alphas must have shape \[B, T\] = \[2, 5\] to match hidden, got \[2, 4\]",
    ),
    "alphas int64": (
        _bad_cif(alphas=torch.zeros(2, 5, dtype=torch.int64)),
        r"alphas must be float16, bfloat16, float32 or float64",
    ),
    "lengths B": (
        _bad_cif(lengths=torch.tensor([5, 5, 5])),
        r"lengths must be a 1-D tensor \[B\] = \[2\], got shape \[3\]",
    ),
    "lengths float": (_bad_cif(lengths=torch.tensor([5.0, 3.0])), r"lengths must be an integer tensor, got "),
    "target_lengths 2-D": (
        _bad_cif(target_lengths=torch.ones(2, 1, dtype=torch.int64)),
        r"target_lengths must be a 1-D tensor \[B\] = \[2\]",
    ),
}


@pytest.mark.parametrize("case,device", real_and_fake(CIF_BAD))
def test_cif_forward_bad_metadata_is_named(case, device):
    args, message = CIF_BAD[case]
    with pytest.raises(RuntimeError, match=r"cifops\.cif: " + message):
        torch.ops.cifops.cif_forward(**on(device, args))


@pytest.mark.parametrize("case", ["grad_embeds", "grad_alpha_sum", "scan_real", "scan_int"])
def test_cif_backward_bad_metadata_is_named(case):
    args = cif_args(torch.float32)
    out = torch.ops.cifops.cif_forward(**args)
    grad = dict(
        grad_embeds=torch.ones_like(out[0]),
        grad_alpha_sum=torch.ones_like(out[3]),
        hidden=args["hidden"],
        alphas=args["alphas"],
        scan_real=out[4],
        scan_int=out[5],
        threshold=1.0,
        scale_eps=1e-4,
        tail_threshold=0.5,
        tail_normalize=True,
    )
    bad = {
        "grad_embeds": torch.ones(2, 4, 2),
        "grad_alpha_sum": torch.ones(3),
        "scan_real": out[4][:-1],
        "scan_int": out[5].to(torch.int32),
    }
    grad[case] = bad[case]
    with pytest.raises(RuntimeError, match=rf"cifops\.cif_backward: {case} must"):
        torch.ops.cifops.cif_backward(**grad)


def _bad_contrastive(**change):
    args = contrastive_args(torch.float32)
    args.update(change)
    return args


CONTRASTIVE_BAD = {
    "student 3-D": (_bad_contrastive(student=torch.zeros(5, 4, 1)), r"student must be a 2-D tensor \[N, D\]"),
    "teacher 1-D": (_bad_contrastive(teacher=torch.zeros(7)), r"teacher must be a 2-D tensor"),
    "student int": (
        _bad_contrastive(student=torch.zeros(5, 4, dtype=torch.int32), teacher=torch.zeros(7, 4, dtype=torch.int32)),
        r"student must be float16, bfloat16, float32 or float64",
    ),
    "dtypes differ": (
        _bad_contrastive(teacher=torch.zeros(7, 4, dtype=torch.float64)),
        r"teacher has dtype \S+ but student has dtype \S+; they must match",
    ),
    "D differs": (_bad_contrastive(teacher=torch.zeros(7, 3)), r"teacher must have D = 4 columns to match student"),
    "targets N": (
        _bad_contrastive(targets=torch.zeros(4, dtype=torch.int64)),
        r"targets must be a 1-D tensor \[N\] = \[5\], got shape \[4\]",
    ),
    "targets float": (_bad_contrastive(targets=torch.zeros(5)), r"targets must be an integer tensor"),
    "M < N": (_bad_contrastive(teacher=torch.zeros(3, 4)), r"teacher has M = 3 rows but targets"),
    "symmetric N != M": (
        _bad_contrastive(symmetric=True),
        r"symmetric=True needs as many teacher rows as student rows",
    ),
    "temperature shape": (
        _bad_contrastive(temperature=torch.ones(2)),
        r"temperature must be a float or a 0-dim tensor, got shape \[2\]",
    ),
}


@pytest.mark.parametrize("case,device", real_and_fake(CONTRASTIVE_BAD))
def test_contrastive_forward_bad_metadata_is_named(case, device):
    args, message = CONTRASTIVE_BAD[case]
    args = on(device, args) | {"temperature": args["temperature"]}  # a CPU scalar is accepted
    with pytest.raises(RuntimeError, match=r"cifops\.contrastive_loss: " + message):
        torch.ops.cifops.contrastive_forward(**args)


@pytest.mark.parametrize("case", ["stats", "grad_loss", "fused_grad"])
def test_contrastive_backward_bad_metadata_is_named(case):
    args = contrastive_args(torch.float32, reduction="sum", fuse=True)
    _, stats, fused_grad = torch.ops.cifops.contrastive_forward(**args)
    grad = dict(
        grad_loss=torch.tensor(1.0),
        student=args["student"],
        teacher=args["teacher"],
        targets=None,
        temperature=args["temperature"],
        stats=stats,
        fused_grad=fused_grad,
        normalize=True,
        symmetric=False,
        reduction="sum",
        ignore_index=-100,
        need_student=True,
        need_teacher=True,
        need_temperature=True,
    )
    bad = {"stats": stats[:5], "grad_loss": torch.ones(3), "fused_grad": torch.ones(2, 2)}
    grad[case] = bad[case]
    with pytest.raises(RuntimeError, match=rf"cifops\.contrastive_backward: {case} must"):
        torch.ops.cifops.contrastive_backward(**grad)


# --- autocast -------------------------------------------------------------------------------


def test_contrastive_under_autocast_needs_no_casts():
    """A bfloat16 student projection against float32 teacher rows: without the Autocast
    kernel the op refuses the mixed dtypes; with it both compute in float32 (the wider
    dtype), as if the model had cast the student itself, and gradients reach the layer."""
    torch.manual_seed(22)
    proj = torch.nn.Linear(6, 4)
    x = torch.randn(5, 6)
    teacher = torch.randn(7, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student = proj(x)
        assert student.dtype == torch.bfloat16
        loss = cifops.contrastive_loss(student, teacher, temperature=0.1)
        accuracy = cifops.contrastive_accuracy(student, teacher)
    assert loss.dtype == torch.float32 and accuracy.dtype == torch.float32
    expected = cifops.contrastive_loss(student.detach().float(), teacher, temperature=0.1)
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(accuracy, cifops.contrastive_accuracy(student.float(), teacher))
    loss.backward()
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()


def test_contrastive_under_autocast_keeps_a_common_half_dtype():
    student = torch.randn(5, 4, dtype=torch.bfloat16)
    teacher = torch.randn(7, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cifops.contrastive_loss(student, teacher)
    assert loss.dtype == torch.bfloat16
    torch.testing.assert_close(loss, cifops.contrastive_loss(student, teacher))


def test_cif_under_autocast_takes_its_inputs_as_given():
    torch.manual_seed(22)
    proj = torch.nn.Linear(3, 3)
    hidden = torch.randn(2, 6, 3)
    alphas = torch.rand(2, 6) + 0.2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = proj(hidden)
        out = cifops.cif(h, alphas, max_tokens=5)
    assert out.embeds.dtype == torch.bfloat16 and out.alpha_sum.dtype == torch.float32
    torch.testing.assert_close(out.embeds, cifops.cif(h, alphas, max_tokens=5).embeds)
    out.embeds.float().sum().backward()
    assert proj.weight.grad is not None
