"""Token shards: each split is a run of fixed-size files of raw token ids plus one JSON manifest.

Tokenization streams ids into a `ShardWriter` (memory: one shard); training memory-maps every
shard of a split as one `TokenStream` and samples random windows from it, so there is no padding
and memory stays flat whatever the corpus size. The manifest (`tokens/<split>.json`) names the
files in order with their token counts, the dtype, the vocabulary size and the tokenizer's hash;
`load_tokens` checks all of it before a single step runs.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from barkgpt.errors import BarkError
from barkgpt.fileio import atomic_path, read_json, write_json

SHARD_TOKENS = 2**24  # 32 MiB of uint16 per file: big enough to stream, small enough to rewrite
DTYPES = ("uint16", "uint32")
SCAN_CHUNK = 2**24  # ids checked per numpy call when scanning a shard for out-of-vocabulary ids


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# --- writing ------------------------------------------------------------------------------------

class ShardWriter:
    """Append ids as they are produced; full shards go to disk at once, the manifest last.

    Until `close` writes the manifest the split has none, so a crash mid-way leaves no manifest
    that could describe half-written shards (the trainer then says to re-run the tokenize stage).
    """

    def __init__(self, manifest: Path, shard_path: Callable[[int], Path], vocab_size: int,
                 shard_tokens: int = SHARD_TOKENS):
        self.manifest, self.shard_path, self.vocab_size = Path(manifest), shard_path, vocab_size
        self.dtype = dtype_for(vocab_size)
        self.buffer = np.empty(shard_tokens, dtype=self.dtype)
        self.fill, self.total, self.files = 0, 0, []
        self.manifest.unlink(missing_ok=True)

    @property
    def tokens(self) -> int:
        """Tokens written so far."""
        return self.total + self.fill

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.size and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
            bad = int(ids.max()) if int(ids.max()) >= self.vocab_size else int(ids.min())
            raise BarkError(f"{self.manifest}: token id {bad} is outside the vocabulary (size {self.vocab_size}); "
                            "the tokenizer and its vocabulary disagree, re-run the tokenizer stage")
        while ids.size:
            take = min(ids.size, self.buffer.size - self.fill)
            self.buffer[self.fill : self.fill + take] = ids[:take]
            self.fill += take
            ids = ids[take:]
            if self.fill == self.buffer.size:
                self._flush()

    def _flush(self) -> None:
        path = self.shard_path(len(self.files))
        with atomic_path(path) as tmp:
            self.buffer[: self.fill].tofile(tmp)
        self.files.append({"name": path.name, "tokens": int(self.fill)})
        self.total += self.fill
        self.fill = 0

    def close(self, meta: dict | None = None) -> dict:
        """Write the last (short) shard and the manifest; return the manifest."""
        if self.fill:
            self._flush()
        manifest = {"format": 1, "tokens": int(self.total), "dtype": self.dtype.name,
                    "vocab_size": self.vocab_size, "shard_tokens": int(self.buffer.size),
                    "files": self.files, **(meta or {})}
        write_json(self.manifest, manifest)
        return manifest


def write_tokens(manifest: Path, shard_path: Callable[[int], Path], ids: np.ndarray, vocab_size: int,
                 meta: dict | None = None, shard_tokens: int = SHARD_TOKENS) -> dict:
    """Write ids held in memory as shards (small splits, tests); return the manifest."""
    writer = ShardWriter(manifest, shard_path, vocab_size, shard_tokens)
    writer.write(ids)
    return writer.close(meta)


# --- reading ------------------------------------------------------------------------------------

class TokenStream:
    """A split's shards, memory-mapped, read as one sequence of ids: len() and slices (a slice may
    cross a shard boundary). `np.asarray(stream)` copies the whole split into memory."""

    def __init__(self, parts: list[np.ndarray], names: list[str]):
        self.parts, self.names = parts, names
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.dtype = parts[0].dtype if parts else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def size(self) -> int:
        return len(self)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            i = int(key) + len(self) if key < 0 else int(key)
            if not 0 <= i < len(self):
                raise IndexError(key)
            part = int(np.searchsorted(self.starts, i, side="right")) - 1
            return self.parts[part][i - self.starts[part]]
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("token streams are sliced with step 1")
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        for part in range(first, len(self.parts)):
            lo, hi = self.starts[part], self.starts[part + 1]
            if lo >= stop:
                break
            pieces.append(self.parts[part][max(start, lo) - lo : min(stop, hi) - lo])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows ids[s : s + length] for each start, as int64 (one gather per shard touched)."""
        starts = np.asarray(starts, dtype=np.int64)
        rows = np.empty((len(starts), length), dtype=np.int64)
        parts = np.searchsorted(self.starts, starts, side="right") - 1
        ends = self.starts[parts + 1]
        inside = starts + length <= ends
        for part in np.unique(parts[inside]):
            pick = np.flatnonzero(inside & (parts == part))
            local = starts[pick] - self.starts[part]
            rows[pick] = self.parts[part][local[:, None] + np.arange(length)]
        for i in np.flatnonzero(~inside):  # the rare window that crosses into the next shard
            rows[i] = self[int(starts[i]) : int(starts[i]) + length]
        return rows

    def __array__(self, dtype=None, copy=None):
        whole = self[0 : len(self)]
        return whole.astype(dtype) if dtype is not None else np.array(whole)


