"""The ops as a careless or hostile user calls them.

Second-order and forward-mode gradients, meta tensors mixed with real ones, float16
alpha sums, thresholds below scale_eps, huge max_tokens, float8 inputs, torch.func
transforms and numpy scalars: each either works or raises an error that names the
argument (or the op) and says what is accepted.
"""

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import cifops
from cifops.reference import cif_reference

from conftest import requires_cuda

META = torch.device("meta")
# the checks live in host code shared by both backends: the CUDA runs check that
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def cif_inputs(dtype=torch.float64, requires_grad=False, device="cpu"):
    g = torch.Generator().manual_seed(21)
    hidden = torch.randn(2, 6, 3, generator=g, dtype=dtype).to(device)
    alphas = (torch.rand(2, 6, generator=g, dtype=dtype) + 0.1).to(device)
    return hidden.requires_grad_(requires_grad), alphas.requires_grad_(requires_grad)


def contrastive_inputs(requires_grad=False, device="cpu"):
    g = torch.Generator().manual_seed(22)
    student = torch.randn(4, 5, generator=g, dtype=torch.float64).to(device)
    teacher = torch.randn(6, 5, generator=g, dtype=torch.float64).to(device)
    return student.requires_grad_(requires_grad), teacher.requires_grad_(requires_grad)


# --- item 5: second-order gradients raise, naming the op ---------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target", [False, True])
def test_cif_second_order_gradient_raises(target, device):
    hidden, alphas = cif_inputs(requires_grad=True, device=device)
    opts = dict(target_lengths=torch.tensor([2, 3], device=device)) if target else dict(tail_threshold=0.2)
    out = cifops.cif(hidden, alphas, **opts)
    loss = out.embeds.square().sum() + out.alpha_sum.square().sum()
    # the first-order gradient with create_graph=True is still the gradient
    g_hidden, g_alphas = torch.autograd.grad(loss, (hidden, alphas), create_graph=True)
    e_hidden, e_alphas = torch.autograd.grad(
        cifops.cif(hidden, alphas, **opts).embeds.square().sum()
        + cifops.cif(hidden, alphas, **opts).alpha_sum.square().sum(),
        (hidden, alphas),
    )
    torch.testing.assert_close(g_hidden.detach(), e_hidden)
    torch.testing.assert_close(g_alphas.detach(), e_alphas)
    # a gradient of that gradient is refused (it used to be silently zero)
    with pytest.raises(RuntimeError, match=r"cifops\.cif: second-order gradients .*not supported"):
        (g_hidden.square().sum() + g_alphas.square().sum()).backward()
    with pytest.raises(RuntimeError, match=r"cifops\.cif: second-order gradients"):
        g_alphas = torch.autograd.grad(cifops.cif(hidden, alphas, **opts).embeds.sum(), alphas, create_graph=True)[0]
        torch.autograd.grad(g_alphas.sum(), hidden)


def test_cif_double_backward_trick_raises():
    # torch.autograd.functional.jvp differentiates a vector-Jacobian product: it used
    # to return zeros
    hidden, alphas = cif_inputs()
    with pytest.raises(RuntimeError, match=r"cifops\.cif: second-order gradients"):
        torch.autograd.functional.jvp(lambda h: cifops.cif(h, alphas).embeds, (hidden,), (torch.ones_like(hidden),))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wrt", ["student", "teacher", "temperature"])
def test_contrastive_second_order_gradient_raises(wrt, device):
    student, teacher = contrastive_inputs(requires_grad=True, device=device)
    temperature = torch.tensor(0.5, dtype=torch.float64, device=device, requires_grad=True)
    inputs = dict(student=student, teacher=teacher, temperature=temperature)
    loss = cifops.contrastive_loss(student, teacher, temperature=temperature)
    (grad,) = torch.autograd.grad(loss, inputs[wrt], create_graph=True)
    with pytest.raises(RuntimeError, match=r"cifops\.contrastive_loss: second-order gradients .*not supported"):
        grad.square().sum().backward()


