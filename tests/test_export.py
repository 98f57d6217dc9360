"""Export of cifops.cif (cifops/_export.py, cifops/_cif_math.py): the pure-PyTorch
decomposition against the kernels, chunk-by-chunk streaming with cif_chunk/cif_tail
against the whole input, torch.export with dynamic shapes, the ONNX round trip in ONNX
Runtime, torch.jit.script, and the modules' import graph. The reference everywhere is the
compiled op (csrc/cif), which shares no code with the decomposition."""

import io
import random
import warnings

import pytest
import torch

import cifops
from cifops._cif_math import cif_chunk, cif_tail
from cifops._export import _cif_forward_decomposition

OP = torch.ops.cifops.cif_forward
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
DYADIC = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.5]
THRESHOLDS = [1.0, 0.5, 0.75, 2.0, 0.3, 1 / 3]
# embeds: the kernel accumulates in float32 (float64), the decomposition in float64
TOL = {F32: dict(rtol=1e-5, atol=1e-5), F64: dict(rtol=1e-12, atol=1e-12), BF16: dict(rtol=1e-2, atol=1e-2)}


def random_case(seed):
    """Inputs and options for cif_forward covering the contract's corners: non-dyadic
    and dyadic weights (ties on boundaries), zero-weight frames, multi-fire frames,
    thresholds != 1, lengths < T with NaN padding, target_lengths, tails, three dtypes."""
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B, T, D = r.randint(1, 4), r.randint(1, 20), r.randint(1, 6)
    beta = r.choice(THRESHOLDS)
    kind = r.choice(["uniform", "dyadic", "multi"])
    if kind == "uniform":
        a = torch.rand(B, T, generator=g, dtype=F64) * 0.7 * beta
    elif kind == "dyadic":
        a = torch.tensor(DYADIC, dtype=F64)[torch.randint(len(DYADIC), (B, T), generator=g)]
    else:
        a = torch.rand(B, T, generator=g, dtype=F64) * 3.5 * beta
    a[torch.rand(B, T, generator=g) < 0.25] = 0.0
    hidden_dtype = r.choice([F32, F32, F64, BF16])
    alphas = a.to(r.choice([F32, F64, BF16] if kind != "dyadic" else [F32, F64]))
    hidden = torch.randn(B, T, D, generator=g).to(hidden_dtype)
    lengths = None
    if r.random() < 0.6:
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        hidden[torch.arange(T) >= lengths[:, None]] = float("nan")  # padding is ignored
    target = None
    if r.random() < 0.3:
        L = lengths if lengths is not None else torch.full((B,), T)
        sums = [float(alphas[b, : int(L[b])].double().sum()) for b in range(B)]
        target = torch.tensor([r.randint(0, 5) if s > 0 else 0 for s in sums])
    tail = r.choice([None, 0.0, 0.25, 0.5])
    normalize = r.random() < 0.5
    args = [hidden, alphas, lengths, target, beta, 1e-4, tail, normalize, -1]
    n_max = OP(*args)[1].max().item()
    args[-1] = r.choice([n_max, n_max + 2, max(n_max - 1, 0), max(n_max - 2, 0)])
    return args


def assert_same(got, ref, dtype):
    names = ["embeds", "token_lengths", "fire_frames", "alpha_sum", "scan_real", "scan_int"]
    for name, x, y in zip(names, got, ref):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if name == "embeds":
            torch.testing.assert_close(x, y, **TOL[dtype], msg=name)
        else:
            assert torch.equal(x, y), f"{name}:\n{x}\n{y}"


@pytest.mark.parametrize("seed", range(150))
def test_decomposition_equals_op(seed):
    args = random_case(seed)
    assert_same(_cif_forward_decomposition(*args), OP(*args), args[0].dtype)


def test_decomposition_prefix_sums_dyadic_ties():
    # 0.25 + 0.75 lands exactly on the boundary 1.0: fires (>=), on the same frame
    hidden = torch.randn(1, 6, 3)
    alphas = torch.tensor([[0.25, 0.75, 0.0, 0.5, 0.5, 2.0]])
    args = [hidden, alphas, None, None, 1.0, 1e-4, 0.0, True, 6]
    ref = OP(*args)
    assert ref[2].tolist() == [[1, 4, 5, 5, -1, -1]]
    assert_same(_cif_forward_decomposition(*args), ref, F32)


