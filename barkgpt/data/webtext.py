"""WebText-2 ingestion: one streaming pass reads the hub corpus or any local text, JSONL or parquet
file or folder, cleans it line by line and writes the train and validation lines as they come.

Memory stays flat whatever the corpus size: local `.txt` files are read line by line;
`.jsonl`/`.json`/`.parquet` files and the hub (`Raziel1234/WebText-2`, a `corpus.txt` of about 67k
lines) stream through Hugging Face `datasets` (`streaming=True`, bounded timeouts). With no network
the hub fails fast with a message that says how to point `webtext.source` at a local file instead.
The one thing that grows with the corpus is deduplication: one 64-bit hash per distinct line
(about 60 bytes in a Python set); `webtext.clean.dedup: false` removes it.

Two passes: the first counts the source's lines (the `head` split cuts at a line number) and
hashes it, spooling table and hub rows into a temporary text file beside the outputs; the second
cleans, splits and writes.

The params these functions take (the text section, its `clean` and `split`) are declared beside
the pipeline in barkgpt/pipelines/webtext.py, which imports this module: so they are not imported here.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from barkgpt.errors import BarkError
from barkgpt.fileio import atomic_path, sha256_bytes, sha256_file

TEXT_SUFFIXES = (".txt", ".md")  # plain text, one text per line
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SUFFIXES = TEXT_SUFFIXES + tuple(TABLE_SUFFIXES)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_HOST = "huggingface.co"
BINARY_PROBE = 1 << 20  # bytes checked for NUL before a file is read as text


@dataclass
class Source:
    """Where the corpus is: local files (in order) or a hub dataset id. `lines()` streams raw lines
    (not yet stripped) in source order; reading errors name the file and the fix."""

    name: str
    files: list[Path] = field(default_factory=list)
    hub_id: str | None = None
    text_field: str = "text"
    hub_timeout_s: float = 20.0

    @property
    def plain_text(self) -> bool:
        """Only local .txt files: cheap to read twice, no spooling needed."""
        return self.hub_id is None and all(f.suffix.lower() in TEXT_SUFFIXES for f in self.files)

    def lines(self) -> Iterator[str]:
        if self.hub_id is not None:
            yield from _hub_lines(self.hub_id, self.text_field, self.hub_timeout_s)
            return
        for f in self.files:
            suffix = f.suffix.lower()
            if suffix in TEXT_SUFFIXES:
                yield from text_file_lines(f)
            else:
                yield from _table_lines(f, TABLE_SUFFIXES[suffix], self.text_field)

    def sha256(self) -> str | None:
        """Content hash of local files (None for the hub: hashed as it streams)."""
        if self.hub_id is not None:
            return None
        if len(self.files) == 1:
            return sha256_file(self.files[0])
        return sha256_bytes("".join(sha256_file(f) for f in self.files).encode())


# --- reading ------------------------------------------------------------------------------------

def open_source(source: str, text_field: str = "text", hub_timeout_s: float = 20.0) -> Source:
    """The corpus at a local file or folder, or a Hugging Face hub dataset id (read nothing yet)."""
    path = Path(source).expanduser()
    if path.exists():
        return Source(str(path), _corpus_files(path), text_field=text_field, hub_timeout_s=hub_timeout_s)
    if _looks_like_hub_id(source):
        return Source(source, hub_id=source, text_field=text_field, hub_timeout_s=hub_timeout_s)
    raise BarkError(
        f"{source}: no such file or folder; set webtext.source to a local .txt/.jsonl/.parquet file or "
        "folder, or to a Hugging Face dataset id such as Raziel1234/WebText-2"
    )


def _looks_like_hub_id(source: str) -> bool:
    return bool(HUB_ID.match(source)) and not source.startswith(".") and Path(source).suffix not in SUFFIXES


def _corpus_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise BarkError(f"{path}: unsupported file type {path.suffix or '(none)'}; use one of {list(SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise BarkError(f"{path}: folder holds no {'/'.join(SUFFIXES)} files; put the corpus there or fix webtext.source")
    return files


def _check_not_binary(path: Path) -> None:
    with open(path, "rb") as f:
        if b"\x00" in f.read(BINARY_PROBE):
            raise BarkError(f"{path}: looks binary (contains NUL bytes), not text; point webtext.source at a text file")


def text_file_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file, one at a time, split as `str.splitlines` splits the whole text."""
    _check_not_binary(path)
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise BarkError(
                    f"{path}: not valid UTF-8 (bad byte at offset {offset + err.start}); convert it, e.g. "
                    f"`iconv -f latin1 -t utf-8 {path.name} > fixed.txt`"
                ) from None
            offset += len(raw)
            yield from text.splitlines()


