"""cifops.cif against the literal float64 reference (cifops/reference.py), plus
gradcheck, opcheck, torch.compile, dtypes, layouts and input errors."""

import math

import pytest
import torch
from hypothesis import assume, given, strategies as st

import cifops
from cifops.reference import cif_reference

from conftest import assert_cuda_emulation_passes, requires_cuda

DYADIC = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.5]
THRESHOLDS = [1.0, 0.5, 0.75, 2.0, 0.3]


@st.composite
def cif_cases(draw, positive=False):
    """A batch and a set of options covering the contract's corners."""
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 10))
    D = draw(st.integers(1, 5))
    if positive:  # continuous weights, strictly positive: no exact boundaries
        alpha_values = st.floats(0.05, 2.5)
    else:
        alpha_values = st.one_of(st.sampled_from(DYADIC), st.floats(0.0, 2.5), st.just(0.0))
    alphas = torch.tensor(
        draw(st.lists(st.lists(alpha_values, min_size=T, max_size=T), min_size=B, max_size=B)), dtype=torch.float64
    )
    if not positive and draw(st.booleans()):
        alphas[draw(st.integers(0, B - 1))] = 0.0  # an all-zero row
    lengths = None
    if draw(st.booleans()):
        low = 1 if positive else 0
        lengths = torch.tensor(draw(st.lists(st.integers(low, T), min_size=B, max_size=B)))
    opts = dict(threshold=draw(st.sampled_from(THRESHOLDS)))
    if draw(st.booleans()):
        L = lengths if lengths is not None else torch.full((B,), T)
        sums = [float(alphas[b, : int(L[b])].sum()) for b in range(B)]
        opts["target_lengths"] = torch.tensor([draw(st.integers(0, 5)) if s > 0 else 0 for s in sums])
    if draw(st.booleans()):
        opts["tail_threshold"] = draw(st.sampled_from([0.0, 0.1, 0.25, 0.5]))
        opts["tail_mode"] = draw(st.sampled_from(["keep", "normalize"]))
    if draw(st.booleans()):
        opts["max_tokens"] = draw(st.integers(0, 6))
    seed = draw(st.integers(0, 2**16))
    hidden = torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return hidden, alphas, lengths, opts


def assert_same(out, ref, rtol=1e-9, atol=1e-9):
    assert torch.equal(out.token_lengths, ref.token_lengths), (out.token_lengths, ref.token_lengths)
    assert torch.equal(out.fire_frames, ref.fire_frames), (out.fire_frames, ref.fire_frames)
    torch.testing.assert_close(out.embeds.double(), ref.embeds, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.alpha_sum.double(), ref.alpha_sum, rtol=rtol, atol=atol)


@given(cif_cases())
def test_matches_reference(case):
    hidden, alphas, lengths, opts = case
    assert_same(cifops.cif(hidden, alphas, lengths, **opts), cif_reference(hidden, alphas, lengths, **opts))


@given(cif_cases())
def test_float32_matches_reference(case):
    hidden, alphas, lengths, opts = case
    out = cifops.cif(hidden.float(), alphas, lengths, **opts)  # float64 alphas: same decisions
    ref = cif_reference(hidden.float(), alphas, lengths, **opts)
    assert out.embeds.dtype == torch.float32
    assert_same(out, ref, rtol=1e-5, atol=1e-5)


@given(cif_cases(positive=True))
def test_gradients_match_reference(case):
    hidden, alphas, lengths, opts = case
    # Gradients are one-sided where a prefix sum sits exactly on a token boundary
    # (e.g. alpha = 1.0): keep to inputs where the contract is differentiable.
    for b in range(alphas.shape[0]):
        L = alphas.shape[1] if lengths is None else int(lengths[b])
        scale = 1.0
        if "target_lengths" in opts:
            scale = (opts["threshold"] * int(opts["target_lengths"][b]) + 1e-4) / float(alphas[b, :L].sum())
        steps = torch.cumsum(alphas[b, :L] * scale, 0) / opts["threshold"]
        assume(bool(((steps - steps.round()).abs() > 1e-6).all()))
    grads = []
    for fn in (cifops.cif, cif_reference):
        h = hidden.clone().requires_grad_()
        a = alphas.clone().requires_grad_()
        out = fn(h, a, lengths, **opts)
        weights = torch.linspace(-1, 1, out.embeds.numel(), dtype=torch.float64)
        loss = (out.embeds.double().flatten() * weights).sum() + (out.alpha_sum * 0.3).sum()
        grads.append(torch.autograd.grad(loss, (h, a), allow_unused=True))
    for got, want in zip(*grads):
        want = torch.zeros_like(got) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)


