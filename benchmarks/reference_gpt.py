"""A plain nanoGPT-style trainer: the yardstick BarkGPT's training is measured against.

Kept deliberately simple and standard, as in Karpathy's nanoGPT: the GPT-2 block (LayerNorm with
biases, GELU MLP 4x wide, learned absolute positions, tied embeddings, causal
`scaled_dot_product_attention`), AdamW at 1e-3 (betas 0.9/0.95, weight decay 0.1 on matrices,
fused), linear warm-up then cosine decay to 0.1x over the wall-clock budget, gradient clipping at
1.0, bf16 autocast, random windows of the token stream. Nothing here is tuned for BarkGPT's sake.

It trains on the same token shards as BarkGPT and is scored by BarkGPT's own bits-per-byte
function (`barkgpt.loss_eval`), so both sides are measured by one ruler. `vs_reference.py` runs
it and BarkGPT back to back; run alone, it trains on a project's data/webtext shards:

    python benchmarks/reference_gpt.py --root PROJECT --seconds 60
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class RefConfig:
    vocab_size: int = 4096
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0


@dataclass(frozen=True)
class RefTrain:
    batch_size: int = 16
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "bfloat16"
    seed: int = 1337


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class RefGPT(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def make_optimizer(model: RefGPT, t: RefTrain) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=t.learning_rate, betas=(t.beta1, t.beta2), fused=True)


def lr_at(step: int, progress: float, t: RefTrain) -> float:
    if step < t.warmup_steps:
        return t.learning_rate * (step + 1) / t.warmup_steps
    floor = t.learning_rate * t.min_lr_ratio
    return floor + (t.learning_rate - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def batch(ids: np.ndarray, size: int, block: int, gen: torch.Generator):
    starts = torch.randint(0, len(ids) - block - 1, (size,), generator=gen).numpy()
    rows = torch.from_numpy(np.stack([ids[s : s + block + 1] for s in starts]).astype(np.int64))
    return rows[:, :-1], rows[:, 1:]


def train_step(model, optimizer, x, y, t: RefTrain) -> float:
    with autocast(t.dtype):
        _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def train(train_ids: np.ndarray, seconds: float, cfg: RefConfig = RefConfig(), t: RefTrain = RefTrain(),
          log=print) -> tuple[RefGPT, dict]:
    """Train for `seconds` of wall-clock time; (model, {steps, tokens, seconds, tokens_per_s, loss})."""
    torch.manual_seed(t.seed)
    gen = torch.Generator().manual_seed(t.seed)
    model = RefGPT(cfg)
    model.train()
    optimizer = make_optimizer(model, t)
    step, loss, start = 0, float("nan"), time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, elapsed / seconds, t)
        x, y = batch(train_ids, t.batch_size, cfg.block_size, gen)
        loss = train_step(model, optimizer, x, y, t)
        step += 1
        if step % 100 == 0:
            log(f"reference step {step}: loss {loss:.3f}, {step * x.numel() / elapsed:,.0f} tok/s")
    seconds = time.perf_counter() - start
    tokens = step * t.batch_size * cfg.block_size
    return model, {"steps": step, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                   "train_loss": loss}


class RefLM:
    """The reference model as barkgpt.loss_eval sees a model: per-token losses, fp32, eval mode."""

    def __init__(self, model: RefGPT):
        self.model = model

    @torch.inference_mode()
    def token_losses(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        logits = self.model(torch.as_tensor(np.asarray(inputs, np.int64)))
        self.model.train(was_training)
        y = torch.as_tensor(np.asarray(targets, np.int64))
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(y.shape).numpy()


def val_bpb(model: RefGPT, val_ids: np.ndarray, token_bytes: np.ndarray, eos_id: int) -> float:
    """Bits per byte over the whole validation split, by BarkGPT's own function, in fp32."""
    from barkgpt.loss_eval import eval_windows, evaluate_bpb

    windows = eval_windows(val_ids, model.cfg.block_size, 16, eos_id)
    return evaluate_bpb(RefLM(model), windows, token_bytes)["bpb"]


def main() -> None:
    from barkgpt.layout import Layout
    from barkgpt.stages import load_split
    from barkgpt.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".", help="project whose data/webtext token shards to train on")
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lay = Layout("webtext", Path(args.root))
    tok = load_tokenizer(lay.tokenizer)
    train_ids, val_ids = (np.asarray(load_split(lay, split, tok)[0]) for split in ("train", "val"))
    model, summary = train(train_ids, args.seconds, RefConfig(vocab_size=tok.vocab_size))
    summary["val_bpb"] = val_bpb(model, val_ids, np.array(tok.token_bytes()), tok.eos_id)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
