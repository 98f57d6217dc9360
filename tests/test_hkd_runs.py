"""A run's files belong to that run (cifhkd.rundir, cifhkd.train, cifhkd.decode): a fresh run
is refused in another run's --exp-dir, files the trainer did not write are never replaced,
a failed or changed --resume leaves the record as it was, the log continues from the
checkpoint's step, and a checkpoint decodes without the folders it was trained from."""

import json
import re
import shutil

import pytest
import torch

import test_hkd_train
from test_hkd_train import common, read_log, snapshot

from cifhkd import decode  # noqa: E402
from cifhkd import rundir  # noqa: E402
from cifhkd import train as train_hkd  # noqa: E402

corpus = test_hkd_train.corpus  # the tiny corpus fixture, shared with the trainer's tests

QUICK = ["--valid-split", "", "--average-last", "0"]


def test_a_fresh_run_into_another_runs_folder_is_refused(corpus, tmp_path):
    """Run B (another seed, no --resume) into run A's folder replaced A's checkpoints,
    appended to its log and averaged B's weights with A's; now it is refused, and
    --overwrite-exp-dir removes A's files only."""
    exp = tmp_path / "exp"
    train_hkd.main(
        common(
            corpus,
            exp,
            "--max-steps",
            "2",
            "--save-every-steps",
            "1",
            "--valid-split",
            "",
            "--average-last",
            "2",
            "--log-every-steps",
            "1",
        )
    )
    (exp / "notes.txt").write_text("my notes")  # a user's file in the run's folder
    before = snapshot(exp)
    other = common(
        corpus,
        exp,
        "--max-steps",
        "2",
        "--save-every-steps",
        "1",
        "--valid-split",
        "",
        "--average-last",
        "2",
        "--log-every-steps",
        "1",
        "--seed",
        "8",
    )
    with pytest.raises(
        rundir.RunDirError, match=re.escape(f"--exp-dir {exp} holds a run") + ".*--resume.*--overwrite-exp-dir"
    ):
        train_hkd.main(other)
    assert snapshot(exp) == before
    with pytest.raises(rundir.RunDirError, match="--overwrite-exp-dir.*--resume"):
        train_hkd.main(other + ["--resume", "--overwrite-exp-dir"])
    assert snapshot(exp) == before
    a = torch.load(exp / "checkpoint-2.pt", weights_only=False)
    train_hkd.main(other + ["--overwrite-exp-dir"])
    b = torch.load(exp / "checkpoint-2.pt", weights_only=False)
    assert b["args"]["seed"] == 8 and not torch.equal(a["model"]["ctc_head.weight"], b["model"]["ctc_head.weight"])
    assert [h["step"] for h in read_log(exp)] == [1, 2]  # B's lines only
    assert json.loads((exp / "args.json").read_text())["seed"] == 8
    averaged = torch.load(exp / "averaged.pt", weights_only=False)
    ones = [torch.load(exp / f"checkpoint-{s}.pt", weights_only=False)["model"] for s in (1, 2)]
    torch.testing.assert_close(
        averaged["model"]["ctc_head.weight"], (ones[0]["ctc_head.weight"] + ones[1]["ctc_head.weight"]) / 2
    )
    assert (exp / "notes.txt").read_text() == "my notes"


@pytest.mark.parametrize("name", ["args.json", "averaged.pt", "train_log.jsonl", "checkpoint-1.pt", "run.json"])
def test_files_the_trainer_did_not_write_are_never_replaced(corpus, tmp_path, name):
    """A user's args.json, averaged.pt, train_log.jsonl or checkpoint-1.pt in --exp-dir was
    replaced (or appended to); now the run is refused naming it, --overwrite-exp-dir too."""
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / name).write_bytes(b"the user's")
    argv = common(corpus, exp, "--max-steps", "1", "--valid-split", "", "--average-last", "1", "--log-every-steps", "1")
    for extra in ([], ["--overwrite-exp-dir"]):
        with pytest.raises(rundir.RunDirError, match=re.escape(str(exp / name)) + ".*not written by"):
            train_hkd.main(argv + extra)
        assert (exp / name).read_bytes() == b"the user's" and sorted(p.name for p in exp.iterdir()) == [name]