def _contract_residual(alphas, beta, target=None, eps=0.0):
    """The residual r = P_L - n beta of one utterance, in Python floats literally as the
    contract writes it: the scale (beta * target + eps) / S (S the sequential sum), the
    prefix sum P_{t+1} = P_t + scale * a_t, and n the tokens fired (>= firing)."""
    scale = 1.0
    if target is not None:
        total = 0.0
        for x in alphas:
            total += x
        scale = (beta * target + eps) / total if total > 0 else 0.0
    p = 0.0
    for x in alphas:
        p += x * scale
    n = 0
    while (n + 1) * beta <= p:
        n += 1
    return p - n * beta


def test_reference_matches_kernel_on_many_random_cases():
    # The reference's fire decisions must be the kernel's bit for bit: thousands of
    # utterances with scale_eps=0 (the scaled prefix sum lands on beta * target up to the
    # last bit, so the scale must be the contract's division, not reciprocal * value) and
    # with the tail threshold on an utterance's residual or a float next to it. The
    # reference used to disagree on about one utterance in ten of these.
    g = torch.Generator().manual_seed(28)
    B, T, D = 48, 6, 2
    dyadic = torch.tensor(DYADIC, dtype=torch.float64)
    checked = 0
    for it in range(50):
        beta = THRESHOLDS[it % len(THRESHOLDS)]
        # float32 values in float64 (as a model's), exact zeros and dyadic multiples of beta
        alphas = torch.rand(B, T, generator=g).mul(1.5 * beta).double()
        kind = torch.randint(0, 4, (B, T), generator=g)
        pick = dyadic[torch.randint(0, len(DYADIC), (B, T), generator=g)]
        alphas = torch.where(kind == 1, pick * beta, torch.where(kind == 0, 0.0, alphas))
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        hidden = torch.randn(B, T, D, dtype=torch.float64, generator=g)
        rows = [alphas[b, : int(lengths[b])].tolist() for b in range(B)]
        target = torch.randint(0, 7, (B,), generator=g)
        target = torch.where(torch.tensor([sum(r) > 0 for r in rows]), target, 0)
        edge = [lambda r: r, lambda r: math.nextafter(r, math.inf), lambda r: math.nextafter(r, -math.inf)][it % 3]
        row = rows[it % B]
        scaled_tail = max(edge(_contract_residual(row, beta, int(target[it % B]))), 0.0)
        for opts in (
            dict(target_lengths=target, scale_eps=0.0),
            dict(
                target_lengths=target,
                scale_eps=0.0,
                tail_threshold=scaled_tail,
                tail_mode=["keep", "normalize"][it % 2],
            ),
            dict(tail_threshold=max(edge(_contract_residual(row, beta)), 0.0)),
        ):
            assert_same(
                cifops.cif(hidden, alphas, lengths, threshold=beta, **opts),
                cif_reference(hidden, alphas, lengths, threshold=beta, **opts),
            )
            checked += B
    assert checked >= 7000
    # the example of issue 28: the kernel fires 3 tokens, the reference fired 2
    alphas = torch.tensor([[0, 0, 0, 0.12100869417190552, 0.7260521650314331]], dtype=torch.float64)
    opts = dict(target_lengths=torch.tensor([3]), scale_eps=0.0)
    assert cif_reference(torch.ones(1, 5, 1, dtype=torch.float64), alphas, **opts).token_lengths.tolist() == [3]


