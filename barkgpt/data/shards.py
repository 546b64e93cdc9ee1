"""Token shards: one flat memmap of token ids per split, with a JSON manifest beside it.

Training samples random windows from the flat stream, so there is no padding and memory stays
constant whatever the corpus size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from barkgpt.errors import BarkError
from barkgpt.fileio import atomic_path, read_json, write_json


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_shard(path: Path, ids: np.ndarray, vocab_size: int, meta: dict) -> dict:
    """Write ids to `path` (raw little-endian) and `path.json` (manifest); return the manifest."""
    path = Path(path)
    dtype = dtype_for(vocab_size)
    ids = np.asarray(ids)
    if ids.size and int(ids.max()) >= vocab_size:
        raise BarkError(f"{path}: token id {int(ids.max())} >= vocab size {vocab_size}")
    with atomic_path(path) as tmp:
        ids.astype(dtype).tofile(tmp)
    manifest = {"tokens": int(ids.size), "dtype": dtype.name, "vocab_size": vocab_size, **meta}
    write_json(manifest_path(path), manifest)
    return manifest


def manifest_path(path: Path) -> Path:
    return Path(str(path) + ".json")


def load_shard(path: Path) -> tuple[np.memmap, dict]:
    path = Path(path)
    if not path.exists() or not manifest_path(path).exists():
        raise BarkError(f"{path}: token shard or its manifest is missing; run the tokenize stage first")
    manifest = read_json(manifest_path(path))
    ids = np.memmap(path, dtype=np.dtype(manifest["dtype"]), mode="r")
    if ids.size != manifest["tokens"]:
        raise BarkError(
            f"{path}: holds {ids.size} tokens but its manifest says {manifest['tokens']}; "
            "the shard is truncated or stale, re-run the tokenize stage"
        )
    return ids, manifest


def random_windows(ids: np.ndarray, batch: int, block: int, gen: torch.Generator):
    """`batch` random (input, target) windows of `block` tokens, targets shifted by one."""
    if len(ids) < block + 2:
        raise BarkError(f"only {len(ids)} tokens, fewer than one context window ({block} + 1)")
    starts = torch.randint(0, len(ids) - block - 1, (batch,), generator=gen).numpy()
    rows = np.stack([ids[s : s + block + 1] for s in starts]).astype(np.int64)
    chunk = torch.from_numpy(rows)
    return chunk[:, :-1], chunk[:, 1:]