def test_a_users_averaged_pt_in_a_run_folder_is_not_replaced_on_resume(corpus, tmp_path):
    exp = tmp_path / "exp"
    train_hkd.main(common(corpus, exp, "--max-steps", "1", *QUICK))
    (exp / "averaged.pt").write_bytes(b"the user's")
    with pytest.raises(rundir.RunDirError, match=re.escape(str(exp / "averaged.pt"))):
        train_hkd.main(common(corpus, exp, "--max-steps", "2", "--resume", "--valid-split", ""))
    assert (exp / "averaged.pt").read_bytes() == b"the user's" and not (exp / "checkpoint-2.pt").exists()


def test_a_failed_resume_leaves_the_record_as_it_was(corpus, tmp_path):
    """--resume --d-model 16 on a 32-wide run rewrote args.json before it failed."""
    exp = tmp_path / "exp"
    train_hkd.main(common(corpus, exp, "--max-steps", "1", *QUICK))
    before = snapshot(exp)
    with pytest.raises(rundir.RunDirError, match=r"--d-model: recorded 32, given 16"):
        train_hkd.main(common(corpus, exp, "--max-steps", "2", "--resume", "--d-model", "16", *QUICK))
    assert snapshot(exp) == before
    # a checkpoint that does not load: an error, and still nothing written
    (exp / "checkpoint-1.pt").write_bytes((exp / "checkpoint-1.pt").read_bytes()[:1000])
    before = snapshot(exp)
    with pytest.raises(Exception):
        train_hkd.main(common(corpus, exp, "--max-steps", "2", "--resume", *QUICK))
    assert snapshot(exp) == before


def test_resume_with_changed_hyperparameters_is_refused_naming_each(corpus, tmp_path):
    """--resume ignored a changed --peak-lr or --weight-decay while the record said the new
    values; now each changed option is named with its recorded and given value. Options
    that only say how far or how to run (--max-steps, --threads, ...) may change."""
    exp = tmp_path / "exp"
    train_hkd.main(common(corpus, exp, "--max-steps", "1", *QUICK))
    before = snapshot(exp)
    with pytest.raises(rundir.RunDirError) as error:
        train_hkd.main(
            common(corpus, exp, "--max-steps", "2", "--resume", "--peak-lr", "0.01", "--weight-decay", "0.1", *QUICK)
        )
    message = str(error.value)
    assert "--peak-lr: recorded 0.003, given 0.01" in message
    assert "--weight-decay: recorded 0.01, given 0.1" in message
    assert "checkpoint-1.pt" in message and "--seed" not in message
    assert snapshot(exp) == before
    train_hkd.main(
        common(corpus, exp, "--max-steps", "2", "--resume", "--keep-last", "1", "--log-every-steps", "1", *QUICK)
    )
    state = torch.load(exp / "checkpoint-2.pt", weights_only=False)
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.01
    record = json.loads((exp / "args.json").read_text())
    assert record["max_steps"] == 2 and record["peak_lr"] == 0.003 and record["resume"] == "latest"
    sessions = json.loads((exp / "run.json").read_text())["sessions"]
    assert [(s["resumed_from"], s["step"]) for s in sessions] == [(None, 0), (str(exp / "checkpoint-1.pt"), 1)]
    assert sessions[1]["changed"] == {"max_steps": [1, 2], "keep_last": [10, 1], "log_every_steps": [10, 1]}