def test_known_values():
    # Worked by hand from the definition: multi-fire, a split frame and a tail.
    hidden = torch.tensor([[[1.0], [10.0], [100.0], [1000.0]]], dtype=torch.float64)
    alphas = torch.tensor([[0.5, 1.75, 0.25, 0.3]], dtype=torch.float64)
    out = cifops.cif(hidden, alphas, tail_threshold=0.2, tail_mode="keep")
    # P = 0, 0.5, 2.25, 2.5, 2.8. Token 0 = 0.5*1 + 0.5*10 fires at frame 1, which
    # also fires token 1 = 1.0*10 (multi-fire); the tail [2, 2.8) = 0.25*10 + 0.25*100
    # + 0.3*1000 fires at the last frame.
    assert out.token_lengths.tolist() == [3]
    assert out.fire_frames.tolist() == [[1, 1, 3]]
    assert out.embeds[0, :, 0].tolist() == pytest.approx([5.5, 10.0, 2.5 + 25.0 + 300.0])
    assert out.alpha_sum.item() == pytest.approx(2.8)
    # normalised tail: weights 0.25+0.25+0.3 = 0.8 of a token, scaled by 1/0.8
    out = cifops.cif(hidden, alphas, tail_threshold=0.2)
    assert out.embeds[0, 2, 0].item() == pytest.approx((2.5 + 25.0 + 300.0) / 0.8)
    out = cifops.cif(hidden, alphas)  # no tail threshold: the residual is dropped
    assert out.token_lengths.tolist() == [2]


def test_target_lengths_fire_exactly():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 50, 8, generator=g)
    alphas = torch.rand(6, 50, generator=g)
    lengths = torch.tensor([50, 49, 30, 7, 1, 50])
    target = torch.tensor([12, 0, 31, 3, 4, 60])
    out = cifops.cif(hidden, alphas, lengths, target_lengths=target)
    assert out.token_lengths.tolist() == target.tolist()
    valid = torch.arange(50)[None] < lengths[:, None]
    torch.testing.assert_close(out.alpha_sum, (alphas * valid).sum(1))


@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(tail_threshold=0.05),
        dict(tail_threshold=0.05, tail_mode="keep"),
        dict(target_lengths=torch.tensor([3, 2, 1])),
        dict(target_lengths=torch.tensor([3, 2, 1]), threshold=0.8),
        dict(threshold=0.6, tail_threshold=0.05, max_tokens=3),
    ],
)
def test_gradcheck(opts):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    alphas = (torch.rand(3, 7, dtype=torch.float64, generator=g) * 1.6 + 0.05).requires_grad_()
    lengths = torch.tensor([7, 5, 3])

    def fn(h, a):
        out = cifops.cif(h, a, lengths, **opts)
        return out.embeds, out.alpha_sum

    assert torch.autograd.gradcheck(fn, (hidden, alphas))


def _opcheck_samples():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 6, 3, dtype=torch.float64, generator=g)
    alphas = torch.rand(2, 6, dtype=torch.float64, generator=g) + 0.05
    lengths = torch.tensor([6, 4])
    return [
        (hidden, alphas, None, None, 1.0, 1e-4, None, True, 5),
        (hidden, alphas, lengths, torch.tensor([2, 3]), 1.0, 1e-4, None, True, 4),
        (hidden.float(), alphas.float(), lengths, None, 0.7, 1e-4, 0.1, False, 6),
    ]


@pytest.mark.parametrize("sample", range(3))
def test_opcheck_forward(sample):
    args = list(_opcheck_samples()[sample])
    args[0] = args[0].clone().requires_grad_()
    args[1] = args[1].clone().requires_grad_()
    torch.library.opcheck(torch.ops.cifops.cif_forward.default, tuple(args))


def test_opcheck_backward():
    hidden, alphas, lengths, target, *rest = _opcheck_samples()[1]
    scan_real, scan_int = torch.ops.cifops.cif_forward(hidden, alphas, lengths, target, *rest)[4:]
    grad = torch.randn(2, 4, 3, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.cifops.cif_backward.default,
        (grad, torch.randn(2, dtype=torch.float64), hidden, alphas, scan_real, scan_int, 1.0, 1e-4, None, True),
    )


