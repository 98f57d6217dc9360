"""Speech data for the CIF-HKD recipe: manifests and their audio.

Two manifest formats describe a split, both read into a list of :class:`Utterance`:

- a Kaldi-style directory with ``wav.scp`` (``<utt> <path>``) and ``text``
  (``<utt> <transcript>``), optionally ``utt2spk`` and ``utt2dur``;
- a JSONL file, one object per line: ``{"audio": path, "text": str}`` plus optional
  ``"id"``, ``"duration"`` (seconds) and ``"speaker"``. Relative paths are relative to
  the manifest's folder.

Manifests are UTF-8 text. Problems in a manifest (a line that is not UTF-8, a malformed
line, a duplicate id, an utterance in wav.scp with no transcript or the reverse, an
unreadable audio file, audio holding NaN or infinite samples) raise
:class:`ManifestError` with ``file:line`` in the message. With
``skip_bad=True`` they are skipped instead and counted in the returned :class:`SkipReport`,
which the caller should print. load_manifest reads and checks a split in one call and
refuses one with no utterances, naming it.

Audio is read with soundfile, mixed down to mono and resampled to 16 kHz with soxr
(``soxr.resample``, the maintained libsoxr binding) when it has another rate. The
batches are cifhkd.sampler's; files written whole are cifhkd.files'. This module imports
no torch (the ONNX runtime path reads audio with it).
"""

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000


class ManifestError(ValueError):
    """A problem in a manifest or the audio it names; the message starts with file:line."""


@dataclass
class Utterance:
    """One utterance. duration is in seconds (None until known); source is "file:line"
    of the manifest entry, for error messages."""

    id: str
    audio: str
    text: str
    duration: Optional[float] = None
    speaker: Optional[str] = None
    source: str = ""


