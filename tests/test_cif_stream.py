"""cifops.cif_stream_step / cif_stream_flush / CifStream: a stream cut into any chunks
gives the tokens of cifops.cif on the whole input (and of the float64 reference)."""

import pytest
import torch
from hypothesis import given, strategies as st

import cifops
from cifops.reference import cif_reference

from conftest import assert_cuda_emulation_passes, requires_cuda

DYADIC = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.5]


@st.composite
def stream_cases(draw):
    """A batch, whole-input options and a chunking of its frames: chunk boundaries
    (repeats make empty chunks) and per-utterance lengths that end in different chunks."""
    B = draw(st.integers(1, 3))
    T = draw(st.integers(0, 12))
    D = draw(st.integers(1, 4))
    values = st.one_of(st.sampled_from(DYADIC), st.floats(0.0, 2.5))  # multi-fire above 1
    alphas = torch.tensor(
        draw(st.lists(st.lists(values, min_size=T, max_size=T), min_size=B, max_size=B)), dtype=torch.float64
    ).reshape(B, T)
    lengths = torch.tensor(draw(st.lists(st.integers(0, T), min_size=B, max_size=B)))
    cuts = sorted(draw(st.lists(st.integers(0, T), max_size=6)))
    bounds = [0] + cuts + [T]
    opts = dict(threshold=draw(st.sampled_from([1.0, 0.5, 0.75, 2.0, 0.3])))
    if draw(st.booleans()):
        opts["tail_threshold"] = draw(st.sampled_from([0.0, 0.1, 0.5]))
        opts["tail_mode"] = draw(st.sampled_from(["keep", "normalize"]))
    hidden = torch.randn(
        B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    )
    return hidden, alphas, lengths, bounds, opts


def run_stream(
    hidden, alphas, lengths, bounds, threshold=1.0, tail_threshold=None, tail_mode="normalize", max_tokens=None
):
    """Feed the chunks [bounds[i], bounds[i+1]); return per utterance the list of
    (embedding, fire frame) of every step and the flush, and the final state."""
    B = hidden.shape[0]
    tokens = [[] for _ in range(B)]
    state = None
    for s, e in zip(bounds[:-1], bounds[1:]):
        chunk_len = (lengths - s).clamp(0, e - s)
        out, state = cifops.cif_stream_step(
            hidden[:, s:e], alphas[:, s:e], chunk_len, state, threshold=threshold, max_tokens=max_tokens
        )
        collect(tokens, out)
    if state is None:  # no chunk at all: a state of nothing
        state = cifops.cif_stream_state(B, hidden.shape[2], dtype=hidden.dtype)
    collect(
        tokens, cifops.cif_stream_flush(state, threshold=threshold, tail_threshold=tail_threshold, tail_mode=tail_mode)
    )
    return tokens, state


def collect(tokens, out):
    assert out.embeds.shape[1] == out.fire_frames.shape[1]
    for b, n in enumerate(out.token_lengths.tolist()):
        assert (out.fire_frames[b, n:] == -1).all() and (out.embeds[b, n:] == 0).all()
        tokens[b] += [(out.embeds[b, j], int(out.fire_frames[b, j])) for j in range(n)]


def assert_tokens_equal(tokens, whole, rtol, atol, exact=False):
    for b, toks in enumerate(tokens):
        n = int(whole.token_lengths[b])
        assert len(toks) == n, (b, len(toks), n)
        assert [f for _, f in toks] == whole.fire_frames[b, :n].tolist()
        for j, (e, _) in enumerate(toks):
            ref = whole.embeds[b, j]
            if exact:
                assert torch.equal(e, ref), (b, j)
            else:
                torch.testing.assert_close(e.double(), ref.double(), rtol=rtol, atol=atol)


@given(stream_cases())
def test_any_chunking_equals_whole_input(case):
    hidden, alphas, lengths, bounds, opts = case
    tokens, state = run_stream(hidden, alphas, lengths, bounds, **opts)
    ref = cif_reference(hidden, alphas, lengths, **opts)  # the literal float64 definition
    assert_tokens_equal(tokens, ref, rtol=1e-9, atol=1e-9)
    whole = cifops.cif(hidden, alphas, lengths, **opts)
    assert_tokens_equal(tokens, whole, rtol=1e-12, atol=1e-12)
    # the state is the whole input's scan result: prefix sum, complete tokens, frames
    torch.testing.assert_close(state.prefix, whole.alpha_sum, rtol=0, atol=0)
    complete = cifops.cif(hidden, alphas, lengths, threshold=opts["threshold"]).token_lengths
    assert torch.equal(state.tokens, complete)
    assert torch.equal(state.frames, lengths)


@given(stream_cases(), st.integers(0, 3))
def test_max_tokens_drops_only_that_chunks_overflow(case, max_tokens):
    """Tokens beyond max_tokens in one chunk are dropped from the output; the state and
    the later chunks stay exact."""
    hidden, alphas, lengths, bounds, opts = case
    opts.pop("tail_threshold", None), opts.pop("tail_mode", None)
    tokens, _ = run_stream(hidden, alphas, lengths, bounds, max_tokens=max_tokens, **opts)
    whole = cifops.cif(hidden, alphas, lengths, **opts)
    for b in range(hidden.shape[0]):
        fires = whole.fire_frames[b, : int(whole.token_lengths[b])].tolist()
        expected = []  # chunk by chunk: the first max_tokens tokens fired in the chunk
        for s, e in zip(bounds[:-1], bounds[1:]):
            expected += [j for j, f in enumerate(fires) if s <= f < e][:max_tokens]
        assert [f for _, f in tokens[b]] == [fires[j] for j in expected]
        for (emb, _), j in zip(tokens[b], expected):
            torch.testing.assert_close(emb, whole.embeds[b, j], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_complete_tokens_bitwise_equal_to_cif(dtype):
    """Complete tokens are summed over the same frames in the same order as the CPU
    forward of cifops.cif, so their embeddings are the same bits."""
    g = torch.Generator().manual_seed(0)
    B, T, D = 4, 97, 33
    hidden = torch.randn(B, T, D, generator=g).to(dtype)
    alphas = (torch.rand(B, T, generator=g) * 0.9).to(dtype)
    alphas[1, 10] = 3.7  # a multi-fire frame
    lengths = torch.tensor([97, 50, 1, 0])
    whole = cifops.cif(hidden, alphas, lengths)
    tokens, _ = run_stream(hidden, alphas, lengths, [0, 1, 16, 16, 17, 40, 90, 97])
    assert_tokens_equal(tokens, whole, 0, 0, exact=True)


def test_tail_matches_cif_keep_and_normalize():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 20, 8, generator=g)
    alphas = torch.rand(3, 20, generator=g) * 0.6
    lengths = torch.tensor([20, 13, 7])
    for mode in ("keep", "normalize"):
        whole = cifops.cif(hidden, alphas, lengths, tail_threshold=0.0, tail_mode=mode)
        tokens, _ = run_stream(hidden, alphas, lengths, [0, 5, 9, 20], tail_threshold=0.0, tail_mode=mode)
        assert_tokens_equal(tokens, whole, rtol=1e-5, atol=1e-6)


def test_cif_stream_module_and_reset():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 30, 6, generator=g, dtype=torch.float16)
    alphas = torch.rand(2, 30, generator=g)
    stream = cifops.CifStream(tail_threshold=0.3, max_tokens=8)
    whole = cifops.cif(hidden, alphas, tail_threshold=0.3)
    for _ in range(2):  # reset makes the second pass start new utterances
        outs = [stream(hidden[:, s : s + 8], alphas[:, s : s + 8]) for s in range(0, 30, 8)]
        outs.append(stream.flush())
        assert outs[-1].embeds.dtype == torch.float16
        for b in range(2):
            fires = sum((o.fire_frames[b, : int(o.token_lengths[b])].tolist() for o in outs), [])
            assert fires == whole.fire_frames[b, : int(whole.token_lengths[b])].tolist()
        stream.reset()
    with pytest.raises(RuntimeError, match="CifStream.flush: no chunk"):
        stream.flush()


def test_empty_batch_and_empty_chunk():
    out, state = cifops.cif_stream_step(torch.zeros(0, 5, 3), torch.zeros(0, 5))
    assert out.embeds.shape == (0, 0, 3) and state.partial.shape == (0, 3)
    out, state = cifops.cif_stream_step(torch.zeros(2, 0, 3), torch.zeros(2, 0), max_tokens=2)
    assert out.embeds.shape == (2, 2, 3) and (out.fire_frames == -1).all()
    assert state.frames.tolist() == [0, 0]


