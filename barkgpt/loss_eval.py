"""Language-model evaluation in bits per byte: comparable across tokenizers and vocabularies.

    bpb = (sum over predicted tokens of -ln p(token)) / ln 2 / (UTF-8 bytes those tokens spell)

Every token of the validation stream is predicted exactly once: the stream is prefixed with the
EOS (the "previous line ended" context the first line has in training) and cut into
non-overlapping windows of the context length; the last, shorter window is evaluated too.
The EOS closing each line counts one byte, the newline it stands for, so over the whole split
the byte count equals the size of val.txt.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from barkgpt.engine import Sampling, generate_batch
from barkgpt.model import GPT
from barkgpt.train import autocast

LN2 = math.log(2)


def eval_windows(ids: np.ndarray, block: int, prefix_id: int | None):
    """(inputs, targets) 1-row windows of up to `block` tokens covering every token of `ids` once."""
    stream = np.asarray(ids, dtype=np.int64)
    if prefix_id is not None:
        stream = np.concatenate([[prefix_id], stream])
    for start in range(0, len(stream) - 1, block):
        chunk = torch.from_numpy(stream[start : start + block + 1])
        yield chunk[:-1], chunk[1:]


@torch.inference_mode()
def nll_and_bytes(model: GPT, ids: np.ndarray, token_bytes: np.ndarray, batch: int = 16,
                  max_batches: int | None = None, dtype: str = "float32",
                  prefix_id: int | None = None) -> tuple[float, int, int]:
    """(sum of token NLL in nats, tokens predicted, UTF-8 bytes of those tokens)."""
    was_training = model.training
    model.eval()
    token_bytes = torch.as_tensor(np.asarray(token_bytes), dtype=torch.int64)
    block = model.cfg.block_size
    nll, count, nbytes, pending, batches = 0.0, 0, 0, [], 0

    def run(group):
        nonlocal nll, count, nbytes
        x = torch.stack([g[0] for g in group])
        y = torch.stack([g[1] for g in group])
        with autocast(dtype):
            logits = model(x)
        nll += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
        nbytes += int(token_bytes[y].sum())

    for x, y in eval_windows(ids, block, prefix_id):
        if pending and len(pending[0][0]) != len(x):  # the short last window runs on its own
            run(pending)
            pending, batches = [], batches + 1
        pending.append((x, y))
        if len(pending) == batch:
            run(pending)
            pending, batches = [], batches + 1
        if max_batches is not None and batches >= max_batches:
            pending = []
            break
    if pending:
        run(pending)
    model.train(was_training)
    return nll, count, nbytes


def bits_per_byte(nll_nats: float, nbytes: int) -> float:
    return nll_nats / LN2 / nbytes


def evaluate_lm(model: GPT, tok, val_ids: np.ndarray, p, dtype: str = "float32",
                threads: int | None = None) -> tuple[dict, dict]:
    """(metrics, samples) for a text model: bpb, loss, perplexity; completions of fixed prompts."""
    if threads:
        torch.set_num_threads(threads)
    nll, count, nbytes = nll_and_bytes(model, val_ids, np.array(tok.token_bytes()), p.batch_size,
                                       p.max_batches, dtype, prefix_id=tok.eos_id)
    loss = nll / count
    metrics = {
        "val_bpb": bits_per_byte(nll, nbytes),
        "val_loss": loss,
        "val_perplexity": math.exp(loss),
        "val_tokens": count,
        "val_bytes": nbytes,
        "bytes_per_token": nbytes / count,
        "vocab_size": tok.vocab_size,
        "params": model.num_params(),
    }
    s = Sampling(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                 max_new_tokens=p.max_new_tokens, seed=p.seed)
    samples = {}
    for i, prompt in enumerate(p.prompts):
        ids = tok.encode(prompt)[-(model.cfg.block_size - 1):]
        out = generate_batch(model, [ids], Sampling(**{**s.__dict__, "seed": p.seed + i}), tok.eos_id)[0]
        samples[prompt] = tok.decode([t for t in out if t != tok.eos_id])
    return metrics, samples
