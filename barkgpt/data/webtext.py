"""WebText-2 ingestion: one function reads the hub corpus or any local text, JSONL or parquet
file or folder, cleans it line by line and splits it into train and validation lines.

The hub path (`Raziel1234/WebText-2`, a `corpus.txt` of about 67k lines) goes through Hugging
Face `datasets` with bounded timeouts; with no network it fails fast with a message that says
how to point `webtext.source` at a local file instead. Local `.txt` files are read directly
(no cache copies); `.jsonl`/`.json`/`.parquet` go through `datasets`' builders.
"""
from __future__ import annotations

import os
import random
import re
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from barkgpt.errors import BarkError
from barkgpt.fileio import sha256_bytes, sha256_file, write_text
from barkgpt.params import WebtextCleanParams, WebtextPipeline, WebtextSplitParams

TEXT_SUFFIXES = (".txt", ".md")  # plain text, one text per line
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SUFFIXES = TEXT_SUFFIXES + tuple(TABLE_SUFFIXES)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_HOST = "huggingface.co"


@dataclass
class Corpus:
    lines: list[str]  # raw lines in source order (not yet stripped)
    source: str
    source_sha256: str
    files: list[str] = field(default_factory=list)


# --- reading ------------------------------------------------------------------------------------

def load_corpus(source: str, text_field: str = "text", hub_timeout_s: float = 20.0) -> Corpus:
    """Raw lines from a local file or folder, or from a Hugging Face hub dataset id."""
    path = Path(source).expanduser()
    if path.exists():
        files = _corpus_files(path)
        lines: list[str] = []
        for f in tqdm(files, desc="read", unit="file", disable=len(files) < 4):
            lines += _read_file(f, text_field)
        digest = sha256_file(files[0]) if len(files) == 1 else sha256_bytes(
            "".join(sha256_file(f) for f in files).encode())
        return _nonempty(Corpus(lines, str(path), digest, [str(f) for f in files]))
    if _looks_like_hub_id(source):
        return _nonempty(_load_hub(source, text_field, hub_timeout_s))
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


def _read_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        with open(path, "rb") as f:
            if f.read(4) != b"PAR1":
                raise BarkError(f"{path}: not a parquet file (no PAR1 header); check the file or its suffix")
        return _read_table(path, "parquet", text_field)
    text = _read_utf8(path)
    if suffix in TEXT_SUFFIXES:
        return text.splitlines()
    return _read_table(path, "json", text_field)


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[: 1 << 20]:
        raise BarkError(f"{path}: looks binary (contains NUL bytes), not text; point webtext.source at a text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BarkError(
            f"{path}: not valid UTF-8 (bad byte at offset {err.start}); convert it, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > fixed.txt`"
        ) from None


def _read_table(path: Path, builder: str, text_field: str) -> list[str]:
    _hub_env(20.0, offline=True)  # local files never need the network
    import datasets

    with tempfile.TemporaryDirectory(prefix="barkgpt-ds-") as cache:
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache)
        except Exception as err:  # datasets raises many types for bad files; name the file instead
            raise BarkError(f"{path}: cannot read it as {builder} ({type(err).__name__}: {str(err)[:200]})") from None
        return _column_lines(ds, text_field, str(path))


def _column_lines(ds, text_field: str, where: str) -> list[str]:
    if text_field not in ds.column_names:
        raise BarkError(f"{where}: has no column {text_field!r} (columns: {ds.column_names}); set webtext.text_field")
    lines: list[str] = []
    for text in tqdm(ds[text_field], desc="rows", unit="row", disable=len(ds) < 100_000):
        if isinstance(text, str):
            lines += text.splitlines()
    return lines


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