def test_compile_fullgraph():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.cif = cifops.Cif(max_tokens=6, tail_threshold=0.3)

        def forward(self, x, alphas, lengths):
            out = self.cif(self.proj(x), torch.sigmoid(alphas), lengths)
            return out.embeds.square().sum() + out.alpha_sum.sum()

    torch.manual_seed(0)
    model = Model()
    x, alphas, lengths = torch.randn(2, 10, 8), torch.randn(2, 10), torch.tensor([10, 7])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(x, alphas, lengths)
    loss.backward()
    grad_compiled = model.proj.weight.grad.clone()
    model.zero_grad()
    eager = model(x, alphas, lengths)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grad_compiled, model.proj.weight.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 40, 16, generator=g).to(dtype).requires_grad_()
    alphas = torch.rand(3, 40, generator=g).to(dtype).requires_grad_()
    out = cifops.cif(hidden, alphas, tail_threshold=0.3)
    assert out.embeds.dtype == dtype and out.alpha_sum.dtype == torch.float32
    ref = cif_reference(hidden.detach().double(), alphas.detach().double(), tail_threshold=0.3)
    assert torch.equal(out.token_lengths, ref.token_lengths)
    torch.testing.assert_close(out.embeds.double(), ref.embeds, rtol=2e-2, atol=5e-2)
    out.embeds.float().sum().backward()
    assert hidden.grad.dtype == dtype and alphas.grad.dtype == dtype
    assert torch.isfinite(hidden.grad.float()).all() and torch.isfinite(alphas.grad.float()).all()


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 16, 20, generator=g)[:, :, ::2]  # strided D
    alphas = torch.rand(16, 3, generator=g).t()  # transposed
    lengths = torch.tensor([[16, 9, 4]]).t()[:, 0]
    assert not hidden.is_contiguous() and not alphas.is_contiguous()
    out = cifops.cif(hidden, alphas, lengths, tail_threshold=0.2)
    assert_same(out, cif_reference(hidden, alphas, lengths, tail_threshold=0.2), rtol=1e-5, atol=1e-5)


def test_integer_lengths_dtypes_and_empty_shapes():
    hidden, alphas = torch.randn(2, 5, 3), torch.rand(2, 5)
    for dtype in (torch.int32, torch.int64, torch.int16):
        out = cifops.cif(hidden, alphas, torch.tensor([5, 2], dtype=dtype))
        assert out.token_lengths.dtype == torch.int64
    out = cifops.cif(torch.randn(0, 5, 3), torch.rand(0, 5))
    assert out.embeds.shape == (0, 0, 3)
    out = cifops.cif(torch.randn(2, 0, 3), torch.rand(2, 0), tail_threshold=0.1)
    assert out.embeds.shape == (2, 0, 3) and out.token_lengths.tolist() == [0, 0]
    out = cifops.cif(torch.randn(2, 4, 0), torch.full((2, 4), 0.6))
    assert out.embeds.shape == (2, 2, 0) and out.fire_frames.tolist() == [[1, 3], [1, 3]]
    out = cifops.cif(hidden, alphas, max_tokens=0)
    assert out.embeds.shape == (2, 0, 3)


def test_max_tokens_truncates_and_pads():
    hidden = torch.randn(1, 6, 2, dtype=torch.float64)
    alphas = torch.full((1, 6), 0.5, dtype=torch.float64)
    full = cifops.cif(hidden, alphas)
    short = cifops.cif(hidden, alphas, max_tokens=2)
    long = cifops.cif(hidden, alphas, max_tokens=5)
    assert full.token_lengths.item() == 3 and short.token_lengths.item() == 2
    assert torch.equal(short.embeds, full.embeds[:, :2])
    assert torch.equal(long.embeds[:, :3], full.embeds) and (long.embeds[:, 3:] == 0).all()
    assert long.fire_frames.tolist() == [[1, 3, 5, -1, -1]]


def test_build_info():
    info = cifops.build_info()
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"]


