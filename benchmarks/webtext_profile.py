"""Where a training step's CPU time goes (torch.profiler), on the throughput configuration.

    python benchmarks/webtext_profile.py [--dtype bfloat16|float32] [--steps 3]
Prints the top operators by self CPU time per step, with their input shapes.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from barkgpt.model import GPT
from barkgpt.params import ModelParams, TrainParams
from barkgpt.train import autocast, make_optimizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    cfg = ModelParams(n_layer=4, n_head=4, n_embd=256, block_size=256)
    torch.manual_seed(0)
    model = GPT(cfg, 4096)
    optimizer = make_optimizer(model, TrainParams())
    x, y = torch.randint(0, 4096, (16, 256)), torch.randint(0, 4096, (16, 256))

    def step():
        with autocast(args.dtype):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(), step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            step()
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / args.steps / 1000
    print(f"{total:.0f} ms of self CPU time per step ({args.dtype})")
    for e in events[: args.rows]:
        ms = e.self_cpu_time_total / args.steps / 1000
        print(f"{ms:8.1f} ms {100 * ms / total:5.1f}%  x{e.count // args.steps:<3d} {e.key[:48]:48s} {str(e.input_shapes)[:90]}")


if __name__ == "__main__":
    main()
