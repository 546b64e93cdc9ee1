"""Streaming, parallel tokenization: a text file -> token shards, in worker processes.

The file is read in chunks of lines (about 1 MiB of text each); each chunk is encoded in a worker
process (tiktoken and the conversion of its id lists to arrays both hold the GIL, so threads do
not scale and processes do); results are written in file order into a `ShardWriter` as they come.
At most two chunks per worker are in flight, so memory is bounded by the chunk and shard sizes,
never by the file. This module imports no torch: spawned workers start in a fraction of a second.
"""
from __future__ import annotations

import hashlib
import multiprocessing
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from barkgpt.errors import BarkError

CHUNK_BYTES = 1 << 20


@dataclass
class TextStats:
    """What the encoder saw: non-blank lines, their UTF-8 bytes (+1 each: the newline the EOS
    stands for), and the sha256 of the whole file."""

    lines: int = 0
    text_bytes: int = 0
    sha256: str = ""


def line_chunks(path: Path, stats: TextStats, chunk_bytes: int = CHUNK_BYTES) -> Iterator[list[str]]:
    """Non-blank lines of a UTF-8 text file (as `str.splitlines` splits them), in chunks."""
    path = Path(path)
    if not path.exists():
        raise BarkError(f"{path}: not found; run the data stage first (dvc repro)")
    digest = hashlib.sha256()
    chunk, size, offset = [], 0, 0
    with open(path, "rb") as f:
        for raw in f:  # split at b"\n" only; splitlines below splits the rest as str.splitlines does
            digest.update(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise BarkError(f"{path}: not valid UTF-8 at byte {offset + err.start}; regenerate it "
                                "(its data stage) or fix the file") from None
            offset += len(raw)
            for line in text.splitlines():
                if line.strip():
                    chunk.append(line)
                    size += len(line) + 1
                    stats.lines += 1
                    stats.text_bytes += len(line.encode("utf-8")) + 1
            if size >= chunk_bytes:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk
    stats.sha256 = digest.hexdigest()


def encode_chunk(tok, lines: list[str], eos_per_line: bool, threads: int = 1) -> np.ndarray:
    """The chunk's ids in order (each line's ids then, with eos_per_line, the EOS) as uint32."""
    encoded = tok.encode_batch(lines, threads)  # WordTokenizer and BPETokenizer both batch
    flat: list[int] = []
    for ids in encoded:
        flat.extend(ids)
        if eos_per_line:
            flat.append(tok.eos_id)
    return np.array(flat, dtype=np.uint32)


_worker_tokenizer = None


def _start_worker(spec: dict) -> None:
    global _worker_tokenizer
    from barkgpt.tokenizer import tokenizer_from_dict

    _worker_tokenizer = tokenizer_from_dict(spec)


def _encode_in_worker(lines: list[str], eos_per_line: bool) -> np.ndarray:
    return encode_chunk(_worker_tokenizer, lines, eos_per_line)


def encode_file(tok, path: Path, writer, workers: int = 1, eos_per_line: bool = True,
                threads: int = 1) -> TextStats:
    """Encode every non-blank line of `path` into `writer` (a ShardWriter), in file order."""
    stats = TextStats()
    chunks = line_chunks(path, stats)
    if workers <= 1:
        for lines in chunks:
            writer.write(encode_chunk(tok, lines, eos_per_line, threads))
        return stats
    # spawn, not fork: the caller may hold torch's thread pools or MLflow threads, which fork copies badly
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(tok.to_dict(),)) as pool:
        pending = deque()
        for lines in chunks:
            pending.append(pool.submit(_encode_in_worker, lines, eos_per_line))
            if len(pending) >= 2 * workers:
                writer.write(pending.popleft().result())
        while pending:
            writer.write(pending.popleft().result())
    return stats
