"""Live progress of the demo's trainings and decodings: one status line, side by side.

The trainings run in their own processes; their progress is read from what they write
anyway (EXP/train_log.jsonl, one line per --log-every-steps updates), a few times a
minute, so that watching costs them nothing. StatusLine redraws one console line from a
render function: in place on a terminal, or as a plain line every half minute where the
output is a file or a pipe (a log of `make demo`, CI).
"""

import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, TextIO, Union

log = logging.getLogger(__name__)


def log_size(exp: Path) -> int:
    """The size in bytes of EXP/train_log.jsonl (0 when there is none)."""
    try:
        return (Path(exp) / "train_log.jsonl").stat().st_size
    except OSError:
        return 0


def logged_since(exp: Path, offset: int) -> List[dict]:
    """The complete lines of EXP/train_log.jsonl after its first `offset` bytes (a line
    being written is skipped)."""
    try:
        with open(Path(exp) / "train_log.jsonl", "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def last_logged(exp: Path) -> Optional[dict]:
    """The last complete line of EXP/train_log.jsonl (a line being written is skipped), or
    None when there is none yet."""
    rows = logged_since(exp, 0)
    return rows[-1] if rows else None


def duration(seconds: float) -> str:
    """1h02m, 12m05s, 42s."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass
class Training:
    """One system's training as the demo sees it. state: waiting (for a free job),
    running, done; start: when its run started (time.monotonic); log_offset: the size of
    EXP/train_log.jsonl then (a resumed run's old lines, which may go past the checkpoint
    it resumes from, are not its own); base: the step and time (time.monotonic) of the
    run's first logged line, as first seen: the rate of the time left counts from it."""

    label: str
    exp: Path
    budget: int = 0  # --max-steps (0: none)
    state: str = "waiting"
    start: float = 0.0
    log_offset: int = 0
    base: Optional[tuple] = None

    def begin(self):
        self.log_offset = log_size(self.exp)
        self.base = None
        self.start = time.monotonic()
        self.state = "running"

    def status(self, now: float) -> str:
        """`LABEL step/budget loss L, elapsed E, left T` from the lines this run logged (read
        from EXP); the time left once it has logged twice."""
        if self.state != "running":
            return f"{self.label} {self.state}"
        rows = logged_since(self.exp, self.log_offset)
        elapsed = now - self.start
        if not rows:
            return f"{self.label} starting, {duration(elapsed)}"
        if self.base is None:
            self.base = (rows[0]["step"], now)
        row, step = rows[-1], rows[-1]["step"]
        text = f"{self.label} {step}/{self.budget}" if self.budget else f"{self.label} step {step}"
        if "loss" in row:
            text += f" loss {row['loss']:.3f}"
        text += f", {duration(elapsed)}"
        base_step, base_time = self.base
        if self.budget and step > base_step:
            per_step = (now - base_time) / (step - base_step)
            text += f", {duration(per_step * max(self.budget - step, 0))} left"
        return text


@dataclass
class Decoding:
    """One system's decodings: `total` splits, `done` of them finished."""

    label: str
    total: int
    done: int = 0

    def status(self, now: float) -> str:
        return f"{self.label} {self.done}/{self.total}"


@dataclass
class Phase:
    """What the status line shows: the phase's name, its start and its systems."""

    name: str
    items: Dict[str, Union[Training, Decoding]] = field(default_factory=dict)
    start: float = field(default_factory=time.monotonic)

    def render(self, now: Optional[float] = None) -> str:
        now = time.monotonic() if now is None else now
        return f"demo: {self.name} {duration(now - self.start)} | " + " | ".join(
            item.status(now) for item in self.items.values()
        )


class StatusLine:
    """A status line redrawn from render() every `interval` seconds on a thread while the
    context is open. On a terminal it is rewritten in place; elsewhere (a file, a pipe) it
    is printed as a line every `plain_interval` seconds. say() prints a message above it.
    The last status is printed as a line when the context closes. render() is called with
    the lock held; an error in it (or in writing) is logged once and ends the redrawing,
    never the program, nor does it replace an exception leaving the context."""

    def __init__(
        self,
        render: Callable[[], str],
        stream: Optional[TextIO] = None,
        interval: float = 2.0,
        plain_interval: float = 30.0,
    ):
        self.render, self.stream = render, stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else plain_interval
        self.lock, self.stop = threading.RLock(), threading.Event()
        self.shown = False  # a status is on the terminal's last line
        self.failed = False  # render() or a write failed: no more drawing
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _clear(self):
        if self.shown:
            self.stream.write("\r\033[K")
            self.shown = False

    def draw(self):
        """Show the current status (in place on a terminal, else as a line)."""
        with self.lock:
            if self.failed:
                return
            try:
                text = self.render()
                if self.tty:
                    self._clear()
                    self.stream.write(text)
                    self.shown = True
                else:
                    self.stream.write(text + "\n")
                self.stream.flush()
            except Exception:
                self.failed = True
                log.exception("the status line failed; it is no longer shown")

    def say(self, message: str):
        """Print message as a line, the status below it again on a terminal."""
        with self.lock:
            self._clear()
            self.stream.write(message + "\n")
            self.stream.flush()
        if self.tty and self.thread.is_alive():
            self.draw()

    def _loop(self):
        while not self.stop.wait(self.interval):
            self.draw()

    def __enter__(self) -> "StatusLine":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.draw()
        with self.lock:
            try:
                if self.shown:
                    self.stream.write("\n")
                    self.shown = False
                self.stream.flush()
            except Exception:
                if not self.failed:
                    self.failed = True
                    log.exception("the status line failed")
