"""Generation: incremental decoding with a KV cache, and the sampling rules.

`stream` yields one token id at a time for one prompt (servers, the CLI); `generate_batch`
decodes many prompts of equal length together (evaluation samples hundreds at once).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from barkgpt.errors import BarkError
from barkgpt.model import GPT, KVCache


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int = 32
    seed: int | None = None


def sample_next(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,)."""
    logits = logits.float()
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k is not None and s.top_k < logits.size(-1):
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= s.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else torch.seed())
    return gen


def _budget(model: GPT, prompt_len: int, max_new: int) -> int:
    if prompt_len == 0:
        raise BarkError("the prompt is empty; give at least one token, e.g. 'User: speak Assistant:'")
    if prompt_len >= model.cfg.block_size:
        raise BarkError(f"the prompt has {prompt_len} tokens; the model's context is {model.cfg.block_size}")
    return min(max_new, model.cfg.block_size - prompt_len)


@torch.inference_mode()
def stream(model: GPT, prompt_ids: list[int], s: Sampling, eos_id: int | None) -> Iterator[int]:
    """Yield new token ids; stops after <EOS> (which is yielded) or max_new_tokens."""
    steps = _budget(model, len(prompt_ids), s.max_new_tokens)
    gen = _generator(s.seed)
    cache = KVCache(model.cfg, batch=1)
    logits = model(torch.tensor([prompt_ids]), cache=cache, last_only=True)
    for i in range(steps):
        nxt = sample_next(logits[:, -1], s, gen)
        tok = int(nxt)
        yield tok
        if tok == eos_id or i == steps - 1:
            return
        logits = model(nxt.view(1, 1), cache=cache)


@torch.inference_mode()
def generate_batch(model: GPT, prompts: list[list[int]], s: Sampling, eos_id: int | None) -> list[list[int]]:
    """Decode equal-length prompts together; each result ends at its first <EOS> (kept)."""
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("generate_batch needs prompts of equal length")
    steps = _budget(model, len(prompts[0]), s.max_new_tokens)
    gen = _generator(s.seed)
    cache = KVCache(model.cfg, batch=len(prompts))
    logits = model(torch.tensor(prompts), cache=cache, last_only=True)
    out = torch.empty(len(prompts), 0, dtype=torch.long)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for i in range(steps):
        nxt = sample_next(logits[:, -1], s, gen)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= nxt == eos_id
        if bool(done.all()) or i == steps - 1:
            break
        logits = model(nxt[:, None], cache=cache)
    results = []
    for row in out.tolist():
        results.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return results


def generate_text(model: GPT, tokenizer, prompt: str, s: Sampling) -> str:
    """Prompt text -> completion text: the new tokens, without the closing <EOS>."""
    ids = list(stream(model, tokenizer.encode(prompt), s, tokenizer.eos_id))
    return tokenizer.decode([i for i in ids if i != tokenizer.eos_id])
