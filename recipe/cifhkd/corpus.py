"""Build a small, reproducible English speech corpus for the CIF-HKD CPU demo.

No speech corpus can be downloaded on this project's machines, so the demo corpus is
synthetic: real English sentences from Debian's ``fortunes`` packages, spoken by
espeak-ng (8 English accents x voice variants, varied speed and pitch) and, when it
is installed, flite (several voices).

Pipeline:
  1. read every fortune file under --fortunes-dir, split fortunes into sentences;
  2. clean and normalise each sentence to lowercase words of letters with internal
     apostrophes ("don't"), dropping sentences a synthesiser would not read as written
     (digits, symbols, all-caps abbreviations); split them into clauses at , ; : ( )
     and -- (unless --no-clauses); deduplicate; keep only clauses made of the
     --top-words most frequent words (a closed vocabulary: the default 300 words give
     2081 clauses of --min-words..--max-words (3-12) words and 298 WordPieces, so a small
     corpus hears each token about 50 times);
  3. shuffle (seeded) and split by sentence into train / dev / test (no sentence in
     two splits); training sentences are spoken more than once (by other voices) when
     --num-train exceeds them;
  4. give each utterance a voice (accent+variant), speed and pitch (seeded). Every test
     clause is spoken by every voice of --test-voices (the split test, the paper's
     setting: 15 speakers never heard in training from the training population, two
     voice variants of each espeak accent that training hears and one flite voice, so
     3000 test utterances by default; make_corpus refuses a test voice whose accent,
     engine or variant training does not hear), again by every voice of
     --accent-test-voices (the split test-accent, out of domain: the espeak accent en-029,
     which training never hears, and flite's awb; 2400 utterances), and again by
     --test-seen-voices training voices (12 distinct ones per clause, drawn uniformly)
     into the split test-seen: the same unseen sentences from voices the models heard.
     Both held-out voice sets are kept out of train and dev, which use the training voices
     (uniformly, or --flite-share of the utterances by flite's);
  5. synthesise 16 kHz mono 16-bit wav (resampled with soxr where the synthesiser
     runs at another rate) with a seeded white-noise floor --snr-range dB below the
     speech (synthesisers write exact digital silence), and write Kaldi-style dirs and
     JSONL manifests:

     OUT/wav/<utt>-<crc32 of the synthesis parameters>.wav
     OUT/{train,dev,test,test-accent,test-seen}/{wav.scp,text,utt2spk,spk2utt}
     OUT/{train,dev,test,test-accent,test-seen}.jsonl   {"id", "audio", "text", "duration", "speaker"}
     OUT/demo-corpus.json                   the mark of a corpus made by this script

Synthesis speed is printed at the end: about 120 utterances/s with 2 jobs on the project's
2-core machine, so the default size (12000/200/200x15/200x12/200x12, 7.6 h of audio) takes
about 2 min.

    python python/prepare_demo_corpus.py --out data/demo            # defaults
    python python/prepare_demo_corpus.py --out data/tiny --num-train 100 --num-dev 20 --num-test 20

OUT must be a new or empty folder, or a corpus this script made (it writes
OUT/demo-corpus.json first) holding no symbolic link: a folder holding anything else, or
a corpus in which a split, a file or the wav folder is a link (writing through it would
rewrite its target), is refused (CorpusError; the script exits with status 2), so that no
one's data is overwritten. In its own corpus, existing wavs of the same
utterance and synthesis parameters are kept (re-running resumes); everything else is
rewritten. The same --seed and inputs give the same
corpus. Nothing is installed: a missing synthesiser or fortunes package is reported
with the Debian package to install (CorpusError), and the script exits with status 2.
"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000

# espeak-ng's English accents, by voice file name (voices/gmw). British English is "en":
# espeak-ng 1.51 accepts "en-gb" (its language name) too but then ignores a "+variant",
# so "en-gb+f1" would sound exactly like "en-gb+m1".
ESPEAK_ACCENTS = [
    "en",
    "en-us",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-rp",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
]
# A set of its voice variants (voices/!v).
ESPEAK_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4", "klatt"]
# flite voices at 16 kHz ("kal" is 8 kHz and would be upsampled; left out).
FLITE_VOICES = ["slt", "rms", "awb", "kal16"]
# The split test, the paper's setting: speakers never heard in training from the training
# population. Two voice variants of each espeak accent that training hears (variant pairs
# rotate over the accents, so every variant is heard in training with other accents) and
# one flite voice: 15 held-out voices.
DEFAULT_TEST_VOICES = [
    "espeak:en+m1",
    "espeak:en+m2",
    "espeak:en-us+m3",
    "espeak:en-us+m4",
    "espeak:en-gb-scotland+m5",
    "espeak:en-gb-scotland+m7",
    "espeak:en-gb-x-gbclan+f1",
    "espeak:en-gb-x-gbclan+f2",
    "espeak:en-gb-x-rp+f3",
    "espeak:en-gb-x-rp+f4",
    "espeak:en-gb-x-gbcwmd+klatt",
    "espeak:en-gb-x-gbcwmd+m1",
    "espeak:en-us-nyc+m2",
    "espeak:en-us-nyc+m3",
    "flite:rms",
]
# The split test-accent, out of domain: a whole espeak accent training never hears and
# one more flite voice (the demo's test split before the paper's setting was).
DEFAULT_ACCENT_TEST_VOICES = ["espeak:en-029+*", "flite:awb"]

# Characters a synthesiser would read aloud as words or that make the text ambiguous.
_REJECT_CHARS = re.compile(r"[0-9@#$%&*+=/\\<>|_~^\[\]{}]")
_ABBREVIATION = re.compile(r"\b[A-Z]{2,}\b|\b(?:[A-Za-z]\.){2,}")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_CLAUSE_BREAK = re.compile(r"[,;:()]|--")


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker. engine: "espeak" or "flite"; name: e.g. "en-us+f2"."""

    engine: str
    name: str

    @property
    def speaker_id(self) -> str:
        return f"{self.engine}-{self.name.replace('+', '-')}"

    @property
    def accent(self) -> str:
        """espeak: the accent (the name before "+"); flite: "flite" (one population)."""
        return self.name.partition("+")[0] if self.engine == "espeak" else self.engine

    @property
    def variant(self) -> str:
        """espeak: the voice variant (after "+"); flite: the voice."""
        return self.name.partition("+")[2] if self.engine == "espeak" else self.name

    def matches(self, pattern: str) -> bool:
        engine, _, name = pattern.partition(":")
        if engine != self.engine:
            return False
        if name.endswith("*"):
            return self.name.startswith(name[:-1])
        return self.name == name


def normalise_sentence(raw: str):
    """Return the sentence as lowercase words (letters, internal apostrophes) or None
    when a synthesiser would not read it as written."""
    text = unicodedata.normalize("NFKD", raw)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = text.replace("\u2019", "'").replace("`", "'")
    if _REJECT_CHARS.search(text) or _ABBREVIATION.search(text):
        return None
    if not text.isascii():
        return None
    text = text.lower()
    text = re.sub(r"[^a-z']+", " ", text)
    words = []
    for word in text.split():
        word = word.strip("'")  # quotes, not apostrophes
        word = re.sub(r"'{2,}", "'", word)
        if word:
            words.append(word)
    return " ".join(words) if words else None


def read_fortune_sentences(fortunes_dir: Path):
    """Sentences of every fortune file in fortunes_dir (sorted, so the order is fixed)."""
    files = sorted(
        p for p in fortunes_dir.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8") and not p.is_symlink()
    )
    sentences = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for fortune in text.split("\n%\n"):
            lines = []
            for line in fortune.splitlines():
                stripped = line.strip()
                # attributions ("-- Mark Twain"), dialogue/indented verse layout markers
                if stripped.startswith("--") or stripped.startswith("%"):
                    break
                lines.append(stripped)
            body = " ".join(lines)
            if not body or ":" in body and len(body.split(":")[0].split()) <= 2:
                # "Q: ... A: ..." and "Name: ..." dialogues read badly
                continue
            sentences.extend(s for s in _SENTENCE_END.split(body) if s)
    return sentences


def build_sentence_pool(fortunes_dir: Path, min_words: int, max_words: int, top_words: int = 0, clauses: bool = False):
    """Cleaned, deduplicated sentences of min_words..max_words words, in file order.

    clauses: split sentences further at , ; : ( ) and dashes (each clause is read on its
    own). top_words > 0 keeps only sentences whose every word is among the top_words most
    frequent words of all cleaned sentences (a closed vocabulary, like WSJ's 5k task:
    fewer tokens, each heard more often)."""
    seen, pool = set(), []
    for raw in read_fortune_sentences(fortunes_dir):
        for part in _CLAUSE_BREAK.split(raw) if clauses else [raw]:
            norm = normalise_sentence(part)
            if norm is None or norm in seen:
                continue
            seen.add(norm)
            pool.append(norm)
    if top_words > 0:
        counts = Counter(word for sentence in pool for word in sentence.split())
        # ties broken alphabetically so the word list does not depend on dict order
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        allowed = {word for word, _ in ranked[:top_words]}
        pool = [s for s in pool if all(word in allowed for word in s.split())]
    return [s for s in pool if min_words <= len(s.split()) <= max_words]


def split_voices(use_flite: bool, test_patterns, accent_patterns=()):
    """(training voices, test voices, test-accent voices): the voices that match no pattern,
    those that match a test pattern, and those that match an accent pattern and no test
    pattern."""
    voices = [Voice("espeak", f"{accent}+{variant}") for accent in ESPEAK_ACCENTS for variant in ESPEAK_VARIANTS]
    if use_flite:
        voices += [Voice("flite", name) for name in FLITE_VOICES]
    held_out = [v for v in voices if any(v.matches(p) for p in test_patterns)]
    accent = [v for v in voices if v not in held_out and any(v.matches(p) for p in accent_patterns)]
    return [v for v in voices if v not in held_out and v not in accent], held_out, accent


def unheard_population(seen, held_out):
    """The held-out voices not from the training population: their accent (espeak) or
    engine (flite), or their espeak variant, is not among the training voices'."""
    accents = {v.accent for v in seen}
    variants = {v.variant for v in seen if v.engine == "espeak"}
    return [v for v in held_out if v.accent not in accents or (v.engine == "espeak" and v.variant not in variants)]


def _to_16k_mono(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    if samples.ndim > 1:
        samples = samples.mean(axis=1)
    if sample_rate != SAMPLE_RATE:
        import soxr

        samples = soxr.resample(samples, sample_rate, SAMPLE_RATE)
    return samples.astype(np.float32)


def add_noise_floor(samples: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    """Add white noise snr_db below the speech's power (seeded). Synthesisers write exact
    digital silence, which no microphone records: its log-mel energies sit at the floor
    (log of FLT_EPSILON) and would dominate the utterance's feature statistics."""
    power = float(np.mean(samples.astype(np.float64) ** 2))
    if power == 0.0:
        return samples
    noise = np.random.default_rng(seed).standard_normal(len(samples))
    return (samples + noise * np.sqrt(power / 10 ** (snr_db / 10))).astype(np.float32)


def synthesise(
    voice: Voice, text: str, speed: float, pitch: int, out_path: Path, snr_db: float = float("inf"), noise_seed: int = 0
) -> float:
    """Speak text into out_path (16 kHz mono PCM16) with a noise floor snr_db below the
    speech (none when infinite). speed: 1.0 = the engine's normal rate. Returns the
    duration in seconds."""
    with tempfile.NamedTemporaryFile(suffix=".wav", dir=out_path.parent) as tmp:
        if voice.engine == "espeak":
            cmd = [
                "espeak-ng",
                "-v",
                voice.name,
                "-s",
                str(int(round(170 * speed))),
                "-p",
                str(pitch),
                "-w",
                tmp.name,
                text,
            ]
        else:
            # flite: duration_stretch > 1 is slower; int_f0_target_mean shifts the pitch.
            cmd = [
                "flite",
                "-voice",
                voice.name,
                "--setf",
                f"duration_stretch={1.0 / speed:.3f}",
                "--setf",
                f"int_f0_target_mean={80 + 1.6 * pitch:.0f}",
                "-t",
                text,
                "-o",
                tmp.name,
            ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        samples, sample_rate = sf.read(tmp.name, dtype="float32")
    samples = _to_16k_mono(samples, sample_rate)
    if len(samples) == 0:
        raise RuntimeError(f"{voice.engine} produced no audio for {text!r}")
    if np.isfinite(snr_db):
        samples = add_noise_floor(samples, snr_db, noise_seed)
    peak = float(np.max(np.abs(samples)))
    if peak > 0.99:  # the noise must not clip the 16-bit file
        samples = samples * (0.99 / peak)
    sf.write(out_path, samples, SAMPLE_RATE, subtype="PCM_16")
    return len(samples) / SAMPLE_RATE


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--num-train",
        type=int,
        default=12000,
        help="training utterances (sentences repeat, with other voices, when there are fewer training sentences)",
    )
    parser.add_argument("--num-dev", type=int, default=200, help="dev utterances (training voices)")
    parser.add_argument(
        "--num-test", type=int, default=200, help="test clauses, each spoken by every held-out voice (12 with flite)"
    )
    parser.add_argument("--min-words", type=int, default=3)
    parser.add_argument("--max-words", type=int, default=12)
    parser.add_argument(
        "--no-clauses", action="store_true", help="whole sentences only (default: also split them at , ; : ( ) --)"
    )
    parser.add_argument(
        "--top-words", type=int, default=300, help="keep sentences made only of the N most frequent words (0: all)"
    )
    parser.add_argument(
        "--speed-range", type=float, nargs=2, default=(0.85, 1.15), help="speaking-rate factors, uniform"
    )
    parser.add_argument("--pitch-range", type=int, nargs=2, default=(30, 70), help="espeak pitch 0-99, uniform")
    parser.add_argument(
        "--snr-range",
        type=float,
        nargs=2,
        default=(30.0, 50.0),
        help="white-noise floor, dB below the speech, uniform ('0 0': none)",
    )
    parser.add_argument(
        "--test-voices",
        nargs="+",
        default=DEFAULT_TEST_VOICES,
        help="the split test: voices held out of train/dev, from the training "
        "population (each one's accent, or engine for flite, and espeak "
        "variant heard in training), as engine:name, '*' as suffix wildcard "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--accent-test-voices",
        nargs="*",
        default=DEFAULT_ACCENT_TEST_VOICES,
        help="the split test-accent (out of domain): voices held out of train/dev "
        "too, the same test clauses; none: no test-accent split "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--test-seen-voices",
        type=int,
        default=12,
        help="the split test-seen: every test clause spoken by this many "
        "distinct training voices (0: no test-seen split)",
    )
    parser.add_argument("--no-flite", action="store_true", help="use espeak-ng only")
    parser.add_argument(
        "--flite-share",
        type=float,
        default=None,
        help="share of the train/dev utterances spoken by the training flite "
        "voices (default: every training voice equally likely, so the 3 "
        "flite voices speak 3 in 80). Measured: 0.25 halves the held-out "
        "flite voice's CER and costs the espeak test voices 2 points",
    )
    parser.add_argument("--fortunes-dir", type=Path, default=Path("/usr/share/games/fortunes"))
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=1234)
    return parser


def check_tools(args) -> bool:
    """CorpusError naming the Debian package to install when something is missing.
    Returns whether flite is used."""
    if shutil.which("espeak-ng") is None:
        raise CorpusError(
            "espeak-ng not found on PATH; install the Debian package 'espeak-ng' (apt-get install -y espeak-ng)"
        )
    if not args.fortunes_dir.is_dir() or not any(args.fortunes_dir.iterdir()):
        raise CorpusError(
            f"no fortune files in {args.fortunes_dir}; install the Debian package 'fortunes' "
            "(apt-get install -y fortunes) or pass --fortunes-dir"
        )
    use_flite = not args.no_flite and shutil.which("flite") is not None
    if not use_flite and not args.no_flite:
        print("prepare_demo_corpus: flite not found (Debian package 'flite'); espeak-ng voices only", file=sys.stderr)
    return use_flite


class CorpusError(RuntimeError):
    """What stops make_corpus before it writes: a missing tool, a folder that is not a
    demo corpus, options that leave no training data (main: exit status 2)."""

    def __init__(self, message: str):
        super().__init__(f"prepare_demo_corpus: {message}")


MARKER = "demo-corpus.json"  # written first into every corpus this script makes


def check_output(out: Path) -> None:
    """CorpusError when OUT is a file, a folder with files this script did not make, or a
    corpus holding a symbolic link (the script makes none; writing through one could
    rewrite files out of the corpus): it rewrites its own corpus, never someone's data."""
    if out.exists() and not out.is_dir():
        raise CorpusError(f"--out {out} is a file, not a folder")
    if out.is_dir() and not (out / MARKER).is_file():
        found = sorted(p.name for p in out.iterdir())
        if found:
            shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
            raise CorpusError(
                f"--out {out} already holds {shown}, and no {MARKER}: it is not a demo corpus "
                "made by this script, and nothing in it is overwritten. Choose a new or empty "
                "folder (a demo corpus made before the marker existed: delete it and make it "
                "again)"
            )
    link = _first_link(out) if out.is_dir() else None
    if link is not None:
        raise CorpusError(
            f"{link} is a link to {os.path.realpath(link)}: a demo corpus holds no links, and "
            "nothing is written through one (its target is not the corpus's). Remove the link, "
            "or choose another --out (--out itself may be a link)"
        )


def _first_link(folder: Path):
    """A symbolic link under folder (links to folders are not followed), or None."""
    pending = [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    return Path(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
    return None


def claim_output(out: Path, options: dict) -> None:
    """check_output, then OUT/demo-corpus.json (with the options) written before anything else."""
    check_output(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(
        json.dumps({"made_by": "cifhkd.corpus.make_corpus", "options": options}, default=str) + "\n"
    )


def write_split(out: Path, split: str, rows):
    split_dir = out / split
    split_dir.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: r["id"])  # Kaldi wants sorted keys
    with (
        open(split_dir / "wav.scp", "w") as scp,
        open(split_dir / "text", "w") as text,
        open(split_dir / "utt2spk", "w") as u2s,
        open(out / f"{split}.jsonl", "w") as jsonl,
    ):
        for row in rows:
            scp.write(f"{row['id']} {row['audio']}\n")
            text.write(f"{row['id']} {row['text']}\n")
            u2s.write(f"{row['id']} {row['speaker']}\n")
            jsonl.write(json.dumps(row) + "\n")
    spk2utt = {}
    for row in rows:
        spk2utt.setdefault(row["speaker"], []).append(row["id"])
    with open(split_dir / "spk2utt", "w") as f:
        for spk in sorted(spk2utt):
            f.write(f"{spk} {' '.join(spk2utt[spk])}\n")


def parse_options(out, options: dict) -> argparse.Namespace:
    """make_corpus's options as the command line would give them: each value written as
    its option's arguments (a flag for a true store_true, one argument per item for
    nargs) and parsed by get_parser."""
    parser = get_parser()
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    unknown = sorted(set(options) - set(actions) | ({"out"} & set(options)))
    if unknown:
        raise TypeError(
            f"make_corpus: unknown option(s) {', '.join(unknown)} (prepare_demo_corpus.py --help lists them)"
        )
    argv = ["--out", str(out)]
    for name, value in options.items():
        action, flag = actions[name], actions[name].option_strings[0]
        if value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            argv += [flag] if value else []
        elif action.nargs is None:
            argv += [flag, str(value)]
        else:
            values = [value] if isinstance(value, (str, Path)) else list(value)
            argv += [flag, *map(str, values)]

    def error(message):
        raise ValueError(f"make_corpus: {message}")

    parser.error = error
    return parser.parse_args(argv)


def make_corpus(out, **options) -> Path:
    """Synthesise the demo corpus into the folder `out` (the module docstring says how, and
    that only a new or empty folder, or a demo corpus made before, is written); options:
    the other command-line options by name (num_train=100, seed=7: get_parser's dests),
    their defaults otherwise. The one maker of the demo corpus: prepare_demo_corpus.py,
    demo.py and train_hkd.py --make-demo-corpus call it. The options go through the
    command line's parser (types, choices, counts; None: the default). -> out, resolved

    TypeError for an unknown option name, ValueError for a value the command line refuses,
    CorpusError (the module's checks) before anything is written."""
    return make_corpus_from_args(parse_options(out, options))


def make_corpus_from_args(args: argparse.Namespace) -> Path:
    """make_corpus with get_parser's parsed options."""
    check_output(args.out.resolve())
    use_flite = check_tools(args)
    rng = random.Random(args.seed)

    pool = build_sentence_pool(
        args.fortunes_dir, args.min_words, args.max_words, args.top_words, clauses=not args.no_clauses
    )
    print(
        f"prepare_demo_corpus: {len(pool)} distinct {'sentences' if args.no_clauses else 'clauses'} "
        f"after cleaning ({args.min_words}-{args.max_words} words"
        + (f", {args.top_words} most frequent words only)" if args.top_words > 0 else ")")
    )
    held = args.num_dev + args.num_test
    if len(pool) <= held:
        raise CorpusError(
            f"{len(pool)} sentences leave none for training after {held} dev+test: lower "
            "--num-dev/--num-test, widen --min/max-words or raise --top-words"
        )
    rng.shuffle(pool)
    # split by sentence; training sentences are spoken again (by other random voices)
    # when --num-train exceeds them
    train_pool = pool[held:]
    sentences = {
        "train": [train_pool[i % len(train_pool)] for i in range(args.num_train)],
        "dev": pool[: args.num_dev],
        "test": pool[args.num_dev : held],
    }

    seen, held_out, accent_held_out = split_voices(use_flite, args.test_voices, args.accent_test_voices)
    if not held_out or not seen:
        raise CorpusError(f"--test-voices {args.test_voices} must hold out some but not all voices")
    unheard = unheard_population(seen, held_out)
    if unheard:
        raise CorpusError(
            f"--test-voices: {', '.join(v.speaker_id for v in unheard)} not from the training "
            "population (its accent, engine or variant is held out of training too); "
            "out-of-domain voices belong in --accent-test-voices"
        )
    if not 0 <= args.test_seen_voices <= len(seen):
        raise CorpusError(
            f"--test-seen-voices must be in [0, {len(seen)}] (the training voices), got {args.test_seen_voices}"
        )
    if args.flite_share is not None and not 0.0 <= args.flite_share <= 1.0:
        raise CorpusError(f"--flite-share must be in [0, 1], got {args.flite_share}")
    by_engine = {engine: [v for v in seen if v.engine == engine] for engine in ("espeak", "flite")}
    if args.flite_share is not None and by_engine["flite"] and by_engine["espeak"]:
        seen_shares = [(by_engine["flite"], args.flite_share), (by_engine["espeak"], 1.0 - args.flite_share)]
    else:
        seen_shares = [(seen, 1.0)]

    out = args.out.resolve()
    claim_output(out, vars(args))
    (out / "wav").mkdir(parents=True, exist_ok=True)
    sentences["test-accent"] = sentences["test"] if accent_held_out else []
    sentences["test-seen"] = sentences["test"] if args.test_seen_voices > 0 else []
    jobs = []
    for split in sentences:
        # one generator per split: a bigger --num-train leaves dev and test as they were
        split_rng = random.Random(f"{args.seed}-{split}")
        for i, text in enumerate(sentences[split]):
            if split == "test":  # every held-out voice speaks every test clause
                speakers = held_out
            elif split == "test-accent":
                speakers = accent_held_out
            elif split == "test-seen":
                speakers = split_rng.sample(seen, args.test_seen_voices)
            else:
                group = split_rng.choices([g for g, _ in seen_shares], [w for _, w in seen_shares])[0]
                speakers = [split_rng.choice(group)]
            for voice in speakers:
                speed = split_rng.uniform(*args.speed_range)
                pitch = split_rng.randint(*args.pitch_range)
                snr_db = split_rng.uniform(*args.snr_range) if args.snr_range[0] > 0 else float("inf")
                utt = f"{voice.speaker_id}_{split}{i:06d}"  # speaker prefix: Kaldi's convention
                jobs.append((split, utt, voice, text, speed, pitch, snr_db))

    def run(job):
        split, utt, voice, text, speed, pitch, snr_db = job
        # the synthesis parameters are part of the name: a wav from another seed or other
        # options is never mistaken for this one when a run resumes
        params = zlib.crc32(repr((voice, text, speed, pitch, snr_db)).encode())
        path = out / "wav" / f"{utt}-{params:08x}.wav"
        if path.exists():
            try:
                return split, utt, voice, text, path, sf.info(str(path)).duration, False
            except RuntimeError:
                pass  # broken from an interrupted run: synthesise again
        duration = synthesise(voice, text, speed, pitch, path, snr_db, zlib.crc32(utt.encode()))
        return split, utt, voice, text, path, duration, True

    start = time.perf_counter()
    rows = {split: [] for split in sentences}
    synthesised, audio_seconds = 0, 0.0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool_exec:
        for n, (split, utt, voice, text, path, duration, new) in enumerate(pool_exec.map(run, jobs), 1):
            rows[split].append(
                {
                    "id": utt,
                    "audio": str(path),
                    "text": text,
                    "duration": round(duration, 3),
                    "speaker": voice.speaker_id,
                }
            )
            synthesised += new
            audio_seconds += duration
            if n % 500 == 0:
                print(f"  {n}/{len(jobs)} utterances", flush=True)
    elapsed = time.perf_counter() - start

    for split, split_rows in rows.items():
        if not split_rows:  # --test-seen-voices 0 etc.: no stale split from an earlier run
            shutil.rmtree(out / split, ignore_errors=True)
            (out / f"{split}.jsonl").unlink(missing_ok=True)
            continue
        write_split(out, split, split_rows)
        hours = sum(r["duration"] for r in split_rows) / 3600
        speakers = len({r["speaker"] for r in split_rows})
        distinct = len({r["text"] for r in split_rows})
        print(f"  {split}: {len(split_rows)} utterances of {distinct} sentences, {hours:.2f} h, {speakers} voices")
    rate = synthesised / elapsed if elapsed > 0 else float("inf")
    print(
        f"prepare_demo_corpus: synthesised {synthesised} utterances ({audio_seconds / 3600:.2f} h "
        f"of audio in all) in {elapsed:.1f} s with {args.jobs} jobs: {rate:.1f} utterances/s; "
        f"{len(held_out)} voices held out for test ({', '.join(args.test_voices)}), "
        f"{len(accent_held_out)} for test-accent ({', '.join(args.accent_test_voices) or 'none'})"
    )
    names = ",".join(split for split, split_rows in rows.items() if split_rows)
    print(f"prepare_demo_corpus: wrote {out}/{{{names}}} and {out}/{{{names}}}.jsonl")
    return out


def main(argv=None):
    try:
        make_corpus_from_args(get_parser().parse_args(argv))
    except CorpusError as e:
        print(e, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # python -m cifhkd.corpus
    main()
