"""The PyTorch implementation of barkgpt.lm.LM: a BarkGPT checkpoint, decoded with a KV cache.

`generate` yields one token at a time for one prompt (servers, the CLI); `generate_batch` decodes
many prompts together, those of equal length in one batch (evaluation samples a thousand at once).
Everything runs in float32, the precision the model is judged in.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from barkgpt.lm import Sampling, StopFn, log_softmax, model_name, new_tokens_budget
from barkgpt.model import GPT, KVCache


def sample_next(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,), by the rule in barkgpt.lm.Sampling."""
    logits = logits.float()
    if s.greedy:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k is not None and s.top_k < logits.size(-1):
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= s.top_p  # keep the smallest set reaching top_p
        drop[:, 0] = False  # the most likely token always stays (a top_p of 1e-300 is 0 in float32)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=gen).squeeze(-1)


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed % 2**63 if seed is not None else torch.seed())
    return gen


class TorchLM:
    backend = "torch"

    def __init__(self, model: GPT, tokenizer, name: str = "barkgpt"):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.n_ctx = model.cfg.block_size
        self.vocab_size = model.vocab_size

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> "TorchLM":
        from barkgpt.checkpoint import load_model

        if threads:
            torch.set_num_threads(threads)
        model, tok = load_model(Path(path))
        return cls(model, tok, model_name(path))

    def is_end(self, token: int) -> bool:
        return token == self.tokenizer.eos_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> np.ndarray:
        with _float32(self.model):
            return self.model(torch.tensor([list(ids)], device=self.device))[0].float().cpu().numpy()

    @torch.inference_mode()
    def token_losses(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(inputs, np.int64)).to(self.device)
        y = torch.as_tensor(np.asarray(targets, np.int64)).to(self.device)
        with _float32(self.model):  # also mid-training: no dropout, no autocast, then back as it was
            logits = self.model(x)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        return losses.view(y.shape).double().cpu().numpy()

    @torch.inference_mode()
    def generate(self, ids: list[int], s: Sampling, should_stop: StopFn | None = None,
                 scores: list | None = None) -> Iterator[int]:
        steps = new_tokens_budget(len(ids), s.max_new_tokens, self.n_ctx)
        gen = _generator(s.seed)
        cache = KVCache(self.model.cfg, batch=1)
        logits = self.model(torch.tensor([list(ids)]), cache=cache, last_only=True)
        for i in range(steps):
            if scores is not None:
                scores.append(log_softmax(logits[0, -1].float().numpy()))
            token = int(sample_next(logits[:, -1], s, gen))
            yield token
            if self.is_end(token) or i == steps - 1 or (should_stop and should_stop()):
                return
            logits = self.model(torch.tensor([[token]]), cache=cache)

    @torch.inference_mode()
    def embed(self, ids: list[int]) -> np.ndarray:
        """The mean over positions of the last hidden state (after the final norm): llama.cpp's
        mean-pooled embedding of the same model."""
        model = self.model
        with _float32(model):
            hidden = {}
            handle = model.norm.register_forward_hook(lambda m, i, out: hidden.setdefault("x", out))
            try:
                model(torch.tensor([list(ids)], device=self.device), last_only=True)
            finally:
                handle.remove()
        return hidden["x"][0].float().mean(dim=0).cpu().numpy().astype(np.float64)

    def generate_batch(self, prompts: list[list[int]], s: Sampling) -> list[list[int]]:
        """Each result ends at its first end token (kept). Prompts of one length decode together."""
        by_len: dict[int, list[int]] = defaultdict(list)
        for i, ids in enumerate(prompts):
            by_len[len(ids)].append(i)
        out: list[list[int]] = [[] for _ in prompts]
        for g, rows in enumerate(by_len.values()):
            group_seed = None if s.seed is None else s.seed + g
            for i, ids in zip(rows, self._decode_together([prompts[i] for i in rows], replace(s, seed=group_seed))):
                out[i] = ids
        return out

    @torch.inference_mode()
    def _decode_together(self, prompts: list[list[int]], s: Sampling) -> list[list[int]]:
        steps = new_tokens_budget(len(prompts[0]), s.max_new_tokens, self.n_ctx)
        gen = _generator(s.seed)
        cache = KVCache(self.model.cfg, batch=len(prompts))
        logits = self.model(torch.tensor(prompts), cache=cache, last_only=True)
        out = torch.empty(len(prompts), 0, dtype=torch.long)
        done = torch.zeros(len(prompts), dtype=torch.bool)
        eos = self.tokenizer.eos_id
        for i in range(steps):
            nxt = sample_next(logits[:, -1], s, gen)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == eos
            if bool(done.all()) or i == steps - 1:
                break
            logits = self.model(nxt[:, None], cache=cache)
        return [row[: row.index(eos) + 1] if eos in row else row for row in out.tolist()]


class _float32:
    """Judge in float32: eval mode (no dropout) and full-precision matmuls (no TF32 on a GPU that
    trains with it), restored afterwards."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training
        self.precision = torch.get_float32_matmul_precision()

    def __enter__(self):
        self.model.eval()
        torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        torch.set_float32_matmul_precision(self.precision)
