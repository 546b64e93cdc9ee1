"""Training throughput and MFU of a GPT-2-124M-sized BarkGPT on one GPU: bf16 autocast, TF32,
fused AdamW, pinned non-blocking batch copies and torch.compile (the trainer's own pieces).

Model: 12 layers, 12 heads, width 768, context 1024, vocabulary 50,304 (GPT-2's 50,257 padded to
a multiple of 64), SwiGLU width 2048, tied embeddings: 124M parameters. Data: random token windows
from a synthetic stream (throughput does not depend on what the tokens say).

MFU = achieved FLOP/s / the GPU's dense bf16 peak, with FLOPs per token = 6 N + 12 L H Q T
(N parameters, L layers, H heads, Q head size, T context: the PaLM appendix B estimate nanoGPT uses).

    python benchmarks/gpu_train.py                     # on a CUDA GPU (H100: target >= 45% MFU)
    python benchmarks/gpu_train.py --no-compile        # eager, for comparison
    python benchmarks/gpu_train.py --batch 64 --compile-mode max-autotune-no-cudagraphs   # autotuned kernels
    python benchmarks/gpu_train.py --tiny --device cpu # a smoke check anywhere: tiny model, 3 steps
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from barkgpt.data.shards import random_windows, window_rng
from barkgpt.device import autocast, prepare, resolve_device, synchronize, to_device
from barkgpt.model import GPT
from barkgpt.params import ModelParams, TrainParams
from barkgpt.train import make_optimizer, set_threads

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "A10": 125.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():  # longer names first where they overlap (H100 PCIe)
        if key in name:
            return value
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    ap.add_argument("--tiny", action="store_true", help="2 layers, width 64, context 64, vocab 512 (smoke check)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 16; tiny: 4)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 30; tiny: 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps, compilation included (default 5; tiny: 1)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--compile-mode", default=None, choices=["default", "max-autotune-no-cudagraphs"],
                    help="torch.compile mode (default: PyTorch's default; autotuning compiles for minutes)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 peak, if not in the table")
    ap.add_argument("--threads", type=int, default=None, help="CPU torch threads")
    args = ap.parse_args()
    if args.tiny:
        cfg, vocab = ModelParams(n_layer=2, n_head=2, n_embd=64, block_size=64), 512
        batch, steps, warmup = args.batch or 4, args.steps or 3, args.warmup if args.warmup is not None else 1
    else:
        cfg, vocab = ModelParams(n_layer=12, n_head=12, n_embd=768, block_size=1024), 50304
        batch, steps, warmup = args.batch or 16, args.steps or 30, args.warmup if args.warmup is not None else 5

    device = resolve_device(args.device)
    p = TrainParams(batch_size=batch, dtype=args.dtype, compile=args.compile, threads=args.threads)
    set_threads(p.threads)
    prepare(device, p.compile)
    torch.manual_seed(0)
    model = GPT(cfg, vocab).to(device)
    optimizer = make_optimizer(model, p)
    step_fn = torch.compile(model, mode=args.compile_mode) if p.compile else model
    data = np.random.default_rng(0).integers(0, vocab, 50_000_000 if not args.tiny else 100_000).astype(np.uint16)
    n_params = model.num_params()
    flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"{name}; torch {torch.__version__}; {n_params / 1e6:.1f}M params; batch {batch} x {cfg.block_size} tokens; "
          f"{args.dtype}{' + compile' if p.compile else ''}", flush=True)

    def step(i: int) -> float:
        x, y = random_windows(data, batch, cfg.block_size, window_rng(0, i, 0))
        with autocast(p.dtype, device.type):
            _, loss = step_fn(to_device(x, device), to_device(y, device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    t = time.perf_counter()
    for i in range(warmup):
        step(i)
    synchronize(device)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(steps):
        loss = step(warmup + i)
    synchronize(device)
    seconds = time.perf_counter() - t
    tokens_per_s = batch * cfg.block_size * steps / seconds
    peak = peak_tflops(device, args.peak_tflops)
    mfu = f"{100 * tokens_per_s * flops_per_token / (peak * 1e12):.1f}% of {peak:g} TFLOP/s bf16" if peak else \
        "n/a (no bf16 peak known for this device; pass --peak-tflops)"
    print(f"warm-up {warm:.1f} s ({warmup} steps); {steps} steps in {seconds:.2f} s; loss {float(loss):.3f}")
    print(f"tokens/s: {tokens_per_s:,.0f}; model FLOP/s: {tokens_per_s * flops_per_token / 1e12:.3g} T; MFU: {mfu}")


if __name__ == "__main__":
    main()
