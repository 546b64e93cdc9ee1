"""Atomic writes and hashing: a crash mid-write never leaves a half-written output behind."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside `path`; on success rename it over `path` (same filesystem).

    Durable as well as atomic: the temp file is fsynced before the rename (else a power cut can
    leave the new name pointing at unwritten blocks) and the folder after it (else the rename
    itself can be lost). A reader sees the old file or the whole new one, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        full = disk_full(err, path.parent)  # judged before the temp file frees its space
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise disk_full_error(path) from err
        raise
    fsync_dir(path.parent)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or unlink in `folder` durable (POSIX: fsync the directory itself)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform without directory fds (Windows): nothing more to do
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_atomic(src: str | Path, dst: str | Path) -> None:
    """Copy `src` over `dst` atomically and durably (readers never see a partial `dst`)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


SQLITE_FULL = "database or disk is full"  # SQLite's words for SQLITE_FULL (MLflow's embedded store)


def disk_full_cause(err: BaseException) -> str | None:
    """What ran out of space, when the exception chain says so: ENOSPC/EDQUOT from the OS, or
    SQLite's SQLITE_FULL (raised by MLflow's store as an SQLAlchemy or MLflow error); None otherwise."""
    seen, visited = err, set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{seen.strerror} writing {seen.filename or 'a file'}"
        if SQLITE_FULL in str(seen):
            return f"SQLite: {SQLITE_FULL} (MLflow's store, tracking.uri in params.yaml)"
        seen = seen.__cause__ or seen.__context__
    return None


def disk_full(err: BaseException, folder: Path) -> bool:
    """ENOSPC/EDQUOT or SQLITE_FULL anywhere in the exception chain, or a library's own words for a
    short write (torch: "... 4096 requested and 1080 written") on a filesystem with (almost) no space left."""
    if disk_full_cause(err):
        return True
    if not isinstance(err, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def human_size(n: int) -> str:
    """Bytes in the unit that shows them: 812 B, 14.2 kB, 3.1 MB, 1.2 GB."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def disk_full_error(path: Path):
    from barkgpt.errors import BarkError

    try:
        usage = shutil.disk_usage(path.parent)
        where = f"{human_size(usage.free)} free of {human_size(usage.total)}"
    except OSError:
        where = "free space unknown"
    return BarkError(f"disk full: could not write {path} ({where} on the filesystem holding {path.parent.resolve()}); "
                     "free space there (e.g. old exports/, mlruns/, .dvc/cache: dvc gc) or move the project, "
                     "then run the stage again")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