INVALID = {  # utterance 1 is invalid; status and offending frame of cif_scan_row
    "negative": (dict(alpha=-0.5), 1, 2),
    "nan": (dict(alpha=float("nan")), 1, 2),
    "inf": (dict(alpha=float("inf")), 1, 2),
    "huge": (dict(alpha=1e38), 5, 2),
    "length": (dict(length=9), 2, -1),
    "negative length": (dict(length=-1), 2, -1),
    "target": (dict(target=-1), 3, -1),
    "zero sum": (dict(zero=True, target=2), 4, -1),
}


@pytest.mark.parametrize("case", INVALID, ids=list(INVALID))
def test_invalid_utterance_emits_no_tokens(case):
    spec, status, where = INVALID[case]
    g = torch.Generator().manual_seed(1)
    hidden, alphas = torch.randn(3, 8, 4, generator=g), torch.rand(3, 8, generator=g)
    lengths, target = torch.tensor([8, 8, 5]), torch.tensor([3, 2, 1])
    if "alpha" in spec:
        alphas[1, 2] = spec["alpha"]
    if "length" in spec:
        lengths[1] = spec["length"]
    if spec.get("zero"):
        alphas[1] = 0.0
    if "target" in spec:
        target[1] = spec["target"]
    use_target = "target" in spec
    args = [hidden, alphas, lengths, target if use_target else None, 1.0, 1e-4, 0.5, True, 6]
    with pytest.raises(RuntimeError):
        OP(*args)  # the CPU kernel raises
    got = _cif_forward_decomposition(*args)
    assert got[1][1] == 0 and (got[2][1] == -1).all() and (got[0][1] == 0).all()
    B, T = 3, 8
    info = got[5][B * T :].view(B, 7)
    assert info[1].tolist()[3:6] == [0, status, where]
    assert (got[4][T + 1 : 2 * (T + 1)] == 0).all() and (got[5][T : 2 * T] == 0).all()
    # the valid utterances are as the op computes them alone
    keep = torch.tensor([0, 2])
    ref = OP(hidden[keep], alphas[keep], lengths[keep], target[keep] if use_target else None, 1.0, 1e-4, 0.5, True, 6)
    for x, y in zip(got[:4], ref[:4]):
        torch.testing.assert_close(x[keep], y, rtol=1e-5, atol=1e-5)


def test_max_tokens_none_cannot_be_exported():
    hidden, alphas = torch.randn(2, 5, 3), torch.rand(2, 5)
    with pytest.raises(ValueError, match="max_tokens=None cannot be exported.*pass max_tokens"):
        _cif_forward_decomposition(hidden, alphas, None, None, 1.0, 1e-4, None, True, -1)
    program = torch.export.export(cifops.Cif(), (hidden, alphas))
    with pytest.raises(Exception, match="max_tokens=None cannot be exported"):
        program.run_decompositions(cifops.export_decompositions())


# --- streaming: cif_chunk chunk by chunk, then cif_tail --------------------------


def run_chunks(args, cuts, max_tokens, scale):
    hidden, alphas, lengths, _, beta, _, tail, normalize, _ = args
    B, T, D = hidden.shape
    acc = F64 if hidden.dtype == F64 else F32
    state = (
        torch.zeros(B, dtype=F64),
        torch.zeros(B, dtype=torch.int64),
        torch.zeros(B, dtype=torch.int64),
        torch.zeros(B, D, dtype=acc),
    )
    tokens = [[] for _ in range(B)]
    frames = [[] for _ in range(B)]
    for s, e in zip([0] + cuts, cuts + [T]):
        chunk_len = None
        if lengths is not None:
            chunk_len = (lengths - s).clamp(0, e - s)
        out = cif_chunk(hidden[:, s:e], alphas[:, s:e], chunk_len, *state, beta, scale, max_tokens)
        embeds, counts, fire, state = out[0], out[1], out[2], out[3:]
        for b in range(B):
            tokens[b] += list(embeds[b, : counts[b]])
            frames[b] += fire[b, : counts[b]].tolist()
            assert (fire[b, counts[b] :] == -1).all() and (embeds[b, counts[b] :] == 0).all()
    tail_embed, has_tail, tail_frame = cif_tail(*state, beta, tail, normalize, hidden.dtype)
    for b in range(B):
        if has_tail[b]:
            tokens[b].append(tail_embed[b])
            frames[b].append(int(tail_frame[b]))
    return tokens, frames, state


