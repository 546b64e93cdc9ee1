"""Will this training fit in memory? A lower bound, checked before anything is allocated.

params.py bounds each size on its own; their product can still ask for more memory than the
machine has, and torch then fails deep inside an allocation ("DefaultCPUAllocator: can't allocate
memory") or the kernel kills the process. The bound here counts only what training must hold at
once, so a refusal is certain to be right: fp32 weights, gradients and AdamW's two moments
(16 bytes per parameter) plus the logits of one micro-batch and their gradient.
"""
from __future__ import annotations

import os

from barkgpt.errors import BarkError


def parameter_count(model, vocab_size: int) -> int:
    d, L = model.n_embd, model.n_layer
    kv = d * model.kv_heads // model.n_head
    per_block = d * d * 2 + d * kv * 2 + 3 * d * model.hidden_dim + 2 * d  # q, o; k, v; SwiGLU; norms
    head = 0 if model.tie_embeddings else vocab_size * d
    return vocab_size * d + L * per_block + d + head


def training_bytes_lower_bound(model, train, vocab_size: int) -> int:
    logits = train.batch_size * model.block_size * vocab_size * 4 * 2  # fp32 logits and their gradient
    return parameter_count(model, vocab_size) * 16 + logits


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_training_fits(name: str, model, train, vocab_size: int) -> None:
    need, have = training_bytes_lower_bound(model, train, vocab_size), available_bytes()
    if have is None or need <= have:
        return
    gib = 2**30
    raise BarkError(
        f"{name}: training needs at least {need / gib:,.1f} GiB of memory ({parameter_count(model, vocab_size):,} "
        f"parameters x 16 bytes for weights, gradients and AdamW, plus the logits of batch_size "
        f"{train.batch_size} x block_size {model.block_size} x vocabulary {vocab_size}), but {have / gib:,.1f} GiB "
        f"is available; lower {name}.model.n_layer / n_embd / block_size or {name}.train.batch_size in params.yaml")