@pytest.mark.parametrize("op", ["cif", "contrastive_loss"])
def test_forward_mode_gradients_raise(op):
    # forward-mode AD has no formula: it used to give zero (torch.func.jvp) or no tangent
    hidden, alphas = cif_inputs()
    student, teacher = contrastive_inputs()
    if op == "cif":
        fn, primal = (lambda h: cifops.cif(h, alphas).embeds), hidden
    else:
        fn, primal = (lambda s: cifops.contrastive_loss(s, teacher)), student
    with pytest.raises(RuntimeError, match=rf"cifops\.{op}: forward-mode .*not supported"):
        torch.func.jvp(fn, (primal,), (torch.ones_like(primal),))
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match=rf"cifops\.{op}: forward-mode"):
            fn(fwAD.make_dual(primal, torch.ones_like(primal)))


class _ScriptedCif(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cif = cifops.Cif(max_tokens=4)

    def forward(self, hidden, alphas):
        return self.cif(hidden, alphas).embeds + cifops.cif(hidden, alphas, max_tokens=4).embeds


@pytest.mark.filterwarnings("ignore:`torch.jit.[a-z]*` is deprecated")
@pytest.mark.parametrize("wrt", ["hidden", "alphas"])
def test_forward_mode_through_torch_jit_script_raises(wrt, tmp_path):
    # a scripted module runs cif's TorchScript twin, not cif(): forward mode through it
    # used to give a zero tangent (torch.func.jvp) or none (forward_ad) (issue 28, item 12)
    hidden, alphas = cif_inputs()
    module = torch.jit.script(_ScriptedCif())
    path = tmp_path / "cif.pt"
    torch.jit.save(module, str(path))  # the check is TorchScript: the module still saves
    for m in (module, torch.jit.load(str(path))):
        fn = (lambda h: m(h, alphas)) if wrt == "hidden" else (lambda a: m(hidden, a))
        primal = hidden if wrt == "hidden" else alphas
        torch.testing.assert_close(fn(primal), 2 * cifops.cif(hidden, alphas, max_tokens=4).embeds)
        # (a raise in TorchScript comes out as torch.jit.Error, with the message)
        with pytest.raises(torch.jit.Error, match=r"cifops\.cif: forward-mode .*not supported"):
            torch.func.jvp(fn, (primal,), (torch.ones_like(primal),))
        with fwAD.dual_level():
            with pytest.raises(torch.jit.Error, match=r"cifops\.cif: forward-mode"):
                fn(fwAD.make_dual(primal, torch.ones_like(primal)))


@pytest.mark.filterwarnings("ignore:`torch.jit.[a-z]*` is deprecated")
@pytest.mark.parametrize("wrt", ["hidden", "alphas"])
def test_forward_mode_through_torch_jit_trace_raises(wrt):
    # a traced module records the op itself, not cif(): forward mode through it gave a
    # zero tangent (torch.func.jvp)
    hidden, alphas = cif_inputs()
    module = torch.jit.trace(lambda h, a: cifops.cif(h, a, max_tokens=4).embeds, (hidden, alphas))
    fn = (lambda h: module(h, alphas)) if wrt == "hidden" else (lambda a: module(hidden, a))
    primal = hidden if wrt == "hidden" else alphas
    torch.testing.assert_close(fn(primal), cifops.cif(hidden, alphas, max_tokens=4).embeds)
    with pytest.raises(RuntimeError, match=r"cifops\.cif: forward-mode .*not supported"):
        torch.func.jvp(fn, (primal,), (torch.ones_like(primal),))
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match=r"cifops\.cif: forward-mode"):
            fn(fwAD.make_dual(primal, torch.ones_like(primal)))


# --- item 6: meta tensors mixed with real ones -----------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_tokens", [4, None])
@pytest.mark.parametrize("meta_arg", ["hidden", "alphas", "lengths", "target_lengths"])
def test_cif_meta_argument_mixed_with_a_real_device_is_named(meta_arg, max_tokens, device):
    hidden, alphas = cif_inputs(device=device)
    args = dict(
        hidden=hidden,
        alphas=alphas,
        lengths=torch.tensor([6, 5], device=device),
        target_lengths=torch.tensor([2, 3], device=device),
    )
    args[meta_arg] = args[meta_arg].to(META)
    other = "alphas" if meta_arg == "hidden" else meta_arg
    where = f"on {device}(:0)? but hidden is on meta" if meta_arg == "hidden" else f"on meta but hidden is on {device}"
    with pytest.raises((ValueError, RuntimeError), match=rf"cifops\.cif: {other} is {where}"):
        cifops.cif(
            args["hidden"],
            args["alphas"],
            args["lengths"],
            target_lengths=args["target_lengths"],
            max_tokens=max_tokens,
        )