@pytest.mark.parametrize("seed", range(80))
def test_chunks_equal_whole_input(seed):
    args = random_case(seed)
    if args[0].dtype == BF16:
        args[0] = args[0].float()
    args[-1] = -1
    ref = OP(*args)
    B, T = args[1].shape
    r = random.Random(seed)
    cuts = sorted(r.choice([r.randint(0, T), r.randint(0, T)]) for _ in range(r.randint(0, T)))
    scale = None
    if args[3] is not None:  # target_lengths: the whole input's scale, from the workspace
        scale = ref[4][B * (T + 1) :].view(B, 4)[:, 0]
    tokens, frames, state = run_chunks(args, cuts, int(ref[1].max()) + 1, scale)
    for b in range(B):
        n = int(ref[1][b])
        assert frames[b] == ref[2][b, :n].tolist()
        if n:
            torch.testing.assert_close(torch.stack(tokens[b]), ref[0][b, :n], **TOL[args[0].dtype])
    P = ref[4][: B * (T + 1)].view(B, T + 1)
    info = ref[5][B * T :].view(B, 7)
    assert torch.equal(state[0], P[:, -1]) and torch.equal(state[1], info[:, 1])
    assert torch.equal(state[2], info[:, 3])


def test_chunks_of_one_frame_and_empty_chunks():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 9, 4, generator=g, dtype=F64)
    alphas = torch.tensor([[0.5, 1.5, 0.0, 0.25, 0.75, 3.0, 0.5, 0.5, 0.6]] * 3, dtype=F64)
    lengths = torch.tensor([9, 4, 0])  # ending in different chunks, one empty utterance
    args = [hidden, alphas, lengths, None, 1.0, 1e-4, 0.1, True, -1]
    ref = OP(*args)
    for cuts in ([0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9], [4, 4, 4], [9]):
        tokens, frames, _ = run_chunks(args, cuts, 12, None)
        for b in range(3):
            n = int(ref[1][b])
            assert frames[b] == ref[2][b, :n].tolist()
            if n:
                torch.testing.assert_close(torch.stack(tokens[b]), ref[0][b, :n])


def test_chunk_drops_tokens_past_max_tokens_but_keeps_the_state():
    g = torch.Generator().manual_seed(4)
    hidden, alphas = torch.randn(2, 12, 3, generator=g), torch.rand(2, 12, generator=g) * 2.5
    zero = (
        torch.zeros(2, dtype=F64),
        torch.zeros(2, dtype=torch.int64),
        torch.zeros(2, dtype=torch.int64),
        torch.zeros(2, 3),
    )
    full = cif_chunk(hidden, alphas, None, *zero, 1.0, None, 40)
    cut = cif_chunk(hidden, alphas, None, *zero, 1.0, None, 3)
    assert cut[1].tolist() == [3, 3] and full[1].min() > 3
    assert torch.equal(cut[0], full[0][:, :3]) and torch.equal(cut[2], full[2][:, :3])
    for x, y in zip(cut[3:], full[3:]):
        assert torch.equal(x, y)


# --- torch.export and ONNX ------------------------------------------------------------

RAW_OPTIONS = (0.75, 1e-4, 0.25, True, 12)


class RawOp(torch.nn.Module):
    """All six outputs of the op (the scan workspace included), without and with
    target_lengths: one export covers both paths."""

    def forward(self, hidden, alphas, lengths, target_lengths):
        return OP(hidden, alphas, lengths, None, *RAW_OPTIONS) + OP(
            hidden, alphas, lengths, target_lengths, *RAW_OPTIONS
        )


