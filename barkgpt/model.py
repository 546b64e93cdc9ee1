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


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward, for eager CPU.

    On CPU `F.rms_norm` is a composite of pow, mean, rsqrt and two multiplies, and autograd
    differentiates each: with the dtype casts around it, some 15 passes over the activations per
    norm, 10-15% of a bf16 training step. Here: 3 passes forward (one of them the cast to the
    output dtype, which the next matmul would otherwise do) and 6 backward. Same mathematics, in
    fp32 (or wider) whatever the input's dtype; results equal F.rms_norm's to float rounding.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float, out_dtype: torch.dtype):
        compute = torch.promote_types(x.dtype, torch.float32)
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=compute)  # |x|, one fused reduction
        r = r.square_().div_(x.size(-1)).add_(eps).rsqrt_()  # 1 / rms(x)
        xhat = x * r
        ctx.save_for_backward(xhat, weight, r)
        ctx.x_dtype = x.dtype
        return torch.mul(xhat, weight, out=torch.empty(x.shape, dtype=out_dtype, device=x.device))

    @staticmethod
    def backward(ctx, grad):
        xhat, weight, r = ctx.saved_tensors
        grad = grad.to(xhat.dtype)  # once: a bf16 x fp32 multiply on CPU casts its bf16 operand itself
        prod = grad * xhat
        grad_weight = prod.flatten(0, -2).sum(0).to(weight.dtype)
        dot = (prod @ weight.to(prod.dtype)).unsqueeze(-1)  # sum_i g_i w_i xhat_i, per row
        # d/dx of w * x * r: r * (g w - xhat * mean(g w xhat))
        grad_x = torch.addcmul(grad * weight, xhat, dot.mul_(-1.0 / xhat.size(-1))).mul_(r)
        return grad_x.to(ctx.x_dtype), grad_weight, None, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.device.type != "cpu" or torch.compiler.is_compiling():  # fused kernels / inductor do better
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        # Under autocast the output is already in the autocast dtype, which the next matmul casts it to.
        out_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        return _RMSNormFunction.apply(x, self.weight, self.eps, out_dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), freqs)
    return angles.cos().float(), angles.sin().float()  # (max_len, head_dim/2)


def rope_pairs(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, D/2) tables -> (T, D) tables for `apply_rope`: cos repeated per pair, sin as (-sin, +sin)."""
    return cos.repeat_interleave(2, dim=-1).to(dtype), torch.stack((-sin, sin), dim=-1).flatten(-2).to(dtype)


def _swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x1, x0) for each adjacent pair (x0, x1) of the last dimension: two strided copies, which
    on CPU take half the time of `flip` over a trailing dimension of 2."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    pairs, x_pairs = out.unflatten(-1, (-1, 2)), x.unflatten(-1, (-1, 2))
    pairs[..., 0].copy_(x_pairs[..., 1])
    pairs[..., 1].copy_(x_pairs[..., 0])
    return out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out=None, inverse: bool = False) -> torch.Tensor:
    """x*cos + swap(x)*sin (or, inverse, the rotation back: x*cos - swap(x)*sin) with full-width
    tables; one multiply and one fused multiply-add in the activations' dtype."""
    return torch.addcmul(x * cos, _swap_pairs(x), sin, value=-1 if inverse else 1, out=out)


class _Rotary(torch.autograd.Function):
    """RoPE with its backward written out: a rotation's gradient is the rotation back, so nothing
    but the tables is saved and autograd's multiply/flip/add chain is replaced by one rotation."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, inverse=True), None, None


class _RotaryQKV(torch.autograd.Function):
    """The fused q/k/v projection's output (B, T, q heads + 2 kv heads, D) -> RoPE'd q and k and
    v, each (B, heads, T, D) as views. Its backward writes q's, k's and v's gradients into one
    buffer, instead of autograd's two concatenations (the split of qk from v and of q from k)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_q: int, n_kv: int):
        n = n_q + n_kv
        qk = _rotate(qkv[:, :, :n], cos, sin)
        ctx.save_for_backward(cos, sin)
        ctx.n_q, ctx.n_kv = n_q, n_kv
        q, k = qk.transpose(1, 2).split([n_q, n_kv], dim=1)
        return q, k, qkv[:, :, n:].transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        n_q, n_kv = ctx.n_q, ctx.n_kv
        B, _, T, D = grad_q.shape
        out = grad_q.new_empty(B, T, n_q + 2 * n_kv, D)
        _rotate(grad_q.transpose(1, 2), cos, sin, out=out[:, :, :n_q], inverse=True)
        _rotate(grad_k.transpose(1, 2), cos, sin, out=out[:, :, n_q : n_q + n_kv], inverse=True)
        out[:, :, n_q + n_kv :].copy_(grad_v.transpose(1, 2))
        return out, None, None, None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos).

    x: (..., T, D) with cos/sin (T, D/2) from `rope_tables`, or any layout with full-width tables
    from `rope_pairs` that broadcast to it (the model passes (T, 1, D) for (B, T, heads, D)).
    Written as x*cos + swap(x)*sin: a multiply and a multiply-add in the activations' own dtype
    (bf16 under autocast) instead of an fp32 round trip, which made RoPE a top CPU cost.
    """
    if cos.size(-1) * 2 == x.size(-1):
        cos, sin = rope_pairs(cos, sin, x.dtype)
    if x.device.type != "cpu" or torch.compiler.is_compiling():  # inductor / GPU kernels: plain form
        return x * cos + x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * sin
    return _Rotary.apply(x, cos, sin)


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
        qkv = self.wqkv(x).view(B, T, self.n_head + 2 * self.n_kv, self.head_dim)
        # q and k rotate together in one op, in (B, T, heads, D) layout; cos/sin: (T, 1, D).
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            qk, v = qkv.split([self.n_head + self.n_kv, self.n_kv], dim=2)
            q, k = apply_rope(qk, cos, sin).transpose(1, 2).split([self.n_head, self.n_kv], dim=1)
            v = v.transpose(1, 2)
        else:
            q, k, v = _RotaryQKV.apply(qkv, cos, sin, self.n_head, self.n_kv)
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


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up from the fused (..., 2 * hidden) projection [gate | up]. Its backward writes
    both halves' gradients into one buffer, instead of autograd's concatenation of the two."""

    @staticmethod
    def forward(ctx, h):
        gate, up = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        out = torch.empty_like(h)
        grad_gate, grad_up = out.chunk(2, dim=-1)
        torch.mul(grad, F.silu(gate), out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return out


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 and w3 fused into one matmul."""

    def __init__(self, cfg: ModelParams):
        super().__init__()
        self.hidden = cfg.hidden_dim
        self.w13 = nn.Linear(cfg.n_embd, 2 * self.hidden, bias=False)
        self.w2 = nn.Linear(self.hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        h = self.w13(x)
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            gate, up = h.split(self.hidden, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(_SwiGLU.apply(h))


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