def _load_hub(repo_id: str, text_field: str, timeout_s: float) -> Corpus:
    online = hub_reachable(timeout_s=min(timeout_s, 5.0))
    # Offline, datasets can still answer from its local cache; it must not try the network.
    _hub_env(timeout_s, offline=not online)
    import datasets

    unreachable = (
        f"{repo_id}: the Hugging Face hub is unreachable ({HUB_HOST}:443 did not answer within "
        f"{min(timeout_s, 5.0):.0f} s) and the dataset is not in the local cache; pass a local file instead: "
        "`dvc repro -S webtext.source=path/to/corpus.txt webtext-evaluate` or set webtext.source in params.yaml"
    )
    try:
        ds = datasets.load_dataset(repo_id, split="train")
    except Exception as err:
        if not online:
            raise BarkError(unreachable) from None
        raise BarkError(f"{repo_id}: could not load it from the hub ({type(err).__name__}: {str(err)[:200]})") from None
    return Corpus(_column_lines(ds, text_field, repo_id), repo_id, sha256_bytes(ds._fingerprint.encode()))


def _nonempty(corpus: Corpus) -> Corpus:
    if not any(line.strip() for line in corpus.lines):
        raise BarkError(f"{corpus.source}: the corpus is empty (no non-blank lines); check webtext.source")
    return corpus


# --- cleaning and splitting ----------------------------------------------------------------------

@dataclass
class CleanStats:
    lines_in: int = 0
    empty_or_short: int = 0
    too_long: int = 0
    duplicates: int = 0
    kept: int = 0


def clean_lines(lines: list[str], p: WebtextCleanParams, seen: set[str] | None = None,
                stats: CleanStats | None = None) -> list[str]:
    """Strip each line; drop short, over-long and (with dedup) already-seen lines. Order kept."""
    seen = set() if seen is None else seen
    stats = stats if stats is not None else CleanStats()
    kept = []
    for line in tqdm(lines, desc="clean", unit="line", disable=len(lines) < 500_000):
        stats.lines_in += 1
        line = line.strip()
        if len(line) < p.min_line_chars:
            stats.empty_or_short += 1
        elif len(line) > p.max_line_chars:
            stats.too_long += 1
        elif p.dedup and line in seen:
            stats.duplicates += 1
        else:
            if p.dedup:
                seen.add(line)
            kept.append(line)
    stats.kept += len(kept)
    return kept


def split_corpus(lines: list[str], clean: WebtextCleanParams, split: WebtextSplitParams) -> tuple[list[str], list[str], CleanStats]:
    """(train, val, stats). `head`: the first (1 - val_fraction) of the *source* lines train, the
    rest validate (cleaned after cutting, so the cut matches "first 90% of lines" exactly;
    dedup still keeps each line's first occurrence in file order). `random`: clean, then a
    seeded choice of lines validates; both splits keep source order."""
    stats = CleanStats()
    if split.mode == "head":
        cut = int(len(lines) * (1 - split.val_fraction))
        seen: set[str] = set()
        train = clean_lines(lines[:cut], clean, seen, stats)
        val = clean_lines(lines[cut:], clean, seen, stats)
    else:
        kept = clean_lines(lines, clean, None, stats)
        n_val = max(1, round(len(kept) * split.val_fraction))
        val_idx = set(random.Random(split.seed).sample(range(len(kept)), min(n_val, len(kept))))
        train = [line for i, line in enumerate(kept) if i not in val_idx]
        val = [line for i, line in enumerate(kept) if i in val_idx]
    return train, val, stats


def ingest(p: WebtextPipeline, train_path: Path, val_path: Path) -> dict:
    """Read, clean, split and write `train_path` and `val_path` (one line of text per line)."""
    corpus = load_corpus(p.source, p.text_field, p.hub_timeout_s)
    train, val, stats = split_corpus(corpus.lines, p.clean, p.split)
    if not train or not val:
        raise BarkError(
            f"{corpus.source}: after cleaning, the {'training' if not train else 'validation'} split is empty "
            f"({stats.kept} lines kept of {stats.lines_in}); use a larger corpus or change webtext.split.val_fraction"
        )
    write_text(train_path, "\n".join(train) + "\n")
    write_text(val_path, "\n".join(val) + "\n")
    return {
        "source": corpus.source, "source_sha256": corpus.source_sha256, "files": corpus.files,
        "split_mode": p.split.mode, "train_lines": len(train), "val_lines": len(val),
        "train_bytes": train_path.stat().st_size, "val_bytes": val_path.stat().st_size,
        **{f"clean_{k}": v for k, v in stats.__dict__.items()},
    }