def raw_reference(hidden, alphas, lengths, target_lengths):
    return OP(hidden, alphas, lengths, None, *RAW_OPTIONS) + OP(hidden, alphas, lengths, target_lengths, *RAW_OPTIONS)


def raw_inputs(B, T, D=5, seed=0):
    """Random weights with zero frames; every other utterance dyadic, with prefix sums
    landing exactly on the boundaries k * 0.75 (ties)."""
    g = torch.Generator().manual_seed(seed)
    alphas = torch.rand(B, T, generator=g) * 0.9
    alphas[:, ::3] = torch.tensor([0.25, 0.5, 0.0])[torch.arange(0, T, 3) % 3]
    dyadic = torch.tensor([0.0, 0.375, 0.75, 1.5, 1.125])
    alphas[1::2] = dyadic[torch.randint(5, (B // 2, T), generator=g)]
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    sums = [float(alphas[b, : lengths[b]].double().sum()) for b in range(B)]
    target = torch.tensor([int(s / 0.75) if s > 0 else 0 for s in sums])
    return torch.randn(B, T, D, generator=g), alphas, lengths, target


SHAPES = [(3, 17), (5, 40), (1, 2), (2, 1)]


@pytest.fixture(scope="module")
def raw_program():
    b, t = torch.export.Dim("B"), torch.export.Dim("T")
    program = torch.export.export(
        RawOp(), raw_inputs(3, 17), dynamic_shapes=({0: b, 1: t}, {0: b, 1: t}, {0: b}, {0: b})
    )
    return program.run_decompositions(cifops.export_decompositions())


def test_exported_program_has_no_custom_op_and_equals_eager(raw_program):
    targets = {str(n.target) for n in raw_program.graph.nodes}
    assert not any("cifops" in t for t in targets)
    module = raw_program.module()
    for B, T in SHAPES[:2]:
        inputs = raw_inputs(B, T, seed=B * T)
        got, ref = module(*inputs), raw_reference(*inputs)
        assert_same(got[:6], ref[:6], F32)
        assert_same(got[6:], ref[6:], F32)


def test_onnx_round_trip_bitwise_workspace(raw_program, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the ONNX tests need onnxruntime")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    path = str(tmp_path / "raw.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(raw_program, raw_inputs(3, 17), path, dynamo=True, verbose=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for B, T in SHAPES:
        inputs = raw_inputs(B, T, seed=B + T)
        got = session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})
        got, ref = [torch.from_numpy(x) for x in got], raw_reference(*inputs)
        assert_same(got[:6], ref[:6], F32)
        assert_same(got[6:], ref[6:], F32)


def test_onnx_export_public_api(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the ONNX tests need onnxruntime")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(5, 5)
            self.cif = cifops.Cif(threshold=0.3, tail_threshold=0.1, tail_mode="keep", max_tokens=60)

        def forward(self, hidden, alphas, lengths):
            out = self.cif(self.proj(hidden), alphas, lengths)
            return out.embeds, out.token_lengths, out.fire_frames

    model = Model().eval()
    b, t = torch.export.Dim("B"), torch.export.Dim("T")
    path = str(tmp_path / "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cifops.onnx_export(
            model, raw_inputs(3, 17)[:3], path, verbose=False, dynamic_shapes=({0: b, 1: t}, {0: b, 1: t}, {0: b})
        )
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for B, T in SHAPES:
        inputs = raw_inputs(B, T, seed=7 * B + T)[:3]
        got = [torch.from_numpy(x) for x in session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})]
        with torch.no_grad():
            ref = model(*inputs)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])


class Bf16Cif(torch.nn.Module):
    """A bfloat16 model (float32 in and out: numpy, and so onnxruntime's Python API, has
    no bfloat16)."""

    def forward(self, hidden, alphas, lengths):
        out = cifops.cif(hidden.to(BF16), alphas.to(BF16), lengths, threshold=0.5, tail_threshold=0.1, max_tokens=20)
        return out.embeds.float(), out.token_lengths, out.fire_frames, out.alpha_sum


