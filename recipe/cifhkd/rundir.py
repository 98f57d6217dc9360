"""The trainer's experiment folder (--exp-dir): which of its files belong to the run, and
what the trainer refuses.

A run keeps its record in EXP/run.json: the names of the files it wrote (args.json,
train_log.jsonl, checkpoint-<step>.pt, averaged.pt, tensorboard/ when it made that
folder) and one entry per session (its start, the checkpoint it resumed from and that
checkpoint's step, and the options changed since the previous session, as [before, now]:
only those of RUN_CONTROL can change). A file is the run's only when the record names it: the trainer
writes, replaces or removes no other file of the folder (a user's notes, the demo's
train.out, a checkpoint-best.pt, a user's args.json or averaged.pt, the files of a run of
an older cifhkd, which kept no record).

The trainer refuses (RunDirError, before it writes anything):

- a fresh run (no --resume) into a folder that holds a run: it names the folder and the
  two ways on, --resume or --overwrite-exp-dir (which first removes the files the run's
  record names, then the record; nothing else);
- a run that would write a file of a trainer's name that its record does not name
  (args.json, train_log.jsonl, averaged.pt with --average-last, a checkpoint-<step>.pt
  after the step it starts from);
- --resume with an option that changes what is trained (check_options: every option but
  RUN_CONTROL's), naming each with its recorded and given value; the record (args.json)
  is the options of the latest session, and those options are the same in every session.

The record is written only once the run has started as what it says (after the
checkpoint it resumes from has loaded). From then on the trainer holds an exclusive lock
(flock) on the folder: a second trainer into it is refused, and so is one that finds the
record changed since it began. On --resume, train_log.jsonl keeps the lines up to
the checkpoint's step, so a killed run's lines after its last checkpoint are not repeated.

The checkpoints themselves: atomic_save writes one whole or not at all,
remove_stale_temporaries removes what a killed save left, average_checkpoints makes
averaged.pt, rng_state/set_rng_state are the RNG states a checkpoint saves and restores.
"""

import datetime
import fcntl
import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from . import files

RECORD = "run.json"
FORMAT = "cifhkd-run"
ARGS, LOG, AVERAGED, BOARD = "args.json", "train_log.jsonl", "averaged.pt", "tensorboard"
OVERWRITE = "--overwrite-exp-dir"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)\.pt")

# options that say how far, where from or how fast to run, not what is trained: they may
# change on --resume (all others must be as recorded)
RUN_CONTROL = frozenset(
    {
        "config",
        "exp_dir",
        "resume",
        "overwrite_exp_dir",
        "max_steps",
        "num_epochs",
        "save_every_steps",
        "keep_last",
        "average_last",
        "log_every_steps",
        "valid_every_steps",
        "no_progress",
        "threads",
        "num_workers",
        "device",
        "compile",
        "too_short",
        "make_demo_corpus",
        "demo_num_train",
        "demo_num_dev",
        "demo_num_test",
        "inject_nan_at_step",
    }
)
PATH_OPTIONS = frozenset({"corpus", "teacher_dir", "teacher"})


class RunDirError(RuntimeError):
    """--exp-dir holds what the run may not write over, or --resume changes the run."""


_LOCKS: Dict[Path, int] = {}  # the folders this process trains into: their locked descriptors


def release_locks():
    """Release the folder locks this process holds (RunDir.lock)."""
    while _LOCKS:
        os.close(_LOCKS.popitem()[1])