@pytest.mark.parametrize(
    "make_args, match",
    [
        (lambda: (torch.randn(2, 5), torch.rand(2, 5)), "hidden must be a 3-D tensor"),
        (lambda: (torch.randn(2, 5, 3), torch.rand(2, 5, 1)), "alphas must be a 2-D tensor"),
        (lambda: (torch.randn(2, 5, 3), torch.rand(2, 4)), r"alphas must have shape \[B, T\]"),
        (lambda: (torch.ones(2, 5, 3, dtype=torch.int64), torch.rand(2, 5)), "hidden must be float16"),
        (lambda: (torch.randn(2, 5, 3), torch.ones(2, 5, dtype=torch.int64)), "alphas must be float16"),
        (
            lambda: (torch.randn(2, 5, 3), torch.tensor([[0.5, -0.1, 0.2, 0.3, 0.1]] * 2)),
            r"alphas must be finite and >= 0, got alphas\[0, 1\] = -0.1",
        ),
        (
            lambda: (
                torch.randn(2, 5, 3),
                torch.tensor([[0.5, 0.1, 0.2, 0.3, 0.1], [0.1, 0.1, float("nan"), 0.3, 0.1]]),
            ),
            r"alphas\[1, 2\] = nan",
        ),
        (
            lambda: (torch.randn(2, 5, 3), torch.tensor([[0.5, 0.1, float("inf"), 0.3, 0.1]] * 2)),
            r"alphas\[0, 2\] = inf",
        ),
    ],
)
def test_bad_tensors(make_args, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        cifops.cif(*make_args())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lengths=torch.tensor([5, 6])), r"lengths must be in \[0, T\] = \[0, 5\], got lengths\[1\] = 6"),
        (dict(lengths=torch.tensor([-1, 5])), r"lengths\[0\] = -1"),
        (dict(lengths=torch.tensor([5])), r"lengths must be a 1-D tensor \[B\]"),
        (dict(lengths=torch.tensor([5.0, 4.0])), "lengths must be an integer tensor"),
        (dict(threshold=0.0), "threshold must be a finite number > 0"),
        (dict(threshold=float("nan")), "threshold must be a finite number > 0"),
        (dict(tail_mode="drop"), "tail_mode must be 'keep' or 'normalize'"),
        (dict(tail_threshold=-0.5), "tail_threshold must be"),
        (dict(max_tokens=-2), r"max_tokens must be an int in \[0, 2\*\*63 - 1\] or None"),
        (
            dict(scale_eps=1.5, target_lengths=torch.tensor([3, 2])),
            r"scale_eps must be in \[0, threshold\) = \[0, 1\) when target_lengths is given",
        ),
        (dict(target_lengths=torch.tensor([3, -1])), r"target_lengths must be >= 0, got target_lengths\[1\] = -1"),
        (
            dict(target_lengths=torch.tensor([3, 2]), lengths=torch.tensor([5, 0])),
            r"target_lengths\[1\] = 2 but the valid alphas of utterance 1 sum to zero",
        ),
    ],
)
def test_bad_options(kwargs, match):
    hidden, alphas = torch.randn(2, 5, 3), torch.rand(2, 5) + 0.1
    lengths = kwargs.pop("lengths", None)
    with pytest.raises((RuntimeError, ValueError), match=match):
        cifops.cif(hidden, alphas, lengths, **kwargs)


def test_bad_input_to_backward_op():
    hidden, alphas = torch.randn(2, 5, 3), torch.rand(2, 5)
    scan_real, scan_int = torch.ops.cifops.cif_forward(hidden, alphas, None, None, 1.0, 1e-4, None, True, 3)[4:]
    with pytest.raises(RuntimeError, match="grad_embeds must have shape"):
        torch.ops.cifops.cif_backward(
            torch.randn(2, 3, 4), None, hidden, alphas, scan_real, scan_int, 1.0, 1e-4, None, True
        )
    # a workspace that is not this forward's (another T) is refused, naming it
    with pytest.raises(RuntimeError, match="scan_real must be the forward's"):
        torch.ops.cifops.cif_backward(
            torch.randn(2, 3, 3), None, hidden, alphas, scan_real[:-1], scan_int, 1.0, 1e-4, None, True
        )
    with pytest.raises(RuntimeError, match="scan_int must be the forward's"):
        torch.ops.cifops.cif_backward(
            torch.randn(2, 3, 3), None, hidden, alphas, scan_real, scan_int.float(), 1.0, 1e-4, None, True
        )