class Bf16Stream(torch.nn.Module):
    def forward(self, hidden, alphas, lengths, prefix, tokens, frames, partial):
        out, state = cifops.cif_stream_step(
            hidden.to(BF16), alphas.to(BF16), lengths, (prefix, tokens, frames, partial), threshold=0.5, max_tokens=12
        )
        tail = cifops.cif_stream_flush(state, threshold=0.5, tail_threshold=0.1)
        return out.embeds.float(), out.token_lengths, out.fire_frames, *state, tail.embeds


@pytest.mark.parametrize("make", [Bf16Cif, Bf16Stream])
def test_bfloat16_model_runs_in_onnx_runtime(make, tmp_path):
    # ONNX Runtime's CPU provider has no bfloat16 Where: the graph used to fail to load
    # with "Could not find an implementation for Where(16)" (issue 28, item 16)
    ort = pytest.importorskip("onnxruntime", reason="the ONNX tests need onnxruntime")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    g = torch.Generator().manual_seed(16)
    hidden = torch.randn(3, 17, 5, generator=g).to(BF16).float()
    alphas = (torch.rand(3, 17, generator=g) * 0.7).to(BF16).float()
    alphas[0, 3] = 0.0
    hidden[2, 12:] = float("nan")  # padding
    args = (hidden, alphas, torch.tensor([17, 9, 12]))
    if make is Bf16Stream:
        _, state = cifops.cif_stream_step(hidden[:, :4].to(BF16), alphas[:, :4], threshold=0.5)
        args += tuple(state)
    path = str(tmp_path / "bf16.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cifops.onnx_export(make(), args, path, verbose=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {n: x.numpy() for n, x in zip(names, args)})
    for x, y in zip(got, make()(*args)):
        if y.dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(torch.from_numpy(x), y, rtol=1e-2, atol=1e-2)
        else:
            assert torch.equal(torch.from_numpy(x), y)


class ThresholdBuffer(torch.nn.Module):
    def __init__(self, stream=False):
        super().__init__()
        self.register_buffer("threshold", torch.tensor(0.5))
        self.stream = stream

    def forward(self, hidden, alphas):
        if self.stream:
            return cifops.cif_stream_step(hidden, alphas, threshold=self.threshold, max_tokens=8)[0].embeds
        return cifops.cif(hidden, alphas, threshold=self.threshold, max_tokens=8).embeds


@pytest.mark.parametrize("stream", [False, True], ids=["cif", "cif_stream_step"])
def test_threshold_buffer_is_refused_at_export_saying_what_to_do(stream):
    # it works in eager mode, and used to fail to export with GuardOnDataDependentSymNode
    model = ThresholdBuffer(stream)
    args = (torch.randn(2, 9, 3), torch.rand(2, 9))
    fn = "cif_stream_step" if stream else "cif"
    ref = (
        cifops.cif_stream_step(*args, threshold=0.5, max_tokens=8)[0]
        if stream
        else cifops.cif(*args, threshold=0.5, max_tokens=8)
    ).embeds
    assert torch.equal(model(*args), ref)
    with pytest.raises(
        ValueError,
        match=rf"cifops\.{fn}: threshold is a tensor whose value "
        r"torch\.export cannot read.*Python float",
    ):
        torch.export.export(model, args)


# --- torch.jit.script ----------------------------------------------------------------


class CallsCif(torch.nn.Module):
    def forward(self, hidden, alphas, lengths):
        out = cifops.cif(hidden, alphas, lengths, threshold=0.5, tail_threshold=0.25, max_tokens=10)
        return out.embeds, out.token_lengths, out.fire_frames


@pytest.mark.parametrize(
    "make",
    [CallsCif, lambda: cifops.Cif(threshold=1, tail_threshold=0), lambda: cifops.Cif(max_tokens=3, tail_mode="keep")],
    ids=["module calling cif", "Cif with int threshold", "Cif max_tokens"],
)
def test_torch_jit_script_save_load(make):
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated
        scripted = torch.jit.script(model)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    hidden = torch.randn(2, 9, 3, requires_grad=True)
    alphas = torch.rand(2, 9).requires_grad_()
    lengths = torch.tensor([9, 5])
    ref, got = model(hidden, alphas, lengths), loaded(hidden, alphas, lengths)
    for x, y in zip(ref, got):
        assert torch.equal(x, y)
    grads = torch.autograd.grad(got[0].sum(), (hidden, alphas))
    assert all(torch.equal(x, y) for x, y in zip(grads, torch.autograd.grad(ref[0].sum(), (hidden, alphas))))


def test_torch_jit_script_errors_name_the_argument():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(cifops.cif)
    hidden, alphas = torch.randn(1, 4, 2), torch.rand(1, 4)
    with pytest.raises(Exception, match="tail_mode must be 'keep' or 'normalize'"):
        scripted(hidden, alphas, tail_mode="mean")
    with pytest.raises(Exception, match="max_tokens must be"):
        scripted(hidden, alphas, max_tokens=-2)
    with pytest.raises(RuntimeError, match="alphas must be finite and >= 0"):
        scripted(hidden, -alphas)


class ChunkStep(torch.nn.Module):
    """cif_chunk with its state as graph inputs, as the streaming op's export uses it."""

    def forward(self, hidden, alphas, prefix, tokens, frames, partial):
        return cif_chunk(hidden, alphas, None, prefix, tokens, frames, partial, 0.3, None, 8)


def test_cif_chunk_exports_to_onnx_with_its_state(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the ONNX tests need onnxruntime")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")

    def inputs(B, T):  # a consistent state: 2 tokens fired, P in [0.6, 0.9)
        g = torch.Generator().manual_seed(B * T)
        return (
            torch.randn(B, T, 4, generator=g),
            torch.rand(B, T, generator=g),
            0.6 + 0.29 * torch.rand(B, generator=g, dtype=F64),
            torch.full((B,), 2),
            torch.full((B,), 5),
            torch.randn(B, 4, generator=g),
        )

    b, t = torch.export.Dim("B"), torch.export.Dim("T")
    path = str(tmp_path / "chunk.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cifops.onnx_export(
            ChunkStep(),
            inputs(3, 7),
            path,
            verbose=False,
            dynamic_shapes=({0: b, 1: t}, {0: b, 1: t}, {0: b}, {0: b}, {0: b}, {0: b}),
        )
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for B, T in [(3, 7), (2, 16), (1, 1)]:
        x = inputs(B, T)
        got = session.run(None, {n: v.numpy() for n, v in zip(names, x)})
        ref = ChunkStep()(*x)
        for name, a, r in zip(["embeds", "counts", "fires", "prefix", "tokens", "frames", "partial"], got, ref):
            if r.dtype in (F64, torch.int64):
                assert torch.equal(torch.from_numpy(a), r), name
            else:
                torch.testing.assert_close(torch.from_numpy(a), r, rtol=1e-5, atol=1e-5)


# --- the module structure: the loop-free math below both the export glue and streaming ----


def _cifops_imports():
    """{module: the cifops modules it imports}, from the source of cifops/*.py (not
    __init__.py, which imports them all); read with ast, so nothing is imported."""
    import ast
    import pathlib

    folder = pathlib.Path(cifops.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        if path.stem == "__init__":
            continue
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "cifops":  # from cifops import _C, _checks
                    names.update(f"cifops.{a.name}" for a in node.names)
                elif node.module.startswith("cifops."):
                    names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names if a.name.startswith("cifops."))
        graph[f"cifops.{path.stem}"] = names
    return graph


def test_streaming_sits_below_the_export_module():
    graph = _cifops_imports()
    assert "cifops._stream" in graph and "cifops._export" in graph
    seen, todo = set(), ["cifops._stream"]
    while todo:
        for name in graph.get(todo.pop(), ()):
            if name not in seen:
                seen.add(name)
                todo.append(name)
    assert "cifops._export" not in seen, f"cifops._stream imports, through {sorted(seen)}"
    # nothing but the package's __init__ imports the export glue
    assert [m for m, names in graph.items() if "cifops._export" in names] == []


def test_cif_owns_its_torchscript_form():
    # torch.jit.script compiles what cif.__prepare_scriptable__ returns: defined with cif
    # in cifops/_cif.py, not patched onto it from the export module
    assert cifops.cif.__prepare_scriptable__().__module__ == "cifops._cif"
