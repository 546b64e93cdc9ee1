"""Bits per byte: one metric function for any model (barkgpt.lm, PyTorch or llama.cpp) and any
batch iterator, used by training's periodic validation, the evaluate stage and parity.

    bpb = (sum over predicted tokens of -ln p(token)) / ln 2 / (UTF-8 bytes those tokens spell)

`eval_windows` predicts every token of a split exactly once: the stream is prefixed with the EOS
(the "previous line ended" context the first line has in training) and cut into non-overlapping
windows of the context length, `batch` rows at a time; the last, shorter window is a batch of its
own. The EOS closing each line counts one byte (the newline it stands for) and a bark word counts
its bytes plus the space after it, so over a whole split the byte count is the size of the text.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np

LN2 = math.log(2)


def eval_windows(ids: np.ndarray, block: int, batch: int, prefix_id: int | None = None,
                 max_batches: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) int64 arrays (rows, <= block) covering the tokens of `ids` in order."""
    stream = np.asarray(ids, dtype=np.int64)
    if prefix_id is not None:
        stream = np.concatenate([[prefix_id], stream])
    starts = range(0, len(stream) - 1, block)
    full = [s for s in starts if s + block < len(stream)]
    groups = [full[i : i + batch] for i in range(0, len(full), batch)]
    if len(full) < len(starts):
        groups.append([starts[-1]])  # the short last window, alone
    for group in groups[:max_batches]:
        rows = np.stack([stream[s : s + block + 1] for s in group])
        yield rows[:, :-1], rows[:, 1:]


def evaluate_bpb(lm, windows: Iterable[tuple[np.ndarray, np.ndarray]], token_bytes=None) -> dict:
    """Sum the model's token losses over `windows`: mean loss (nats per token) and bits per byte
    (None without `token_bytes`, the UTF-8 length of each id)."""
    lengths = None if token_bytes is None else np.asarray(token_bytes, dtype=np.int64)
    nats, tokens, nbytes = 0.0, 0, 0
    for x, y in windows:
        nats += float(lm.token_losses(x, y).sum())
        tokens += int(y.size)
        if lengths is not None:
            nbytes += int(lengths[y].sum())
    if tokens == 0:
        raise ValueError("no tokens to evaluate")
    return {"loss": nats / tokens, "bpb": nats / LN2 / nbytes if nbytes else None,
            "tokens": tokens, "bytes": nbytes}