@dataclass
class SkipReport:
    """What a loader skipped with skip_bad=True: reason -> count, and a few examples."""

    counts: Counter = field(default_factory=Counter)
    examples: List[str] = field(default_factory=list)

    def add(self, reason: str, message: str):
        self.counts[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        if not self.total:
            return "nothing skipped"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        return f"skipped {self.total} ({parts}); e.g. " + "; ".join(self.examples)


def _fail(report: Optional[SkipReport], reason: str, message: str):
    if report is None:
        raise ManifestError(message)
    report.add(reason, message)


def text_lines(path, report: Optional[SkipReport] = None) -> Iterator[Tuple[int, str]]:
    """(line number, line) of a UTF-8 text file. A line that is not UTF-8 (a Latin-1
    transcript, an audio file passed as a manifest) is a ManifestError naming the file and
    line; with a report, it is counted there and skipped."""
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _fail(
                    report,
                    "not UTF-8",
                    f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                    f"column {e.start + 1}): manifests, transcripts and vocabularies "
                    "are read as UTF-8 (convert the file, e.g. iconv -f latin1 -t utf-8; "
                    "or is it not a manifest?)",
                )


def _read_table(path: Path, report: Optional[SkipReport], what: str) -> Dict[str, Tuple[str, int]]:
    """``<key> <value...>`` lines -> {key: (value, line number)}."""
    table = {}
    for lineno, line in text_lines(path, report):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        value = value.strip()
        if what == "path" and not value:
            _fail(report, "malformed line", f"{path}:{lineno}: expected '<utt-id> <{what}>', got {line!r}")
            continue
        if key in table:
            _fail(
                report,
                "duplicate id",
                f"{path}:{lineno}: duplicate utterance id {key!r} (first on line {table[key][1]})",
            )
            continue
        table[key] = (value, lineno)
    return table


def read_kaldi_dir(data_dir, skip_bad: bool = False) -> Tuple[List[Utterance], SkipReport]:
    """Read ``wav.scp`` + ``text`` (+ optional ``utt2spk``, ``utt2dur``) of a Kaldi data dir.

    wav.scp entries must be file paths (pipes such as ``sox ... |`` and ark offsets are
    not supported and are reported as errors). Returns (utterances in wav.scp order,
    skip report).
    """
    data_dir = Path(data_dir)
    report = SkipReport()
    fail_to = report if skip_bad else None
    scp_path, text_path = data_dir / "wav.scp", data_dir / "text"
    for path in (scp_path, text_path):
        if not path.is_file():
            raise ManifestError(f"{path}: missing (a Kaldi data dir needs wav.scp and text)")
    wavs = _read_table(scp_path, fail_to, "path")
    texts = _read_table(text_path, fail_to, "transcript")
    spk = _read_table(data_dir / "utt2spk", fail_to, "speaker") if (data_dir / "utt2spk").is_file() else {}
    durs = _read_table(data_dir / "utt2dur", fail_to, "duration") if (data_dir / "utt2dur").is_file() else {}

    utterances = []
    for utt, (audio, lineno) in wavs.items():
        source = f"{scp_path}:{lineno}"
        if audio.endswith("|") or ":" in audio.split()[-1] and audio.split()[-1].split(":")[-1].isdigit():
            _fail(
                fail_to,
                "unsupported wav.scp entry",
                f"{source}: {utt}: only plain file paths are supported, got {audio!r}",
            )
            continue
        if utt not in texts:
            _fail(fail_to, "no transcript", f"{source}: {utt} has audio but no line in {text_path}")
            continue
        text, text_line = texts[utt]
        if not text:
            _fail(fail_to, "empty transcript", f"{text_path}:{text_line}: {utt} has an empty transcript")
            continue
        duration = None
        if utt in durs:
            try:
                duration = float(durs[utt][0])
            except ValueError:
                _fail(
                    fail_to, "malformed line", f"{data_dir / 'utt2dur'}:{durs[utt][1]}: bad duration {durs[utt][0]!r}"
                )
                continue
        path = Path(audio) if Path(audio).is_absolute() else data_dir / audio
        utterances.append(Utterance(utt, str(path), text, duration, spk.get(utt, (None, 0))[0], source))
    for utt, (_, lineno) in texts.items():
        if utt not in wavs:
            _fail(fail_to, "no audio", f"{text_path}:{lineno}: {utt} has a transcript but no line in {scp_path}")
    return utterances, report


def read_jsonl_manifest(path, skip_bad: bool = False) -> Tuple[List[Utterance], SkipReport]:
    """Read a JSONL manifest (see the module docstring). Returns (utterances, skip report)."""
    path = Path(path)
    report = SkipReport()
    fail_to = report if skip_bad else None
    utterances, first_line = [], {}
    for lineno, line in text_lines(path, fail_to):
        if not line.strip():
            continue
        source = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            _fail(fail_to, "malformed line", f"{source}: not valid JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            _fail(fail_to, "malformed line", f"{source}: expected a JSON object")
            continue
        audio = row.get("audio")
        text = row.get("text")
        if not isinstance(audio, str) or not audio:
            _fail(fail_to, "malformed line", f"{source}: missing or non-string 'audio'")
            continue
        if not isinstance(text, str) or not text.strip():
            _fail(fail_to, "empty transcript", f"{source}: missing or empty 'text'")
            continue
        duration = row.get("duration")
        if duration is not None and (not isinstance(duration, (int, float)) or duration <= 0):
            _fail(fail_to, "malformed line", f"{source}: 'duration' must be a positive number, got {duration!r}")
            continue
        utt = str(row.get("id", Path(audio).stem))
        if utt in first_line:
            _fail(
                fail_to, "duplicate id", f"{source}: duplicate utterance id {utt!r} (first on line {first_line[utt]})"
            )
            continue
        first_line[utt] = lineno
        audio_path = Path(audio) if Path(audio).is_absolute() else path.parent / audio
        utterances.append(
            Utterance(
                utt,
                str(audio_path),
                text.strip(),
                float(duration) if duration is not None else None,
                row.get("speaker"),
                source,
            )
        )
    return utterances, report


def read_manifest(path, skip_bad: bool = False) -> Tuple[List[Utterance], SkipReport]:
    """A Kaldi data dir (a directory) or a JSONL manifest (a file)."""
    if Path(path).is_dir():
        return read_kaldi_dir(path, skip_bad)
    return read_jsonl_manifest(path, skip_bad)


def split_name(path) -> str:
    """A split's name: its folder's name (Kaldi dir) or its file's stem (JSONL manifest):
    data/demo/train and data/demo/train.jsonl are both "train"."""
    path = Path(path)
    return path.name if path.is_dir() else path.stem


def missing_manifest_file(path) -> Optional[Path]:
    """The file whose absence keeps `path` from being a manifest (the path itself, or a
    Kaldi dir's wav.scp or text), or None when it is one."""
    path = Path(path)
    if path.is_dir():
        return next((path / f for f in ("wav.scp", "text") if not (path / f).is_file()), None)
    return None if path.is_file() else path


# libsndfile subtypes that store floating-point samples, which can be NaN or infinite
# (integer PCM, A-law, ADPCM, FLAC ... cannot; MP3/Vorbis/Opus decoders give finite values)
FLOAT_SUBTYPES = frozenset({"FLOAT", "DOUBLE"})


def _non_finite(samples: np.ndarray, sample_rate: int) -> Optional[str]:
    """None when every sample is finite, else what is wrong ("3 NaN/infinite samples,
    the first at 0.006 s")."""
    finite = np.isfinite(samples)
    if finite.all():
        return None
    bad = np.flatnonzero(~finite.reshape(len(samples), -1).all(axis=1))
    return (
        f"{len(bad)} NaN/infinite sample(s), the first at {bad[0] / sample_rate:.3f} s "
        "(features and losses would be NaN)"
    )


def check_audio(
    utterances: Sequence[Utterance],
    skip_bad: bool = False,
    report: Optional[SkipReport] = None,
    max_duration: Optional[float] = None,
) -> Tuple[List[Utterance], SkipReport]:
    """Open every file's header: fill in missing durations, and reject unreadable audio,
    empty audio, and a stated duration that disagrees with the file by more than 0.1 s
    (the manifest does not describe this audio). Files of floating-point samples
    (FLOAT_SUBTYPES: float WAV, ...) are decoded too and rejected when a sample is NaN or
    infinite; other encodings cannot hold such values and are not decoded. max_duration
    (seconds) drops longer utterances (counted in the report as "too long"; never an error).
    """
    report = report if report is not None else SkipReport()
    fail_to = report if skip_bad else None
    kept = []
    for utt in utterances:
        try:
            info = sf.info(utt.audio)
        except (RuntimeError, OSError, sf.LibsndfileError) as e:
            _fail(fail_to, "unreadable audio", f"{utt.source}: {utt.id}: cannot read {utt.audio}: {e}")
            continue
        duration = info.frames / info.samplerate
        if info.frames == 0:
            _fail(fail_to, "empty audio", f"{utt.source}: {utt.id}: {utt.audio} has no samples")
            continue
        if utt.duration is not None and abs(utt.duration - duration) > 0.1:
            _fail(
                fail_to,
                "duration mismatch",
                f"{utt.source}: {utt.id}: manifest says {utt.duration:.3f} s, {utt.audio} holds {duration:.3f} s",
            )
            continue
        if info.subtype in FLOAT_SUBTYPES:
            try:
                problem = _non_finite(sf.read(utt.audio, dtype="float32", always_2d=True)[0], info.samplerate)
            except (RuntimeError, OSError, sf.LibsndfileError) as e:
                problem = f"cannot decode it: {e}"
            if problem is not None:
                _fail(fail_to, "non-finite audio", f"{utt.source}: {utt.id}: {utt.audio}: {problem}")
                continue
        if max_duration is not None and duration > max_duration:
            report.add("too long", f"{utt.source}: {utt.id}: {duration:.1f} s > {max_duration} s")
            continue
        utt.duration = duration
        kept.append(utt)
    return kept, report


def load_audio(path: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read a file as float32 mono at sample_rate ([num_samples], values in [-1, 1]).
    Raises ManifestError naming the file when it cannot be read or holds a NaN or
    infinite sample (check_audio finds those when the data is loaded)."""
    try:
        samples, file_rate = sf.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, OSError, sf.LibsndfileError) as e:
        raise ManifestError(f"{path}: cannot read audio: {e}") from e
    problem = _non_finite(samples, file_rate)
    if problem is not None:
        raise ManifestError(f"{path}: {problem}")
    samples = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if file_rate != sample_rate:
        import soxr

        samples = soxr.resample(samples, file_rate, sample_rate).astype(np.float32)
    return np.ascontiguousarray(samples)


def load_manifest(
    path, skip_bad: bool = False, max_duration: Optional[float] = None
) -> Tuple[List[Utterance], SkipReport]:
    """read_manifest then check_audio; a manifest with no utterances (left) is a
    ManifestError naming it."""
    utterances, report = read_manifest(path, skip_bad)
    utterances, report = check_audio(utterances, skip_bad, report, max_duration)
    if not utterances:
        left = f" left ({report})" if report.total else " (an empty manifest)"
        raise ManifestError(f"{path}: no utterances{left}")
    return utterances, report