def test_the_log_continues_from_the_checkpoints_step_after_a_kill(corpus, tmp_path):
    """train_log.jsonl repeated the steps logged after the last checkpoint of a killed run."""
    exp = tmp_path / "exp"
    extra = ["--save-every-steps", "2", "--log-every-steps", "1", *QUICK]
    train_hkd.main(common(corpus, exp, "--max-steps", "3", *extra))
    first = read_log(exp)
    assert [h["step"] for h in first] == [1, 2, 3]
    (exp / "checkpoint-3.pt").unlink()  # killed after logging step 3, before saving it
    with open(exp / "train_log.jsonl", "a") as f:
        f.write('{"step": 4, "ep')  # and in the middle of a line
    train_hkd.main(common(corpus, exp, "--max-steps", "4", "--resume", *extra))
    history = read_log(exp)
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert history[:2] == first[:2]


def test_a_checkpoint_decodes_the_same_without_its_training_folders(corpus, tmp_path):
    """A checkpoint kept only the path of its vocabulary: with the teacher folder rebuilt or
    gone, decode.py decoded with another vocabulary or failed with FileNotFoundError."""
    teacher, exp = tmp_path / "teacher", tmp_path / "exp"
    shutil.copytree(corpus / "teacher", teacher)
    train_hkd.main(
        common(
            corpus, exp, "--teacher-dir", str(teacher), "--max-steps", "2", "--valid-split", "", "--average-last", "2"
        )
    )
    split = corpus / "corpus" / "dev"
    first = decode.decode(exp / "averaged.pt", split, tmp_path / "first", method="greedy", count_search=0)
    hyps = (tmp_path / "first" / "hyp.txt").read_text()
    tokens = (teacher / "tokens.txt").read_text().splitlines()
    (teacher / "tokens.txt").write_text("\n".join(tokens[:3] + tokens[3:][::-1]) + "\n")  # rebuilt
    decode.decode(exp / "averaged.pt", split, tmp_path / "rebuilt", method="greedy", count_search=0)
    assert (tmp_path / "rebuilt" / "hyp.txt").read_text() == hyps
    with pytest.raises(
        ValueError,
        match=re.escape(f"--vocab {teacher / 'tokens.txt'} differs from the vocabulary of {exp / 'averaged.pt'}"),
    ):
        decode.decode(exp / "averaged.pt", split, tmp_path / "other", vocab=teacher / "tokens.txt")
    shutil.rmtree(teacher)  # gone
    again = decode.decode(exp / "checkpoint-2.pt", split, tmp_path / "gone", method="greedy", count_search=0)
    assert (tmp_path / "gone" / "hyp.txt").read_text() == hyps and again["cer"] == first["cer"]
    loaded = decode.load_checkpoint(exp / "averaged.pt")
    assert loaded.vocab.tokens == tokens_of(tokens) and loaded.model.config.d_model == 32
    assert loaded.state["tokenizer"]["sha256"]


def tokens_of(lines):
    return [line.split()[0] for line in lines]


def test_an_older_checkpoint_that_names_its_vocabulary_still_loads_or_says_what_to_pass(corpus, tmp_path):
    teacher, exp = tmp_path / "teacher", tmp_path / "exp"
    shutil.copytree(corpus / "teacher", teacher)
    train_hkd.main(common(corpus, exp, "--teacher-dir", str(teacher), "--max-steps", "1", *QUICK))
    state = torch.load(exp / "checkpoint-1.pt", weights_only=False)
    state["vocab"] = str(teacher / "tokens.txt")  # what checkpoints held before
    del state["tokenizer"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    split = corpus / "corpus" / "dev"
    decode.decode(exp / "checkpoint-1.pt", split, tmp_path / "new", method="greedy", count_search=0)
    decode.decode(old, split, tmp_path / "old", method="greedy", count_search=0)
    assert (tmp_path / "old" / "hyp.txt").read_text() == (tmp_path / "new" / "hyp.txt").read_text()
    moved = tmp_path / "tokens.txt"
    shutil.move(teacher / "tokens.txt", moved)
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(f"{old}: a checkpoint of an older cifhkd")
        + ".*"
        + re.escape(str(teacher / "tokens.txt"))
        + ".*pass --vocab",
    ):
        decode.load_checkpoint(old)
    assert decode.load_checkpoint(old, vocab=moved).vocab.tokens == tokens_of(moved.read_text().splitlines())
    (tmp_path / "nope.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'nope.pt'}: not a cifhkd checkpoint")):
        decode.load_checkpoint(tmp_path / "nope.pt")