@pytest.mark.parametrize("meta_arg", ["hidden", "alphas", "lengths", "target_lengths"])
def test_cif_forward_op_with_one_meta_argument_is_named(meta_arg):
    # the op itself, not just the wrapper: any meta argument sends it to the fake kernel,
    # which used to return uninitialised CPU tensors
    hidden, alphas = cif_inputs()
    args = dict(hidden=hidden, alphas=alphas, lengths=torch.tensor([6, 5]), target_lengths=torch.tensor([2, 3]))
    args[meta_arg] = args[meta_arg].to(META)
    other = "alphas" if meta_arg == "hidden" else meta_arg
    with pytest.raises(RuntimeError, match=rf"cifops\.cif: {other} is on (meta|cpu) but hidden"):
        torch.ops.cifops.cif_forward(*args.values(), 1.0, 1e-4, None, True, 4)


@pytest.mark.parametrize("meta_arg", ["grad_embeds", "grad_alpha_sum", "alphas", "scan_real", "scan_int"])
def test_cif_backward_op_with_one_meta_argument_is_named(meta_arg):
    hidden, alphas = cif_inputs()
    out = torch.ops.cifops.cif_forward(hidden, alphas, None, None, 1.0, 1e-4, None, True, 3)
    args = dict(
        grad_embeds=torch.ones_like(out[0]),
        grad_alpha_sum=torch.ones(2, dtype=torch.float64),
        hidden=hidden,
        alphas=alphas,
        scan_real=out[4],
        scan_int=out[5],
    )
    args[meta_arg] = args[meta_arg].to(META)
    # alphas is checked with the forward's arguments (check_cif_args), the rest as the
    # backward's own
    with pytest.raises(
        RuntimeError,
        match=rf"cifops\.cif(_backward)?: {meta_arg} is on meta "
        r"but hidden is on cpu",
    ):
        torch.ops.cifops.cif_backward(*args.values(), 1.0, 1e-4, None, True)


def test_cif_all_meta():
    hidden, alphas = cif_inputs()
    out = cifops.cif(hidden.to(META), alphas.to(META), torch.tensor([6, 5], device=META), max_tokens=4)
    assert all(x.device == META for x in out)
    assert out.embeds.shape == (2, 4, 3) and out.fire_frames.shape == (2, 4)
    # the output width depends on the alphas' values, which meta tensors do not have
    with pytest.raises(RuntimeError, match=r"cifops\.cif: meta tensors need max_tokens"):
        cifops.cif(hidden.to(META), alphas.to(META))


@pytest.mark.parametrize("meta_arg", ["teacher", "targets", "temperature"])
def test_contrastive_forward_op_with_one_meta_argument_is_named(meta_arg):
    student, teacher = contrastive_inputs()
    args = dict(student=student, teacher=teacher, targets=torch.arange(4), temperature=torch.tensor(0.1))
    args[meta_arg] = args[meta_arg].to(META)
    with pytest.raises(
        RuntimeError,
        match=rf"cifops\.contrastive_loss: {meta_arg} is on meta "
        r"but student is on cpu",
    ):
        torch.ops.cifops.contrastive_forward(*args.values(), True, False, "sum", -100, False)


@pytest.mark.parametrize("meta_arg", ["grad_loss", "teacher", "targets", "temperature", "stats", "fused_grad"])
def test_contrastive_backward_op_with_one_meta_argument_is_named(meta_arg):
    student, teacher = contrastive_inputs()
    targets, tau = torch.arange(4), torch.tensor(0.1)
    _, stats, fused = torch.ops.cifops.contrastive_forward(
        student, teacher, targets, tau, True, False, "sum", -100, True
    )
    args = dict(
        grad_loss=torch.tensor(1.0, dtype=torch.float64),
        student=student,
        teacher=teacher,
        targets=targets,
        temperature=tau,
        stats=stats,
        fused_grad=fused,
    )
    args[meta_arg] = args[meta_arg].to(META)
    with pytest.raises(
        RuntimeError,
        match=rf"cifops\.contrastive_(loss|backward): {meta_arg} is "
        r"on meta but student is on cpu",
    ):
        torch.ops.cifops.contrastive_backward(*args.values(), True, False, "sum", -100, True, True, True)


