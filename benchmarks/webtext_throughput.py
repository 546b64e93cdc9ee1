"""Training throughput (tokens/s) of the WebText-2 model on CPU: fp32 or bf16, eager or torch.compile.

The issue's configuration by default: width 256, 4 layers, 4 heads, context 256, batch 16,
vocabulary 4096. Each step is the trainer's own: a batch of random windows, forward and backward
under autocast, gradient clipping, fused AdamW (or Muon, `+muon`). Compilation time is reported
apart and excluded.

    python benchmarks/webtext_throughput.py                 # ~1 minute per mode on an idle machine
    python benchmarks/webtext_throughput.py --steps 5 --modes fp32,bf16   # a quick check
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from barkgpt.data.shards import random_windows
from barkgpt.model import GPT
from barkgpt.params import ModelParams, TrainParams
from barkgpt.train import autocast, make_optimizer, set_threads


def measure(mode: str, args) -> dict:
    cfg = ModelParams(n_layer=args.layers, n_head=args.heads, n_embd=args.width, block_size=args.context)
    p = TrainParams(batch_size=args.batch, dtype="float32" if mode.startswith("fp32") else "bfloat16",
                    compile="+compile" in mode, optimizer="muon" if "+muon" in mode else "adamw",
                    threads=args.threads)
    set_threads(p.threads)
    torch.manual_seed(0)
    model = GPT(cfg, args.vocab)
    optimizer = make_optimizer(model, p)
    step_fn = torch.compile(model) if p.compile else model
    data = np.random.default_rng(0).integers(0, args.vocab, 1_000_000).astype(np.uint16)
    gen = np.random.default_rng(0)

    def step():
        x, y = random_windows(data, p.batch_size, cfg.block_size, gen)
        with autocast(p.dtype):
            _, loss = step_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warm = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    tokens = p.batch_size * cfg.block_size
    times.sort()
    return {"mode": mode, "params": model.num_params(), "warmup_s": warm,
            "tokens_per_s": tokens * len(times) / sum(times), "median_tokens_per_s": tokens / times[len(times) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="fp32,bf16,fp32+compile,bf16+compile",
                    help="comma-separated: fp32 or bf16, optionally +compile and/or +muon")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args()
    set_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; width {args.width}, {args.layers} layers, "
          f"{args.heads} heads, context {args.context}, batch {args.batch}, vocab {args.vocab}")
    for mode in args.modes.split(","):
        r = measure(mode, args)
        print(f"{r['mode']:>13}: {r['tokens_per_s']:>8,.0f} tokens/s (median step {r['median_tokens_per_s']:,.0f}); "
              f"{r['params'] / 1e6:.2f}M params; warm-up {r['warmup_s']:.1f}s", flush=True)


if __name__ == "__main__":
    main()