def _table_lines(path: Path, builder: str, text_field: str) -> Iterator[str]:
    if builder == "parquet":
        with open(path, "rb") as f:
            if f.read(4) != b"PAR1":
                raise BarkError(f"{path}: not a parquet file (no PAR1 header); check the file or its suffix")
    else:
        _check_not_binary(path)
    _hub_env(20.0, offline=True)  # local files never need the network
    import datasets

    rows = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
    yield from _rows_to_lines(rows, text_field, str(path), f"cannot read it as {builder}")


def _rows_to_lines(rows, text_field: str, where: str, problem: str) -> Iterator[str]:
    """Lines of each row's text column; the library's many exception types become one BarkError."""
    iterator = iter(rows)
    first = True
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except Exception as err:  # datasets/pyarrow raise many types for bad files; name the file instead
            raise BarkError(f"{where}: {problem} ({type(err).__name__}: {str(err)[:200]})") from None
        if first and text_field not in row:
            raise BarkError(f"{where}: has no column {text_field!r} (columns: {list(row)}); set webtext.text_field")
        first = False
        text = row.get(text_field)
        if isinstance(text, str):
            yield from text.splitlines()


def _hub_env(timeout_s: float, offline: bool) -> None:
    # Read by huggingface_hub when it is imported: bounded waits instead of its long defaults.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(timeout_s)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(timeout_s)))
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def hub_reachable(host: str = HUB_HOST, timeout_s: float = 5.0) -> bool:
    """TCP connect to the hub within `timeout_s`, DNS included (getaddrinfo ignores socket timeouts)."""
    result = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result)


def _hub_lines(repo_id: str, text_field: str, timeout_s: float) -> Iterator[str]:
    online = hub_reachable(timeout_s=min(timeout_s, 5.0))
    # Offline, datasets can still answer from its local cache (not streaming); it must not try the network.
    _hub_env(timeout_s, offline=not online)
    import datasets

    unreachable = (
        f"{repo_id}: the Hugging Face hub is unreachable ({HUB_HOST}:443 did not answer within "
        f"{min(timeout_s, 5.0):.0f} s) and the dataset is not in the local cache; pass a local file instead: "
        "set webtext.source in params.yaml, or run `dvc exp run -S webtext.source=path/to/corpus.txt pipelines/webtext/dvc.yaml`"
    )
    try:
        rows = datasets.load_dataset(repo_id, split="train", streaming=online)
    except Exception as err:
        if not online:
            raise BarkError(unreachable) from None
        raise BarkError(f"{repo_id}: could not load it from the hub ({type(err).__name__}: {str(err)[:200]})") from None
    yield from _rows_to_lines(rows, text_field, repo_id, "streaming from the hub failed")


# --- cleaning and splitting ----------------------------------------------------------------------

@dataclass
class CleanStats:
    lines_in: int = 0
    empty_or_short: int = 0
    too_long: int = 0
    duplicates: int = 0
    kept: int = 0


class LineCleaner:
    """Strip each line; drop short, over-long and (with dedup) already-seen lines.

    Dedup remembers a 64-bit hash per distinct line, not the line (a collision between two different
    lines is a 1-in-10^19 event per pair; blake2b rather than hash() so runs are reproducible)."""

    def __init__(self, p, stats: CleanStats | None = None):
        self.p, self.stats, self.seen = p, stats if stats is not None else CleanStats(), set()

    def __call__(self, line: str) -> str | None:
        stats, p = self.stats, self.p
        stats.lines_in += 1
        line = line.strip()
        if len(line) < p.min_line_chars:
            stats.empty_or_short += 1
            return None
        if len(line) > p.max_line_chars:
            stats.too_long += 1
            return None
        if p.dedup:
            key = int.from_bytes(hashlib.blake2b(line.encode("utf-8"), digest_size=8).digest(), "little")
            if key in self.seen:
                stats.duplicates += 1
                return None
            self.seen.add(key)
        stats.kept += 1
        return line


