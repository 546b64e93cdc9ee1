"""A decoder-only transformer in the Llama family, written from scratch.

RMSNorm, rotary positions, SwiGLU, no biases, optional tied embeddings, grouped-query attention
through `scaled_dot_product_attention`. This is the block llama.cpp runs natively, so GGUF export
is a renaming of tensors (plus splitting the fused projections below).

Rotary positions rotate *adjacent* pairs (x[2i], x[2i+1]), Meta's original layout and llama.cpp's
"normal" rope type. Hugging Face's Llama rotates halves instead; its exporter permutes q and k.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from barkgpt.params import ModelParams


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), freqs)
    return angles.cos().float(), angles.sin().float()  # (max_len, head_dim/2)


def rope_pairs(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, D/2) tables -> (T, D) tables for `apply_rope`: cos repeated per pair, sin as (-sin, +sin)."""
    return cos.repeat_interleave(2, dim=-1).to(dtype), torch.stack((-sin, sin), dim=-1).flatten(-2).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos).

    x: (..., T, D) with cos/sin (T, D/2) from `rope_tables`, or any layout with full-width tables
    from `rope_pairs` that broadcast to it (the model passes (T, 1, D) for (B, T, heads, D)).
    Written as x*cos + swap(x)*sin: two multiplies in the activations' own dtype (bf16 under
    autocast) instead of an fp32 round trip, which made RoPE a top CPU cost.
    """
    if cos.size(-1) * 2 == x.size(-1):
        cos, sin = rope_pairs(cos, sin, x.dtype)
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) per pair
    return x * cos + swapped * sin


class KVCache:
    """Preallocated keys and values for incremental decoding; `pos` tokens are filled."""

    def __init__(self, cfg: ModelParams, batch: int, max_len: int | None = None, dtype=torch.float32):
        self.max_len = max_len or cfg.block_size
        shape = (cfg.n_layer, batch, cfg.kv_heads, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        t = k.size(2)
        self.k[layer, :, :, self.pos : self.pos + t] = k
        self.v[layer, :, :, self.pos : self.pos + t] = v
        end = self.pos + t
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelParams, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        # q, k and v in one matmul: one large GEMM is faster than three small ones on CPU.
        self.wqkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None):
        B, T, _ = x.shape
        qk, v = self.wqkv(x).split([(self.n_head + self.n_kv) * self.head_dim, self.n_kv * self.head_dim], dim=-1)
        # q and k rotate together in one op, in (B, T, heads, D) layout; cos/sin: (T, 1, D).
        qk = apply_rope(qk.view(B, T, self.n_head + self.n_kv, self.head_dim), cos, sin)
        q, k = qk.transpose(1, 2).split([self.n_head, self.n_kv], dim=1)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        mask, causal = None, True
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer, k, v)
            if start > 0:  # queries at positions start..start+T-1 see keys 0..start+T-1
                causal = False
                if T > 1:
                    mask = torch.ones(T, start + T, dtype=torch.bool).tril(diagonal=start)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and T > 1, enable_gqa=self.n_kv != self.n_head
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 and w3 fused into one matmul."""

    def __init__(self, cfg: ModelParams):
        super().__init__()
        self.hidden = cfg.hidden_dim
        self.w13 = nn.Linear(cfg.n_embd, 2 * self.hidden, bias=False)
        self.w2 = nn.Linear(self.hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).split(self.hidden, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelParams, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, cache):
        # Dropout on each residual branch regularises small corpora; a no-op at inference.
        drop = (lambda y: F.dropout(y, self.dropout)) if self.training and self.dropout > 0 else (lambda y: y)
        x = x + drop(self.attn(self.attn_norm(x), cos, sin, cache))
        return x + drop(self.ffn(self.ffn_norm(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelParams, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.tok_emb = nn.Embedding(vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, cache: KVCache | None = None, last_only: bool = False):
        """Logits (B, T, V), or (B, 1, V) with last_only; with targets, (logits, mean loss)."""
        T = idx.size(1)
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.cfg.block_size}")
        # RoPE tables in the activations' dtype: bf16 under autocast (CPU or CUDA), else the weights'.
        device = idx.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.tok_emb.weight.dtype
        cos, sin = rope_pairs(self.rope_cos[start : start + T], self.rope_sin[start : start + T], dtype)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        x = self.tok_emb(idx)
        for block in self.blocks:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss
