"""Files written whole or not at all, and a file's SHA-256.

write_atomically writes a file whole or not at all (a temporary file, fsynced and
renamed; the folder fsynced); remove_stale_temporaries removes what a killed writer left.
sha256_file is the one digest of a file's bytes (the teacher cache, the ONNX export's
checkpoint record, the demo's reuse test).
"""

import hashlib
import os
import re
from pathlib import Path
from typing import Callable, List

_TEMPORARY = re.compile(r"\.tmp(\d+)$")


def _fsync_dir(directory: Path):
    """fsync a folder, so that a rename in it survives a power cut (where the OS allows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder
    finally:
        os.close(fd)


def sha256_file(path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path, write: Callable[[Path], None]):
    """write(tmp) to tmp = path + ".tmp<pid>", fsync it, os.replace it onto path, fsync the
    folder: a crash or a kill leaves the old file or the new one, never half a file (but
    may leave tmp: remove_stale_temporaries). A failed write removes tmp and raises."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes one file at a time: its own leftovers are stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(folder, is_ours: Callable[[str], bool]) -> List[Path]:
    """Remove the files ``<name>.tmp<pid>`` in folder that write_atomically left when its
    process died mid-write: those whose <name> is_ours and whose process is not running
    (on this machine). Nothing else is touched. Returns the removed paths."""
    removed = []
    for path in sorted(Path(folder).glob("*.tmp*")):
        match = _TEMPORARY.search(path.name)
        if match is None or not path.is_file() or not is_ours(path.name[: match.start()]):
            continue
        if _pid_alive(int(match.group(1))):
            continue  # another process is writing into this folder right now
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