def test_the_demo_continues_a_system_interrupted_before_its_first_checkpoint(corpus, tmp_path):
    """A system killed before its first checkpoint holds a run (its record, args.json, its
    log): the demo's next run resumes it (from step 0) instead of being refused."""
    import io

    import yaml
    from cifhkd import demo, progress

    config = tmp_path / "demo.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "corpus": str(corpus / "corpus"),
                "teacher_dir": str(corpus / "teacher"),
                "seed": 3,
                "max_steps": 1,
                "warmup_steps": 1,
                "save_every_steps": 1,
                "average_last": 1,
                "valid_split": "",
                "log_every_steps": 1,
                "no_progress": True,
                "max_batch_seconds": 6.0,
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
        )
    )
    args = demo.absolute_paths(demo.get_parser().parse_args(["--out", str(tmp_path / "demo"), "--config", str(config)]))
    exp = args.out / "cif"

    def train():
        with progress.StatusLine(lambda: "", stream=io.StringIO()) as status:
            demo.train(args, "cif", 1, progress.Training("CIF", exp, 1), status)

    train()
    for name in ("checkpoint-1.pt", "averaged.pt", "demo-train-seconds.txt"):
        (exp / name).unlink()  # killed before it saved anything
    train()
    assert [h["step"] for h in read_log(exp)] == [1]
    assert (exp / "checkpoint-1.pt").exists() and (exp / "averaged.pt").exists()


def test_decoding_refuses_a_tokenizer_other_than_the_checkpoints(corpus, trained_here, tmp_path):
    from cifhkd import teacher as teacher_lib

    default = teacher_lib.default_teacher_path()
    same = tmp_path / "same"
    same.mkdir()
    for name in (*decode.TOKENIZER_FILES, "config.json"):
        shutil.copy(default / name, same / name)
    split = corpus / "corpus" / "dev"
    decode.decode(trained_here, split, tmp_path / "a", method="greedy", count_search=0)
    decode.decode(trained_here, split, tmp_path / "b", method="greedy", count_search=0, teacher=str(same))
    assert (tmp_path / "a" / "hyp.jsonl").read_text() == (tmp_path / "b" / "hyp.jsonl").read_text()
    with open(same / "vocab.txt", "a") as f:
        f.write("zzzznewpiece\n")
    with pytest.raises(
        ValueError, match=re.escape(f"the tokenizer of {same} is not the one {trained_here} was trained with")
    ):
        decode.decode(trained_here, split, tmp_path / "c", teacher=str(same))


@pytest.fixture(scope="module")
def trained_here(corpus, tmp_path_factory):
    exp = tmp_path_factory.mktemp("hkd_runs_trained")
    train_hkd.main(common(corpus, exp, "--max-steps", "1", *QUICK))
    return exp / "checkpoint-1.pt"


def test_a_second_trainer_into_a_folder_in_use_is_refused(corpus, tmp_path):
    """Two trainers started together into one folder both found it empty and mixed their
    files; a running trainer holds the folder's lock (flock), as the process here does."""
    import subprocess
    import sys

    exp = tmp_path / "exp"
    exp.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)",
            str(exp),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.RunDirError, match=re.escape(f"another trainer is running in --exp-dir {exp}")):
            train_hkd.main(common(corpus, exp, "--max-steps", "1", *QUICK))
        assert list(exp.iterdir()) == []
    finally:
        holder.kill()
        holder.wait()
    train_hkd.main(common(corpus, exp, "--max-steps", "1", *QUICK))  # free again
    train_hkd.main(common(corpus, exp, "--max-steps", "2", "--resume", *QUICK))  # released after each run