def checkpoint_step(path: Path) -> int:
    """The step of EXP/checkpoint-<step>.pt (ValueError for another name)."""
    match = CHECKPOINT_NAME.fullmatch(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: not a checkpoint-<step>.pt name")
    return int(match.group(1))


def list_checkpoints(exp_dir: Path) -> List[Path]:
    """Every EXP/checkpoint-<step>.pt, oldest first, the run's or not (RunDir.checkpoints:
    the run's); other names (checkpoint-best.pt, a user's copies) are never the trainer's."""
    found = [p for p in Path(exp_dir).glob("checkpoint-*.pt") if CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=checkpoint_step)


def is_trainer_file(name: str) -> bool:
    """Whether the trainer writes files of this name into EXP (its atomic writes' temporary
    files are <name>.tmp<pid>)."""
    return name in (RECORD, ARGS, LOG, AVERAGED) or CHECKPOINT_NAME.fullmatch(name) is not None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _plain(value):
    """value as JSON holds it (Path -> str, tuple -> list)."""
    return json.loads(json.dumps(value, default=str))


class RunDir:
    """EXP and the record of the run it holds (None: it holds none)."""

    def __init__(self, path: Path, record: Optional[dict]):
        self.path = Path(path)
        self.record = record

    @classmethod
    def read(cls, path) -> "RunDir":
        """The folder and its run's record; RunDirError when EXP/run.json is not one."""
        path = Path(path)
        file = path / RECORD
        if not file.exists():
            return cls(path, None)
        try:
            record = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not (
            isinstance(record, dict)
            and record.get("format") == FORMAT
            and isinstance(record.get("files"), list)
            and isinstance(record.get("sessions"), list)
        ):
            raise RunDirError(
                f"train_hkd: {file} was not written by the trainer (it is not a {FORMAT} record); "
                "the trainer never replaces a file it did not write: move it away or choose "
                "another --exp-dir"
            )
        return cls(path, record)

    # --- what is the run's

    def owns(self, name: str) -> bool:
        return self.record is not None and name in self.record["files"]

    def owned(self) -> List[str]:
        """The names the record holds that a trainer writes (a hand-edited record cannot
        make the trainer remove anything else)."""
        return (
            []
            if self.record is None
            else [n for n in self.record["files"] if n != RECORD and (n == BOARD or is_trainer_file(n))]
        )

    def checkpoints(self) -> List[Path]:
        """The run's checkpoint-<step>.pt, oldest first."""
        return [p for p in list_checkpoints(self.path) if self.owns(p.name)]

    def describe(self) -> str:
        steps = [checkpoint_step(p) for p in self.checkpoints()]
        sessions = self.record["sessions"]
        started = f"started {sessions[0]['started']}" if sessions else "started"
        return started + (f", checkpoints up to step {steps[-1]}" if steps else ", no checkpoint yet")

    def _foreign(self, names: List[str]) -> Optional[str]:
        """The message refusing names that exist and are not the run's, or None."""
        foreign = [self.path / n for n in names if (self.path / n).exists() and not self.owns(n)]
        if not foreign:
            return None
        return (
            f"train_hkd: {', '.join(map(str, foreign))} {'was' if len(foreign) == 1 else 'were'} "
            f"not written by this run (its record {self.path / RECORD} does not name "
            f"{'it' if len(foreign) == 1 else 'them'}: a user's file, or a run of an older cifhkd); "
            "the trainer never replaces a file it did not write: move it away or choose another --exp-dir"
        )

    # --- before anything is written

    def check(self, args) -> "RunDir":
        """Refuse, on every rank before anything is loaded, what the module docstring says.
        -> self"""
        if args.overwrite_exp_dir and args.resume is not None:
            raise RunDirError(f"train_hkd: {OVERWRITE} starts afresh and --resume continues: pass one of them")
        if self.record is not None and args.resume is None and not args.overwrite_exp_dir:
            owned = [n for n in self.owned() if (self.path / n).exists()]
            raise RunDirError(
                f"train_hkd: --exp-dir {self.path} holds a run ({self.describe()}): continue it with --resume, "
                f"or start afresh with {OVERWRITE}, which removes the files that run wrote "
                f"({', '.join(owned + [RECORD])}) and no other; or train into another --exp-dir"
            )
        names = [ARGS, LOG] + ([AVERAGED] if args.average_last > 0 else [])
        if args.resume is None:  # a fresh run writes checkpoints from step 1 on
            names += [p.name for p in list_checkpoints(self.path)]
        message = self._foreign(names)
        if message:
            raise RunDirError(message)
        return self

    def check_options(self, given: dict, recorded: Optional[dict], defaults: dict, source: str):
        """RunDirError naming each option outside RUN_CONTROL whose given value differs from
        the recorded one (an option missing from an older record: its default), from
        `source` (the checkpoint or record they come from)."""
        if recorded is None:
            return
        changed = []
        for key in sorted(given):
            if key in RUN_CONTROL:
                continue
            new, old = _plain(given[key]), _plain(recorded.get(key, defaults.get(key)))
            if key in PATH_OPTIONS:
                same = new == old or (None not in (new, old) and Path(new).resolve() == Path(old).resolve())
            else:
                same = new == old
            if not same:
                old_text = old if key in recorded else f"{old} (not recorded: the default)"
                changed.append(f"--{key.replace('_', '-')}: recorded {old_text}, given {new}")
        if changed:
            raise RunDirError(
                f"train_hkd: --resume with options that change the run ({source}): "
                + "; ".join(changed)
                + ". A run continues with the options it was trained with: leave these out (or give the "
                "recorded values), or start a new run in another --exp-dir. Options that only say how far "
                f"or how to run may change: {', '.join('--' + k.replace('_', '-') for k in sorted(RUN_CONTROL - {'inject_nan_at_step'}))}"
            )

    def recorded_options(self) -> Optional[dict]:
        """The run's args.json (the options of its latest session), or None."""
        if not (self.owns(ARGS) and (self.path / ARGS).is_file()):
            return None
        try:
            options = json.loads((self.path / ARGS).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunDirError(
                f"train_hkd: {self.path / ARGS}, the run's record of its options, does not read as JSON ({e})"
            ) from e
        return options if isinstance(options, dict) else None

    # --- writing

    def save(self):
        text = json.dumps(self.record, indent=1) + "\n"
        files.write_atomically(self.path / RECORD, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def claim(self, *names: str):
        """Record names as the run's before they are written (RunDirError for an existing
        file that is not)."""
        message = self._foreign(list(names))
        if message:
            raise RunDirError(message)
        new = [n for n in names if n not in self.record["files"]]
        if new:
            self.record["files"].extend(new)
            self.save()

    def release(self, path: Path):
        """Remove a file of the run, then its name from the record."""
        if not self.owns(path.name):
            raise RunDirError(f"train_hkd: {path} is not the run's: not removed")
        path.unlink(missing_ok=True)
        self.record["files"].remove(path.name)
        self.save()

    def remove_run(self) -> List[str]:
        """--overwrite-exp-dir: remove the files the record names, then the record. -> the
        names removed"""
        removed = []
        for name in self.owned():
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            else:
                continue
            removed.append(name)
        (self.path / RECORD).unlink(missing_ok=True)
        self.record = None
        return removed

    def start(self, args, step: int, resumed_from: Optional[Path], is_main: bool, log=print):
        """The run starts as what it says (the checkpoint it resumes from has loaded): refuse
        a checkpoint-<step>.pt after `step` that is not the run's (every rank); then, on
        the main rank, --overwrite-exp-dir's removal, the record with this session,
        args.json, and train_log.jsonl cut to the lines up to `step`."""
        clash = [p.name for p in list_checkpoints(self.path) if checkpoint_step(p) > step]
        message = self._foreign(clash)
        if message:
            raise RunDirError(message)
        if not is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock()
        if args.overwrite_exp_dir and self.record is not None:
            removed = self.remove_run()
            log(f"{OVERWRITE}: removed the previous run's {', '.join(removed + [RECORD])} from {self.path}")
        if self.record is None:
            self.record = {
                "format": FORMAT,
                "version": 1,
                "id": uuid.uuid4().hex,
                "created": _now(),
                "files": [],
                "sessions": [],
            }
        previous, given = self.recorded_options(), _plain(vars(args))
        changed = {
            k: [previous.get(k), v]
            for k, v in given.items()
            if previous is not None and previous.get(k) != v and k not in ("resume", "overwrite_exp_dir")
        }
        self.record["sessions"].append(
            {
                "started": _now(),
                "step": step,
                "resumed_from": None if resumed_from is None else str(resumed_from),
                "changed": changed,
            }
        )
        names = [ARGS, LOG] + ([BOARD] if not (self.path / BOARD).exists() or self.owns(BOARD) else [])
        self.claim(*names)  # saves the record
        text = json.dumps(vars(args), default=str, indent=1)
        files.write_atomically(self.path / ARGS, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        self.cut_log(step)

    def lock(self):
        """Hold an exclusive lock (flock) on the folder until release_locks() or the process
        ends, so that a second trainer into it is refused; then check that the record is
        still the one this run read when it began (no other trainer started in between)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(
                f"train_hkd: another trainer is running in --exp-dir {self.path} (it holds the "
                "folder's lock): wait for it to end, or train into another --exp-dir"
            ) from None
        except OSError:
            os.close(fd)  # a file system without flock (some network ones): no guard
            return
        _LOCKS[self.path] = fd
        now = RunDir.read(self.path).record

        def identity(record):
            return None if record is None else (record["id"], len(record["sessions"]))

        if identity(now) != identity(self.record):
            release_locks()
            raise RunDirError(
                f"train_hkd: --exp-dir {self.path} changed while this run was loading (another "
                "trainer started in it): nothing was written; look at it, then start again"
            )

    def cut_log(self, step: int):
        """Keep the lines of train_log.jsonl up to `step` (those of a killed session after its
        last checkpoint, and a line cut short, go)."""
        path = self.path / LOG
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (
                line.endswith("\n")
                and isinstance(row, dict)
                and isinstance(row.get("step"), int)
                and row["step"] <= step
            ):
                kept.append(line)
        text = "".join(kept)
        if text != path.read_text(encoding="utf-8", errors="replace"):
            files.write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# --- checkpoints: what they hold and how they are written ---------------------------------


def rng_state() -> dict:
    """The Python, numpy, torch (and CUDA) RNG states, as a checkpoint saves them."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: Path):
    """torch.save to path + ".tmp<pid>", fsync it, os.replace it onto path, fsync the
    folder (files.write_atomically): a crash leaves the old file or the new one, never half
    a file; the temporary file of a killed run is removed by remove_stale_temporaries."""
    files.write_atomically(path, lambda tmp: torch.save(obj, tmp))


def remove_stale_temporaries(exp_dir: Path, log: Optional[Callable[[str], None]] = None) -> List[Path]:
    """Remove the temporary files that atomic writes left in exp_dir when their process
    died mid-write (``<name>.tmp<pid>`` of a process no longer running, <name> a file the
    trainer writes: checkpoint-<step>.pt, averaged.pt, args.json, run.json,
    train_log.jsonl); nothing else is touched; log says what was removed. Returns the
    removed paths."""
    removed = files.remove_stale_temporaries(exp_dir, is_trainer_file)
    if removed and log is not None:
        log(f"removed {len(removed)} temporary file(s) of interrupted saves: " + ", ".join(p.name for p in removed))
    return removed


def average_checkpoints(paths: List[Path], out: Path) -> dict:
    """Mean of the checkpoints' model weights (integer buffers from the last one) ->
    out as {"model", "model_config", "vocab", "tokenizer", "step", "averaged": [paths]} (what
    decoding needs, from the last one); returns it."""
    if not paths:
        raise ValueError("average_checkpoints: no checkpoints given")
    total = None
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=False)
        weights = state["model"]
        if total is None:
            total = {k: v.double() if v.is_floating_point() else v.clone() for k, v in weights.items()}
        else:
            for k, v in weights.items():
                total[k] = total[k] + v.double() if v.is_floating_point() else v.clone()
    averaged = {k: (v / len(paths)).to(weights[k].dtype) if v.is_floating_point() else v for k, v in total.items()}
    result = {
        "model": averaged,
        **{k: state[k] for k in ("model_config", "vocab", "tokenizer") if k in state},
        "step": state["step"],
        "averaged": [str(p) for p in paths],
    }
    atomic_save(result, out)
    return result