def split_lines(lines, total: int, clean, split,
                stats: CleanStats | None = None) -> Iterator[tuple[str, str]]:
    """("train" | "val", cleaned line) in source order, one line at a time.

    `head`: the first (1 - val_fraction) of the `total` *source* lines train, the rest validate
    (cleaned after cutting, so the cut matches "first 90% of lines" exactly; dedup still keeps
    each line's first occurrence in file order). `random`: each kept line validates with
    probability val_fraction, drawn from a generator seeded by split.seed (a stream has no
    length to sample from, so the validation share is val_fraction in expectation)."""
    cleaner = LineCleaner(clean, stats)
    cut = int(total * (1 - split.val_fraction))
    rng = random.Random(split.seed)
    for index, raw in enumerate(lines):
        line = cleaner(raw)
        if line is None:
            continue
        if split.mode == "head":
            yield ("train" if index < cut else "val"), line
        else:
            yield ("val" if rng.random() < split.val_fraction else "train"), line


@dataclass
class Scan:
    lines: int = 0
    nonblank: int = 0
    sha256: str | None = None


def scan(lines, spool=None) -> Scan:
    """Count the source's lines (and hash them); with `spool` (a binary file), copy them there."""
    result, digest = Scan(), hashlib.sha256()
    for line in lines:
        result.lines += 1
        result.nonblank += bool(line.strip())
        data = line.encode("utf-8") + b"\n"
        digest.update(data)
        if spool is not None:
            spool.write(data)
    result.sha256 = digest.hexdigest()
    return result


def ingest(p, train_path: Path, val_path: Path) -> dict:
    """Read, clean, split and write `train_path` and `val_path` (one line of text per line),
    streaming: memory does not grow with the corpus (dedup hashes aside, see the module doc)."""
    source = open_source(p.source, p.text_field, p.hub_timeout_s)
    train_path, val_path = Path(train_path), Path(val_path)
    train_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ingest-", dir=train_path.parent) as scratch:
        if source.plain_text:
            counted = scan(source.lines())
            second_pass = source.lines
        else:  # tables and the hub: one read, spooled as text for the second pass
            spool_path = Path(scratch) / "source.txt"
            with open(spool_path, "wb") as spool:
                counted = scan(source.lines(), spool)
            second_pass = lambda: text_file_lines(spool_path)  # noqa: E731
        if counted.nonblank == 0:
            raise BarkError(f"{source.name}: the corpus is empty (no non-blank lines); check webtext.source")
        stats = CleanStats()
        written = {"train": 0, "val": 0}
        with atomic_path(train_path) as train_tmp, atomic_path(val_path) as val_tmp, \
                open(train_tmp, "w", encoding="utf-8") as train_file, open(val_tmp, "w", encoding="utf-8") as val_file:
            files = {"train": train_file, "val": val_file}
            for split, line in split_lines(second_pass(), counted.lines, p.clean, p.split, stats):
                files[split].write(line + "\n")
                written[split] += 1
            if not written["train"] or not written["val"]:
                raise BarkError(
                    f"{source.name}: after cleaning, the {'training' if not written['train'] else 'validation'} "
                    f"split is empty ({stats.kept} lines kept of {stats.lines_in}); use a larger corpus or "
                    "change webtext.split.val_fraction"
                )
    return {
        "source": source.name, "source_sha256": source.sha256() or counted.sha256,
        "files": [str(f) for f in source.files], "split_mode": p.split.mode, "source_lines": counted.lines,
        "train_lines": written["train"], "val_lines": written["val"],
        "train_bytes": train_path.stat().st_size, "val_bytes": val_path.stat().st_size,
        **{f"clean_{k}": v for k, v in stats.__dict__.items()},
    }