# --- CUDA -------------------------------------------------------------------------


def _cuda_cases():
    g = torch.Generator().manual_seed(5)
    cases = []
    for B, T, D in [(1, 1, 1), (3, 17, 5), (8, 200, 256), (4, 333, 300), (2, 64, 1000)]:
        alphas = torch.rand(B, T, generator=g) * 1.5
        alphas[0, : T // 3] = torch.tensor(DYADIC)[torch.randint(len(DYADIC), (T // 3,), generator=g)]
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        cases.append((torch.randn(B, T, D, generator=g), alphas, lengths))
    return cases


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(tail_threshold=0.3),
        dict(tail_threshold=0.2, tail_mode="keep", max_tokens=40),
        dict(target_lengths="auto", threshold=0.9),
    ],
)
def test_cuda_matches_cpu(dtype, opts):
    for hidden, alphas, lengths in _cuda_cases():
        kw = dict(opts)
        if kw.get("target_lengths") == "auto":
            kw["target_lengths"] = torch.randint(1, 30, lengths.shape) * (lengths > 0)
        h = hidden.to(dtype).requires_grad_()
        a = alphas.clone().requires_grad_()
        cpu = cifops.cif(h, a, lengths, **kw)
        hc = h.detach().cuda().requires_grad_()
        ac = alphas.cuda().requires_grad_()
        gpu = cifops.cif(hc, ac, lengths.cuda(), **{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw.items()})
        assert torch.equal(gpu.token_lengths.cpu(), cpu.token_lengths)
        assert torch.equal(gpu.fire_frames.cpu(), cpu.fire_frames)
        tol = dict(rtol=1e-2, atol=1e-2) if dtype in (torch.float16, torch.bfloat16) else {}
        torch.testing.assert_close(gpu.embeds.cpu(), cpu.embeds, **tol)
        weights = torch.randn(cpu.embeds.shape).to(dtype)
        (cpu.embeds * weights).float().sum().backward()
        (gpu.embeds * weights.cuda()).float().sum().backward()
        torch.testing.assert_close(hc.grad.cpu(), h.grad, **tol)
        torch.testing.assert_close(ac.grad.cpu(), a.grad, rtol=1e-3, atol=1e-3 * a.shape[1])


def _scan_workspace(hidden, alphas, lengths, target, threshold=1.0, tail=None, max_tokens=-1):
    out = torch.ops.cifops.cif_forward(hidden, alphas, lengths, target, threshold, 1e-4, tail, True, max_tokens)
    return out[4], out[5]