def load_tokens(manifest: Path, tokenizer=None, redo: str = "re-run the tokenize stage (dvc repro)",
                check_ids: bool = True) -> tuple[TokenStream, dict]:
    """(the split's ids, its manifest), after checking everything a bad shard could break later:
    the manifest's form, every file's presence and size, the token counts, the tokenizer (its
    vocabulary size and hash, when `tokenizer` is given) and, with `check_ids`, that every id is
    inside the vocabulary. Each problem is a BarkError naming the file and `redo`."""
    from barkgpt.tokenizer import tokenizer_hash

    manifest = Path(manifest)
    spec = read_manifest(manifest, redo)
    dtype = np.dtype(spec["dtype"])
    parts, names = [], []
    for entry in spec["files"]:
        path = manifest.parent / entry["name"]
        if not path.exists():
            raise BarkError(f"{path}: shard listed in {manifest.name} is missing; {redo}")
        size = path.stat().st_size
        if size == 0:
            raise BarkError(f"{path}: shard is empty (0 bytes); {redo}")
        if size % dtype.itemsize:
            raise BarkError(f"{path}: {size} bytes is not a whole number of {dtype.name} tokens "
                            f"({dtype.itemsize} bytes each): the file is truncated or corrupt; {redo}")
        ids = np.memmap(path, dtype=dtype, mode="r")
        if ids.size != entry["tokens"]:
            raise BarkError(f"{path}: holds {ids.size} tokens but {manifest.name} says {entry['tokens']}; "
                            f"the shard is truncated or stale; {redo}")
        parts.append(ids)
        names.append(entry["name"])
    total = sum(len(p) for p in parts)
    if total != spec["tokens"]:
        raise BarkError(f"{manifest}: its files hold {total} tokens but it says {spec['tokens']}; {redo}")
    if total == 0:
        raise BarkError(f"{manifest}: the split has no tokens (is its text file empty?); {redo}")
    vocab_size = spec["vocab_size"]
    if tokenizer is not None:
        if vocab_size != tokenizer.vocab_size:
            raise BarkError(f"{manifest}: encoded for a vocabulary of {vocab_size} but the tokenizer has "
                            f"{tokenizer.vocab_size}; {redo}")
        if spec.get("tokenizer_hash") != tokenizer_hash(tokenizer):
            raise BarkError(f"{manifest}: encoded with another tokenizer (hash {spec.get('tokenizer_hash')}) than "
                            f"the current one (hash {tokenizer_hash(tokenizer)}); {redo}")
    if check_ids:
        for ids, name in zip(parts, names):
            bad = first_out_of_vocab(ids, vocab_size)
            if bad is not None:
                raise BarkError(f"{manifest.parent / name}: token id {int(ids[bad])} at position {bad} is outside "
                                f"the vocabulary (size {vocab_size}): the shard is corrupt; {redo}")
    return TokenStream(parts, names), spec


def read_manifest(manifest: Path, redo: str) -> dict:
    """The manifest as a dict with the keys and types load_tokens relies on, or a BarkError."""
    if not manifest.exists():
        old = manifest.with_suffix(".bin")
        hint = " (this folder holds the older single-file format)" if old.exists() else ""
        raise BarkError(f"{manifest}: token shard manifest not found{hint}; {redo}")
    try:
        spec = read_json(manifest)
    except (ValueError, UnicodeDecodeError) as err:
        raise BarkError(f"{manifest}: not a JSON shard manifest ({type(err).__name__}); {redo}") from None
    required = {"tokens": int, "dtype": str, "vocab_size": int, "files": list}
    missing = [k for k in required if not isinstance(spec, dict) or k not in spec]
    if missing:
        raise BarkError(f"{manifest}: not a token shard manifest (missing {', '.join(missing)}); {redo}")
    wrong = [k for k, t in required.items() if not isinstance(spec[k], t) or isinstance(spec[k], bool)]
    if wrong or spec["dtype"] not in DTYPES or spec["vocab_size"] < 1:
        raise BarkError(f"{manifest}: malformed shard manifest (bad {', '.join(wrong) or 'dtype or vocab_size'}); {redo}")
    for entry in spec["files"]:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") \
                or not isinstance(entry.get("tokens"), int):
            raise BarkError(f"{manifest}: malformed file entry {entry!r} (a file name beside the manifest "
                            f"and its token count); {redo}")
    return spec


def first_out_of_vocab(ids: np.ndarray, vocab_size: int) -> int | None:
    """Position of the first id >= vocab_size, scanning in chunks (bounded memory), else None."""
    for start in range(0, len(ids), SCAN_CHUNK):
        chunk = ids[start : start + SCAN_CHUNK]
        if chunk.size and int(chunk.max()) >= vocab_size:
            return start + int(np.argmax(chunk >= vocab_size))
    return None


# --- windows ------------------------------------------------------------------------------------

def random_windows(ids, batch: int, block: int, rng: np.random.Generator):
    """`batch` random (input, target) windows of `block` tokens, targets shifted by one."""
    import torch  # here, not at the top: tokenizing and validating shards never need torch

    if len(ids) < block + 2:
        raise BarkError(f"only {len(ids)} tokens, fewer than one context window ({block} + 1)")
    starts = rng.integers(0, len(ids) - block - 1, size=batch)
    if isinstance(ids, TokenStream):
        rows = ids.windows(starts, block + 1)
    else:
        rows = np.asarray(ids)[starts[:, None] + np.arange(block + 1)].astype(np.int64)
    chunk = torch.from_numpy(rows)
    return chunk[:, :-1], chunk[:, 1:]


def window_rng(seed: int, step: int, micro: int) -> np.random.Generator:
    """The generator for micro-batch `micro` of optimizer step `step`: a function of the counters
    alone, so a resumed run and any split of micro-batches across processes draw the same windows."""
    return np.random.default_rng((seed, step, micro))