@pytest.mark.parametrize("meta_arg", ["teacher", "targets"])
def test_contrastive_accuracy_op_with_one_meta_argument_is_named(meta_arg):
    student, teacher = contrastive_inputs()
    args = dict(student=student, teacher=teacher, targets=torch.arange(4))
    args[meta_arg] = args[meta_arg].to(META)
    with pytest.raises(
        RuntimeError,
        match=rf"cifops\.contrastive_accuracy: {meta_arg} is on "
        r"meta but student is on cpu",
    ):
        torch.ops.cifops.contrastive_accuracy(*args.values(), True, -100)


def test_contrastive_meta_student_with_cpu_temperature_is_meta():
    # a CPU scalar temperature is accepted with any device, meta included
    student, teacher = contrastive_inputs()
    loss = cifops.contrastive_loss(student.to(META), teacher.to(META), temperature=torch.tensor(0.1))
    assert loss.device == META and loss.shape == ()
    with pytest.raises(
        ValueError,
        match=r"student is on meta but teacher is on cpu|"
        r"teacher is on cpu but student is on meta",
    ):
        cifops.contrastive_loss(student.to(META), teacher)


# --- item 7: float16 alphas do not overflow alpha_sum ------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_alpha_sum_is_float32_and_finite(dtype, device):
    T = 70000  # 70000 * 1.0 > 65504, the float16 maximum
    hidden = torch.randn(1, T, 2).to(device, dtype)
    alphas = torch.ones(1, T, dtype=dtype, device=device, requires_grad=True)
    out = cifops.cif(hidden, alphas, max_tokens=2)
    assert out.alpha_sum.dtype == torch.float32
    assert out.alpha_sum.tolist() == [70000.0]
    assert out.embeds.dtype == dtype
    out.alpha_sum.sum().backward()  # float32 gradient flows back into half alphas
    assert alphas.grad.dtype == dtype and (alphas.grad == 1).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_alpha_sum_dtype_of_fake_kernel_matches(dtype):
    hidden, alphas = cif_inputs(dtype=dtype)
    real = cifops.cif(hidden, alphas, max_tokens=3).alpha_sum
    fake = cifops.cif(hidden.to(META), alphas.to(META), max_tokens=3).alpha_sum
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert real.dtype == fake.dtype == expected
    torch.library.opcheck(torch.ops.cifops.cif_forward.default, (hidden, alphas, None, None, 1.0, 1e-4, 0.2, True, 3))


def test_compat_torch_cif_alpha_sum_keeps_torch_cifs_dtype():
    from cifops.compat.torch_cif import cif_function

    hidden, alphas = cif_inputs(dtype=torch.float16)
    assert cif_function(hidden, alphas * 0.5)["alpha_sum"][0].dtype == torch.float16


# --- item 8: scale_eps is checked only when it is used -------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_threshold_below_scale_eps_without_target_lengths(device):
    hidden, alphas = cif_inputs(device=device)
    alphas = alphas * 1e-4
    out = cifops.cif(hidden, alphas, threshold=5e-5)
    ref = cif_reference(hidden.cpu(), alphas.cpu(), threshold=5e-5)
    assert torch.equal(out.token_lengths.cpu(), ref.token_lengths)
    torch.testing.assert_close(out.embeds.cpu(), ref.embeds)
    # with target_lengths the eps is used, and must stay below the threshold
    with pytest.raises(
        RuntimeError,
        match=r"cifops\.cif: scale_eps must be in \[0, threshold\) "
        r"= \[0, 5e-05\) when target_lengths is given, got "
        r"0\.0001",
    ):
        cifops.cif(hidden, alphas, threshold=5e-5, target_lengths=torch.tensor([2, 3], device=device))
    out = cifops.cif(hidden, alphas, threshold=5e-5, scale_eps=1e-6, target_lengths=torch.tensor([2, 3], device=device))
    assert out.token_lengths.tolist() == [2, 3]


# --- item 12: what is accepted ---------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [2**63, 2**70, -(2**63) - 1])
def test_max_tokens_out_of_int64_range(max_tokens):
    hidden, alphas = cif_inputs()
    with pytest.raises(
        ValueError,
        match=r"cifops\.cif: max_tokens must be an int in "
        r"\[0, 2\*\*63 - 1\] or None",
    ):
        cifops.cif(hidden, alphas, max_tokens=max_tokens)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_tokens", [2**62, 2**63 - 1])