@requires_cuda
@pytest.mark.parametrize("alpha_dtype", [torch.float32, torch.float64])
def test_cuda_scan_workspace_bitwise_equal_to_cpu(alpha_dtype):
    """The scan's prefix sums, fire counts and per-utterance results (the workspace the
    backward reads) are bit for bit the CPU's: with target-length scaling (a product and
    a sum rounded separately on both backends), dyadic weights landing on boundaries,
    multi-fire, T above the CUDA scan's 1024-frame tile, and invalid utterances (which
    the CUDA op with max_tokens reports as empty instead of raising)."""
    g = torch.Generator().manual_seed(11)
    for B, T in [(3, 5), (4, 700), (3, 2500)]:
        alphas = (torch.rand(B, T, generator=g) * 1.2).to(alpha_dtype)
        alphas[0, : T // 2] = torch.tensor(DYADIC, dtype=alpha_dtype)[
            torch.randint(len(DYADIC), (T // 2,), generator=g)
        ]
        alphas[1, ::7] = 3.7  # multi-fire frames
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        lengths[0] = T
        hidden = torch.randn(B, T, 4, generator=g)
        for target in (None, torch.randint(0, 3 * T // 4 + 2, (B,), generator=g)):
            for threshold, tail in ((1.0, None), (0.75, 0.3)):
                cpu = _scan_workspace(hidden, alphas, lengths, target, threshold, tail)
                gpu = _scan_workspace(
                    hidden.cuda(),
                    alphas.cuda(),
                    lengths.cuda(),
                    None if target is None else target.cuda(),
                    threshold,
                    tail,
                )
                assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])
    # invalid utterances: a negative and a NaN weight, a length above T, a negative
    # target, a positive target over zero weights; max_tokens avoids the raise on CUDA
    alphas = torch.rand(5, 9, dtype=torch.float64)
    alphas[0, 4], alphas[1, 2] = -0.5, float("nan")
    alphas[4] = 0.0
    lengths = torch.tensor([9, 9, 10, 9, 9])
    target = torch.tensor([2, 2, 2, -1, 3])
    gpu = _scan_workspace(torch.randn(5, 9, 2).cuda(), alphas.cuda(), lengths.cuda(), target.cuda(), max_tokens=4)
    cpu_rows = []
    for b in range(5):  # the CPU raises for a bad utterance, so compare row by row
        try:
            cpu_rows.append(
                _scan_workspace(
                    torch.randn(1, 9, 2), alphas[b : b + 1], lengths[b : b + 1], target[b : b + 1], max_tokens=4
                )
            )
        except RuntimeError:
            cpu_rows.append(None)
    assert all(r is None for r in cpu_rows)
    info = gpu[1].cpu()[5 * 9 :].view(5, 7)
    assert info[:, 4].tolist() == [1, 1, 2, 3, 4]  # CifStatus of each utterance
    assert info[:, 5].tolist()[:2] == [4, 2]  # the offending frames
    assert torch.equal(info[:, 0], torch.zeros(5, dtype=torch.long))  # no tokens


@requires_cuda
def test_cuda_no_host_sync_with_max_tokens():
    """With max_tokens, forward and backward make no device-to-host synchronisation."""
    hidden = torch.randn(4, 300, 64, device="cuda", requires_grad=True)
    alphas = (torch.rand(4, 300, device="cuda") * 0.6).requires_grad_()
    lengths = torch.tensor([300, 250, 10, 0], device="cuda")
    target = torch.tensor([50, 40, 2, 0], device="cuda")
    probe = torch.randn(60, 64, device="cuda")
    cifops.cif(hidden, alphas, lengths, max_tokens=60)  # load the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = cifops.cif(hidden, alphas, lengths, target_lengths=target, max_tokens=60, tail_threshold=0.4)
        gh, ga = torch.autograd.grad((out.embeds * probe).sum() + out.alpha_sum.sum(), (hidden, alphas))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = cifops.cif(
        hidden.detach().cpu().requires_grad_(),
        alphas.detach().cpu(),
        lengths.cpu(),
        target_lengths=target.cpu(),
        max_tokens=60,
        tail_threshold=0.4,
    )
    assert torch.equal(out.fire_frames.cpu(), cpu.fire_frames)
    assert torch.isfinite(gh).all() and torch.isfinite(ga).all()


@requires_cuda
def test_cuda_deterministic_and_large():
    g = torch.Generator(device="cuda").manual_seed(6)
    hidden = torch.randn(64, 1500, 512, device="cuda", generator=g, requires_grad=True)
    alphas = (torch.rand(64, 1500, device="cuda", generator=g) * 0.9).requires_grad_()
    results = []
    for _ in range(2):
        out = cifops.cif(hidden, alphas, tail_threshold=0.5)
        gh, ga = torch.autograd.grad(out.embeds.square().sum(), (hidden, alphas))
        results.append((out.embeds, gh, ga))
    for x, y in zip(*results):
        assert torch.equal(x, y)
    cpu = cifops.cif(hidden.detach().cpu()[:4], alphas.detach().cpu()[:4], tail_threshold=0.5)
    torch.testing.assert_close(results[0][0][:4, : cpu.embeds.shape[1]].cpu(), cpu.embeds, rtol=1e-4, atol=1e-4)


@requires_cuda
def test_cuda_graph_capture_with_max_tokens():
    hidden = torch.randn(4, 100, 64, device="cuda")
    alphas = torch.rand(4, 100, device="cuda")
    lengths = torch.tensor([100, 80, 50, 10], device="cuda")
    eager = cifops.cif(hidden, alphas, lengths, max_tokens=60)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cifops.cif(hidden, alphas, lengths, max_tokens=60)  # warm-up outside capture
        with torch.cuda.graph(graph):
            captured = cifops.cif(hidden, alphas, lengths, max_tokens=60)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.embeds, eager.embeds)
    assert torch.equal(captured.fire_frames, eager.fire_frames)


@requires_cuda
def test_cuda_device_mismatch():
    with pytest.raises(RuntimeError, match="alphas is on cpu but hidden is on cuda"):
        cifops.cif(torch.randn(2, 5, 3, device="cuda"), torch.rand(2, 5))


def test_import_errors_say_how_to_rebuild(monkeypatch):
    from cifops import _loader

    class StaleLibrary:
        torch_version = "0.0.1"

    monkeypatch.setattr(_loader, "_C", None)
    monkeypatch.setattr(_loader.importlib, "import_module", lambda name: StaleLibrary)
    with pytest.raises(ImportError, match=r"built against torch 0.0.1 .*pip install --no-build-isolation -e \."):
        _loader.load_library()

    def missing(name):
        raise ImportError(f"No module named '{name}'")

    monkeypatch.setattr(_loader.importlib, "import_module", missing)
    with pytest.raises(ImportError, match=r"cifops._C is missing .*Rebuild it"):
        _loader.load_library()

    def wrong_abi(name):
        raise ImportError("_C.so: undefined symbol: _ZN3c104cuda")

    monkeypatch.setattr(_loader.importlib, "import_module", wrong_abi)
    with pytest.raises(ImportError, match=r"does not match torch .*Rebuild it"):
        _loader.load_library()


def test_tiny_residual_tail_in_float32():
    # beta / r = 7e140 does not fit float32: the scale must apply to the float64 weights.
    hidden = torch.tensor([[[1.5410]]])
    alphas = torch.tensor([[1.4601e-141]], dtype=torch.float64)
    out = cifops.cif(hidden, alphas, tail_threshold=0.0)
    assert out.token_lengths.tolist() == [1]
    torch.testing.assert_close(out.embeds, hidden)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_tiny_residual_tail_gradient_is_finite(device):
    # beta / r = 7e140 overflows float32 in the backward's dot products too (found by the
    # CUDA emulation): the alpha gradient of this single-frame tail is 0, not NaN.
    hidden = torch.tensor([[[1.5410]]], device=device, requires_grad=True)
    alphas = torch.tensor([[1.4601e-141]], dtype=torch.float64, device=device, requires_grad=True)
    out = cifops.cif(hidden, alphas, tail_threshold=0.0)
    gh, ga = torch.autograd.grad(out.embeds.sum(), (hidden, alphas))
    assert ga.tolist() == [[0.0]] and torch.isfinite(gh).all()


@requires_cuda
@pytest.mark.parametrize("T", [64, 1025, 1500, 3000])
def test_cuda_fire_frames_of_long_uniform_spans(T):
    """The warp's 32-ary search for a token's fire frame must reach the last frame of
    every span (with T = 64 and weights 0.25 the 16th token fires at frame 63; an earlier
    search step left it unprobed and returned -1)."""
    hidden = torch.randn(2, T, 8, dtype=torch.float64)
    alphas = torch.full((2, T), 0.25, dtype=torch.float64)
    alphas[1] = torch.rand(T, dtype=torch.float64) * 0.7
    cpu = cifops.cif(hidden, alphas)
    gpu = cifops.cif(hidden.cuda(), alphas.cuda())
    assert torch.equal(gpu.fire_frames.cpu(), cpu.fire_frames)
    torch.testing.assert_close(gpu.embeds.cpu(), cpu.embeds)


def test_cuda_kernels_under_cpu_emulation(tmp_path):
    """The CUDA kernels (csrc/cif/cif_cuda.cu) compiled as C++ and run on the CPU under
    tests/native/cif_cuda_emulation (one fiber per CUDA thread, emulated barriers, shuffles
    and ballots), against the CPU kernels on fixed and seeded random cases: bit-identical
    scan workspace and fire frames, embeds and gradients within rounding, deterministic
    backward. Needs g++ >= 12; under a minute on 2 cores, most of it compiling."""
    assert_cuda_emulation_passes("cif_cuda_emulation", tmp_path)