def _state(B=2, D=3, **over):
    s = cifops.cif_stream_state(B, D)
    return s._replace(**over)


@pytest.mark.parametrize(
    "state, match",
    [
        (_state(B=3), r"state.prefix must have shape \[B\] = \[2\]"),
        (_state(D=4), r"state.partial must have shape \[B, D\] = \[2, 3\]"),
        (_state(partial=torch.zeros(2, 3, dtype=torch.float64)), "state.partial must be Float"),
        (_state(tokens=torch.zeros(2, dtype=torch.int32)), "state.tokens must be Long"),
        (_state(prefix=torch.zeros(2, dtype=torch.float32)), "state.prefix must be Double"),
        (_state(frames=torch.zeros(2, dtype=torch.int64, device="meta")), "state.frames is on meta"),
        ((1, 2), "state must be the CifStreamState"),
        (_state(prefix=[0.0, 0.0]), "state.prefix must be a Tensor"),
    ],
)
def test_bad_state_names_the_field(state, match):
    with pytest.raises((RuntimeError, TypeError, ValueError), match=match):
        cifops.cif_stream_step(torch.zeros(2, 4, 3), torch.zeros(2, 4), None, state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_fake_kernel_matches_the_kernel(dtype):
    """The fake (meta) kernel gives the real outputs' shapes and dtypes (half hidden: half
    embeddings, float32 state)."""
    args = (torch.randn(3, 5, 4).to(dtype), torch.rand(3, 5), torch.tensor([5, 2, 0]))
    real = cifops.cif_stream_step(*args, max_tokens=3)
    fake = cifops.cif_stream_step(*(x.to("meta") for x in args), max_tokens=3)
    for r, f in zip([*real[0][:3], *real[1]], [*fake[0][:3], *fake[1]]):
        assert (f.shape, f.dtype, f.device.type) == (r.shape, r.dtype, "meta")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("max_tokens", [3, -1])  # the op's -1: no max_tokens
def test_opcheck_stream_step(dtype, max_tokens):
    """torch.library.opcheck of cifops::cif_stream_step (schema, fake kernel, autograd
    registration, torch.compile), from a fresh state and from a state mid-stream."""
    hidden, alphas = torch.randn(3, 5, 4).to(dtype), torch.rand(3, 5) * 1.5
    lengths = torch.tensor([5, 2, 0])
    _, state = cifops.cif_stream_step(hidden, alphas, lengths)
    for start in (cifops.cif_stream_state(3, 4, dtype=dtype), state):
        torch.library.opcheck(
            torch.ops.cifops.cif_stream_step.default, (hidden, alphas, lengths, *start, 1.0, max_tokens)
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alphas=torch.tensor([[0.5, -1.0], [0.0, 0.0]])), r"alphas\[0, 1\] = -1"),
        (dict(lengths=torch.tensor([3, 0])), r"lengths must be in \[0, Tc\] = \[0, 2\]"),
        (dict(alphas=torch.zeros(2, 3)), r"alphas must have shape \[B, Tc\] = \[2, 2\]"),
        (dict(threshold=0.0), "threshold must be a finite number > 0"),
        (dict(max_tokens=-2), "max_tokens must be an int"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    args = dict(hidden=torch.zeros(2, 2, 3), alphas=torch.zeros(2, 2), lengths=None)
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises((RuntimeError, ValueError), match=match):
        cifops.cif_stream_step(args["hidden"], args["alphas"], args["lengths"], None, **kwargs)


def test_no_gradients_and_flush_errors():
    hidden = torch.randn(1, 4, 2, requires_grad=True)
    out, _ = cifops.cif_stream_step(hidden, torch.full((1, 4), 0.6))
    with pytest.raises(RuntimeError, match="cif_stream_step: streaming CIF is for inference"):
        out.embeds.sum().backward()
    state = cifops.cif_stream_state(1, 2)
    with pytest.raises(ValueError, match="tail_mode must be"):
        cifops.cif_stream_flush(state, tail_mode="pad")
    with pytest.raises(ValueError, match="tail_threshold must be"):
        cifops.cif_stream_flush(state, tail_threshold=-1.0)


def test_compile_and_export_with_max_tokens():
    def step(hidden, alphas, lengths, prefix, tokens, frames, partial):
        out, state = cifops.cif_stream_step(hidden, alphas, lengths, (prefix, tokens, frames, partial), max_tokens=4)
        return out.embeds, out.token_lengths, out.fire_frames, *state

    g = torch.Generator().manual_seed(3)
    args = (
        torch.randn(2, 6, 3, generator=g),
        torch.rand(2, 6, generator=g) * 1.5,
        torch.tensor([6, 4]),
        *cifops.cif_stream_state(2, 3),
    )
    eager = step(*args)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    for x, y in zip(eager, compiled):
        assert torch.equal(x, y)

    class Step(torch.nn.Module):
        def forward(self, *a):
            return step(*a)

    exported = torch.export.export(Step(), args)
    for x, y in zip(eager, exported.module()(*args)):
        assert torch.equal(x, y)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_stream_equals_cpu_stream_and_no_sync(dtype):
    g = torch.Generator().manual_seed(4)
    B, T, D = 8, 120, 64
    hidden = torch.randn(B, T, D, generator=g).to(dtype)
    alphas = torch.rand(B, T, generator=g) * 1.2
    alphas[2, 7] = 5.5
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    bounds = list(range(0, T, 16)) + [T]
    cpu, cpu_state = run_stream(hidden, alphas, lengths, bounds, tail_threshold=0.25)
    # every chunk on the device first (a host-to-device copy synchronises), one warm-up step
    chunks = [
        (hidden[:, s:e].cuda(), alphas[:, s:e].cuda(), (lengths - s).clamp(0, e - s).cuda())
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    cifops.cif_stream_step(*chunks[0], None, max_tokens=16)
    torch.cuda.synchronize()
    state = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        for chunk in chunks:
            _, state = cifops.cif_stream_step(*chunk, state, max_tokens=16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(state.prefix.cpu(), cpu_state.prefix)
    assert torch.equal(state.tokens.cpu(), cpu_state.tokens)
    gpu, _ = run_stream(hidden.cuda(), alphas.cuda(), lengths.cuda(), bounds, tail_threshold=0.25)
    for b in range(B):
        assert [f for _, f in gpu[b]] == [f for _, f in cpu[b]]
        for (x, _), (y, _) in zip(gpu[b], cpu[b]):
            torch.testing.assert_close(x.cpu(), y, rtol=1e-5, atol=1e-5)


def test_cuda_stream_kernels_under_cpu_emulation(tmp_path):
    """csrc/cif/cif_stream_cuda.cu compiled as C++ and run on the CPU under
    tests/native/cif_stream_cuda_emulation (one fiber per CUDA thread), against the CPU
    kernels: bit-identical scan and state, embeddings within rounding. Needs g++ >= 12."""
    assert_cuda_emulation_passes("cif_stream_cuda_emulation", tmp_path, timeout=600)


class StreamStep(torch.nn.Module):
    """One step of a stream with its state as graph inputs and outputs, and the flush of
    the new state (what an exported streaming recognizer runs per chunk)."""

    def forward(self, hidden, alphas, lengths, prefix, tokens, frames, partial):
        out, state = cifops.cif_stream_step(
            hidden, alphas, lengths, (prefix, tokens, frames, partial), threshold=0.7, max_tokens=6
        )
        tail = cifops.cif_stream_flush(state, threshold=0.7, tail_threshold=0.2)
        return (
            out.embeds,
            out.token_lengths,
            out.fire_frames,
            *state,
            tail.embeds,
            tail.token_lengths,
            tail.fire_frames,
        )


def _stream_inputs(B, T, seed, state=None):
    g = torch.Generator().manual_seed(seed)
    alphas = torch.rand(B, T, generator=g) * 0.9
    if T > 0:
        alphas[0, T // 2] = 2.3  # a multi-fire frame
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    state = state if state is not None else cifops.cif_stream_state(B, 4)
    return (torch.randn(B, T, 4, generator=g), alphas, lengths, *state)


def _feed(run, B, chunks):
    """Run `run(*inputs)` over chunks of the given sizes, the state fed back; returns
    every step's outputs."""
    outs, state = [], None
    for i, T in enumerate(chunks):
        out = run(*_stream_inputs(B, T, seed=10 * B + i, state=state))
        outs.append(out)
        state = [torch.as_tensor(x) for x in out[3:7]]
    return outs


def _assert_steps_equal(got, ref):
    names = [
        "embeds",
        "token_lengths",
        "fire_frames",
        "prefix",
        "tokens",
        "frames",
        "partial",
        "tail_embeds",
        "tail_lengths",
        "tail_frames",
    ]
    for step_got, step_ref in zip(got, ref):
        for name, a, r in zip(names, step_got, step_ref):
            a = torch.as_tensor(a)
            if r.dtype in (torch.float64, torch.int64):
                assert torch.equal(a, r), name  # prefix sums, counts, frames: exact
            else:
                torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=name)


def test_stream_step_exports_without_the_custom_op():
    args = _stream_inputs(3, 8, seed=0)
    b, t = torch.export.Dim("B"), torch.export.Dim("T")
    program = torch.export.export(
        StreamStep(), args, dynamic_shapes=({0: b, 1: t}, {0: b, 1: t}, {0: b}, {0: b}, {0: b}, {0: b}, {0: b})
    )
    program = program.run_decompositions(cifops.export_decompositions())
    assert "cifops" not in str(program.graph)
    for B in (2, 5):
        _assert_steps_equal(_feed(program.module(), B, [8, 3, 0, 16, 2]), _feed(StreamStep(), B, [8, 3, 0, 16, 2]))


def test_stream_step_onnx_round_trip(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the ONNX tests need onnxruntime")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    import warnings

    b, t = torch.export.Dim("B"), torch.export.Dim("T")
    path = str(tmp_path / "stream.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cifops.onnx_export(
            StreamStep(),
            _stream_inputs(3, 8, seed=0),
            path,
            verbose=False,
            dynamic_shapes=({0: b, 1: t}, {0: b, 1: t}, {0: b}, {0: b}, {0: b}, {0: b}, {0: b}),
        )
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*x):
        return [torch.from_numpy(a) for a in session.run(None, {n: v.numpy() for n, v in zip(names, x)})]

    for B in (1, 4):
        _assert_steps_equal(_feed(run, B, [8, 1, 0, 16, 5]), _feed(StreamStep(), B, [8, 1, 0, 16, 5]))


def test_exported_step_rejects_an_invalid_chunk_and_keeps_its_state():
    """In a graph nothing can raise: an utterance with a NaN or negative alpha or a length
    outside [0, Tc] emits no tokens and keeps its state (the CUDA kernels' behaviour with
    max_tokens); the other utterances are unaffected."""
    program = torch.export.export(StreamStep(), _stream_inputs(4, 8, seed=0)).run_decompositions(
        cifops.export_decompositions()
    )
    args = list(_stream_inputs(4, 8, seed=5, state=_feed(StreamStep(), 4, [8])[0][3:7]))
    args[1] = args[1].clone()
    args[1][1, 2] = float("nan")
    args[1][2, 0] = -0.5
    args[2] = torch.tensor([8, 8, 8, 9])
    got = program.module()(*args)
    ref = StreamStep()(*[x[:1] for x in args])  # utterance 0 alone, through the kernel
    _assert_steps_equal([[x[:1] for x in got]], [ref])
    for b in (1, 2, 3):
        assert got[1][b] == 0 and (got[2][b] == -1).all() and (got[0][b] == 0).all()
        for new, old in zip(got[3:7], args[3:7]):
            assert torch.equal(new[b], old[b])


def test_stream_step_export_needs_max_tokens():
    class NoWidth(torch.nn.Module):
        def forward(self, hidden, alphas):
            return cifops.cif_stream_step(hidden, alphas)[0].embeds

    program = torch.export.export(NoWidth(), (torch.randn(2, 5, 3), torch.rand(2, 5)))
    with pytest.raises(ValueError, match="cif_stream_step: max_tokens=None cannot be exported"):
        program.run_decompositions(cifops.export_decompositions())


# --- states that no step could have produced (issue 28, items 11 and 15) -------------------


def _stream_state(threshold=1.0):
    """The state after two chunks of three utterances, each with complete tokens."""
    g = torch.Generator().manual_seed(28)
    hidden, alphas = torch.randn(3, 8, 4, generator=g), torch.rand(3, 8, generator=g) + 0.2
    _, state = cifops.cif_stream_step(hidden[:, :5], alphas[:, :5], threshold=threshold)
    _, state = cifops.cif_stream_step(hidden[:, 5:], alphas[:, 5:], None, state, threshold=threshold)
    assert (state.tokens > 0).all()
    return state


def _edited(state, **values):
    """The state with utterance 1's fields set to values (a copy)."""
    fields = state._asdict()
    for name, value in values.items():
        fields[name] = fields[name].clone()
        fields[name][1] = value
    return cifops.CifStreamState(**fields)


@pytest.mark.parametrize(
    "edit, match",
    [
        (dict(frames=-3), r"state\.frames\[1\] = -3 is negative"),
        (dict(tokens=-1), r"state\.tokens\[1\] = -1 is negative"),
        (dict(prefix=-0.5), r"state\.prefix\[1\] = -0\.5 must be finite and >= 0"),
        (dict(prefix=float("nan")), r"state\.prefix\[1\] = nan must be finite and >= 0"),
        (dict(prefix=float("inf")), r"state\.prefix\[1\] = inf must be finite and >= 0"),
        # a recycled batch slot whose prefix was not reset: it emitted 9 tokens at frame 0
        (dict(tokens=0, frames=0, partial=0.0), r"state\.prefix\[1\] = .* but state\.frames\[1\] = 0"),
        (dict(frames=0), r"state\.prefix\[1\] = .* but state\.frames\[1\] = 0"),
        (dict(prefix=9.3), r"state\.prefix\[1\] = 9\.3 and state\.tokens\[1\] = \d+ disagree"),
        (dict(tokens=0), r"state\.prefix\[1\] = .* and state\.tokens\[1\] = 0 disagree"),
    ],
)
def test_a_state_no_step_produced_is_refused_naming_the_field(edit, match):
    state = _stream_state()
    bad = _edited(state, **edit)
    if "tokens" in edit and "frames" in edit:  # the recycled slot of the issue
        bad = _edited(bad, prefix=9.3)
    chunk = (torch.randn(3, 4, 4), torch.rand(3, 4))
    with pytest.raises(ValueError, match="cifops.cif_stream_step: " + match):
        cifops.cif_stream_step(*chunk, None, bad)
    with pytest.raises(ValueError, match="cifops.cif_stream_step: " + match):
        cifops.cif_stream_step(*chunk, None, bad, max_tokens=4)
    with pytest.raises(ValueError, match="cifops.cif_stream_flush: " + match):
        cifops.cif_stream_flush(bad, tail_threshold=0.1)
    cifops.cif_stream_step(*chunk, None, state)  # the unedited state is fine
    cifops.cif_stream_flush(state, tail_threshold=0.1)


def test_states_on_a_token_boundary_are_valid():
    # >= firing: a prefix exactly on a boundary has fired that token
    state = cifops.CifStreamState(
        torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64),
        torch.tensor([2, 0, 1]),
        torch.tensor([2, 3, 1]),
        torch.zeros(3, 2),
    )
    _, new = cifops.cif_stream_step(torch.ones(3, 1, 2), torch.zeros(3, 1), None, state, threshold=0.5)
    assert new.tokens.tolist() == [2, 0, 1]
    assert cifops.cif_stream_flush(new, tail_threshold=0.0).token_lengths.tolist() == [0, 0, 0]
    for tokens, b, k in (([1, 0, 1], 0, 1), ([2, 0, 0], 2, 0)):
        with pytest.raises(
            ValueError,
            match=rf"state\.prefix\[{b}\] = [\d.]+ and "
            rf"state\.tokens\[{b}\] = {k} disagree at "
            r"threshold 0\.5",
        ):
            cifops.cif_stream_flush(state._replace(tokens=torch.tensor(tokens)), threshold=0.5)


def test_the_state_records_its_threshold():
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(2, 6, 3, generator=g)
    alphas = torch.tensor([[0.3] * 6, [0.05] * 6])  # 3 tokens and a tail; a tail alone
    _, state = cifops.cif_stream_step(hidden[:, :3], alphas[:, :3], threshold=0.5)
    assert state.threshold == 0.5
    out, state = cifops.cif_stream_step(hidden[:, 3:], alphas[:, 3:], None, state)  # 0.5 too
    assert state.threshold == 0.5 and state.tokens.tolist() == [3, 0]
    whole = cifops.cif(hidden, alphas, threshold=0.5, tail_threshold=0.2)
    assert whole.token_lengths.tolist() == [4, 1]
    # the flush follows the state's threshold (it took 1.0: no tail for utterance 0, and
    # utterance 1's scaled by 1 / r instead of 0.5 / r)
    tail = cifops.cif_stream_flush(state, tail_threshold=0.2)
    assert tail.token_lengths.tolist() == [1, 1]
    for b in range(2):
        n = int(whole.token_lengths[b])
        torch.testing.assert_close(tail.embeds[b, 0], whole.embeds[b, n - 1])
    for call in (
        lambda: cifops.cif_stream_flush(state, threshold=1.0, tail_threshold=0.2),
        lambda: cifops.cif_stream_step(hidden, alphas, None, state, threshold=0.7),
    ):
        with pytest.raises(
            ValueError,
            match=r"threshold=(1\.0|0\.7) but the state was made by "
            r"steps at threshold=0\.5",
        ):
            call()
    # a state no step returned does not know its threshold: the call's (default 1.0)
    assert cifops.cif_stream_state(2, 3).threshold is None
    assert state._replace(frames=state.frames.clone()).threshold is None
    stream = cifops.CifStream(threshold=0.5, tail_threshold=0.2)
    assert stream(hidden, alphas).token_lengths.tolist() == [3, 0]
    assert stream.flush().token_lengths.tolist() == [1, 1]


@pytest.mark.parametrize("field", ["prefix", "tokens", "frames", "partial"])
def test_flush_names_the_field_of_a_bad_state(field):
    state = _stream_state()
    # it used to say "Tensor on device meta is not on the expected device cpu!"
    with pytest.raises(
        ValueError,
        match=r"cifops\.cif_stream_flush: the state's tensors must "
        rf"be on one device, got .*state\.{field} on meta",
    ):
        cifops.cif_stream_flush(state._replace(**{field: getattr(state, field).to("meta")}))
    wrong = dict(
        prefix=torch.zeros(3),
        tokens=torch.zeros(3, dtype=torch.int32),
        frames=torch.zeros(2, dtype=torch.int64),
        partial=torch.zeros(3, 4, 1),
    )[field]
    with pytest.raises(ValueError, match=rf"cifops\.cif_stream_flush: state\.{field} must "):
        cifops.cif_stream_flush(state._replace(**{field: wrong}))


def test_exported_step_and_flush_keep_a_bad_state_and_emit_nothing():
    """In a graph nothing can raise: an utterance whose state no step returns emits no
    tokens and no tail and keeps its state, as the CUDA kernels do with max_tokens."""
    program = torch.export.export(StreamStep(), _stream_inputs(4, 8, seed=0)).run_decompositions(
        cifops.export_decompositions()
    )
    state = [x.clone() for x in _feed(StreamStep(), 4, [8])[0][3:7]]
    state[2][1] = -2  # frames
    state[0][2] = float("nan")  # prefix
    state[1][3] = state[1][3] + 3  # tokens that disagree with the prefix
    args = list(_stream_inputs(4, 8, seed=5, state=state))
    got = program.module()(*args)
    ref = StreamStep()(*[x[:1] for x in args])  # utterance 0 alone, through the kernel
    _assert_steps_equal([[x[:1] for x in got]], [ref])
    for b in (1, 2, 3):
        assert got[1][b] == 0 and (got[2][b] == -1).all() and (got[0][b] == 0).all()
        assert got[8][b] == 0 and got[9][b, 0] == -1 and (got[7][b] == 0).all()
        for new, old in zip(got[3:7], args[3:7]):
            assert torch.equal(new[b], old[b]) or (new[b].isnan() & old[b].isnan()).all()


@requires_cuda
def test_cuda_bad_state_raises_or_is_kept_with_max_tokens():
    state = _stream_state()
    bad = [x.cuda() for x in _edited(state, frames=-3)]
    chunk = (torch.randn(3, 4, 4, device="cuda"), torch.rand(3, 4, device="cuda"))
    with pytest.raises(ValueError, match=r"cifops\.cif_stream_step: state\.frames\[1\] = -3"):
        cifops.cif_stream_step(*chunk, None, cifops.CifStreamState(*bad))
    out, new = cifops.cif_stream_step(*chunk, None, cifops.CifStreamState(*bad), max_tokens=4)
    assert out.token_lengths[1] == 0 and all(torch.equal(x[1], y[1]) for x, y in zip(new, bad))
    with pytest.raises(ValueError, match=r"cifops\.cif_stream_flush: state\.frames\[1\] = -3"):
        cifops.cif_stream_flush(cifops.CifStreamState(*bad))