def test_max_tokens_too_large_to_allocate(max_tokens, device):
    hidden, alphas = cif_inputs(device=device)
    with pytest.raises(RuntimeError, match=r"cifops\.cif: max_tokens = \d+ is too large"):
        cifops.cif(hidden, alphas, max_tokens=max_tokens)


def test_numpy_integer_max_tokens():
    hidden, alphas = cif_inputs()
    out = cifops.cif(hidden, alphas, max_tokens=np.int64(3))
    assert out.embeds.shape == (2, 3, 3)
    with pytest.raises(ValueError, match=r"max_tokens must be an int in"):
        cifops.cif(hidden, alphas, max_tokens=3.0)
    with pytest.raises(ValueError, match=r"max_tokens must be an int in"):
        cifops.cif(hidden, alphas, max_tokens=True)


FLOAT8 = [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT8)
def test_float8_inputs_are_refused(dtype, device):
    hidden, alphas = cif_inputs(dtype=torch.float32, device=device)
    student, teacher = contrastive_inputs(device=device)
    four = r"float16, bfloat16, float32 or float64, got Float8"
    with pytest.raises(RuntimeError, match=rf"cifops\.cif: hidden must be {four}"):
        cifops.cif(hidden.to(dtype), alphas)
    with pytest.raises(RuntimeError, match=rf"cifops\.cif: alphas must be {four}"):
        cifops.cif(hidden, alphas.to(dtype))
    with pytest.raises(RuntimeError, match=rf"cifops\.contrastive_loss: student must be {four}"):
        cifops.contrastive_loss(student.to(dtype), teacher.to(dtype))
    with pytest.raises(RuntimeError, match=rf"cifops\.contrastive_accuracy: student must be {four}"):
        cifops.contrastive_accuracy(student.to(dtype), teacher.to(dtype))
    with pytest.raises(RuntimeError, match=rf"cifops\.contrastive_loss: temperature must be {four}"):
        cifops.contrastive_loss(student, teacher, temperature=torch.tensor(0.5).to(dtype))


def test_torch_func_grad_says_what_is_accepted():
    hidden, alphas = cif_inputs()
    student, teacher = contrastive_inputs()
    with pytest.raises(
        RuntimeError,
        match=r"cifops\.cif: torch\.func transforms .*"
        r"torch\.autograd\.grad",
    ):
        torch.func.grad(lambda a: cifops.cif(hidden, a).embeds.sum())(alphas)
    with pytest.raises(
        RuntimeError,
        match=r"cifops\.contrastive_loss: torch\.func transforms "
        r".*torch\.autograd\.grad",
    ):
        torch.func.grad(lambda s: cifops.contrastive_loss(s, teacher))(student)
    # what does work: vmap, and grad of something else with the ops' inputs held constant
    x = torch.tensor(2.0, dtype=torch.float64)
    g = torch.func.grad(lambda x: x * cifops.cif(hidden, alphas).embeds.sum())(x)
    torch.testing.assert_close(g, cifops.cif(hidden, alphas).embeds.sum())
    batched = torch.func.vmap(lambda s: cifops.contrastive_loss(s, teacher))(torch.stack([student, 2 * student]))
    torch.testing.assert_close(batched[1], cifops.contrastive_loss(2 * student, teacher))


@pytest.mark.parametrize("temperature", [np.float32(0.25), np.float64(0.25), np.float16(0.25), np.int64(1), 1])
def test_numpy_temperature(temperature):
    student, teacher = contrastive_inputs()
    loss = cifops.contrastive_loss(student, teacher, temperature=temperature)
    torch.testing.assert_close(loss, cifops.contrastive_loss(student, teacher, temperature=float(temperature)))


@pytest.mark.parametrize("temperature", ["0.1", np.bool_(True), True, None, [0.1]])
def test_temperature_of_another_type_says_what_is_accepted(temperature):
    student, teacher = contrastive_inputs()
    with pytest.raises(
        TypeError,
        match=r"cifops\.contrastive_loss: temperature must be a float "
        r"or a 0-dim tensor \(a Python or numpy real number",
    ):
        cifops.contrastive_loss(student, teacher, temperature=temperature)
