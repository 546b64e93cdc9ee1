"""One training step of BarkGPT's model against the reference's (reference_gpt.py), paired.

Both models on the reference's configuration (4 layers, width 256, 4 heads, context 256,
batch 16, vocabulary 4096), each step as its trainer runs it: forward under autocast (bf16 by
default), backward, gradient clipping at 1.0, fused AdamW, gradients dropped. The sides alternate
(A, B, A, B, ...) for --rounds rounds of --steps steps each, so a busy machine slows both alike;
the figures are the median tokens/s over rounds of each side, the median of the per-round
ratios, and the ratio of the fastest rounds (with --steps 1: the fastest step of each, the
figure least disturbed by a load that swings within seconds). --baseline REV adds a third side: BarkGPT's model as barkgpt/model.py was at a git
revision (the step before a change, timed in the same rounds). Then torch.profiler's top
operators of BarkGPT's step (--profile-sides barkgpt reference: of both), and with --compile the
compile time and the compiled step as one more side.

    python benchmarks/step_profile.py                      # BarkGPT vs the reference, bf16
    python benchmarks/step_profile.py --baseline HEAD~1    # ... and the model of an earlier commit
    python benchmarks/step_profile.py --compile --rounds 5
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference_gpt as ref  # noqa: E402

from barkgpt import calibrate  # noqa: E402
from barkgpt.device import autocast  # noqa: E402
from barkgpt.model import GPT  # noqa: E402
from barkgpt.optim import make_optimizer  # noqa: E402
from barkgpt.params import ModelParams, TrainParams  # noqa: E402

CFG = ref.RefConfig()
SHAPE = ModelParams(n_layer=CFG.n_layer, n_head=CFG.n_head, n_embd=CFG.n_embd, block_size=CFG.block_size,
                    dropout=0.0)
TOKENS = ref.RefTrain.batch_size * CFG.block_size


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return "unknown"


def model_at(rev: str):
    """barkgpt/model.py's GPT class as it was at git revision `rev`."""
    source = subprocess.run(["git", "show", f"{rev}:barkgpt/model.py"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    path = Path(tempfile.mkdtemp()) / "model_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("model_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GPT


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (ref.RefTrain.batch_size, CFG.block_size), generator=gen)
    return x, torch.randint(0, CFG.vocab_size, x.shape, generator=gen)


def bark_step(dtype: str, gpt_class=GPT, compile_model: bool = False):
    """A closure running one BarkGPT training step, as barkgpt/train.py runs it."""
    torch.manual_seed(0)
    model = gpt_class(SHAPE, CFG.vocab_size)
    model.train()
    fn = torch.compile(model) if compile_model else model
    optimizer = make_optimizer(model, TrainParams(dtype=dtype))
    x, y = batch()

    def step():
        with autocast(dtype):
            _, loss = fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def ref_step(dtype: str):
    torch.manual_seed(0)
    t = ref.RefTrain(dtype=dtype)
    model = ref.RefGPT(CFG)
    model.train()
    optimizer = ref.make_optimizer(model, t)
    x, y = batch()
    return lambda: ref.train_step(model, optimizer, x, y, t)


def timed(step, steps: int) -> float:
    """tokens/s of `steps` consecutive steps."""
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * TOKENS / (time.perf_counter() - t0)


def paired(sides: dict, rounds: int, steps: int) -> dict[str, list[float]]:
    for step in sides.values():  # warm-up: allocations, oneDNN primitives
        step(), step()
    tps = {name: [] for name in sides}
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))  # A B / B A: neither side always first
        for name in order:
            tps[name].append(timed(sides[name], steps))
    return tps


def top_ops(name: str, step, steps: int, rows: int) -> None:
    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / steps / 1000
    print(f"\n{name} step, top operators by self CPU time ({total:.0f} ms per step under the profiler):")
    for e in events[:rows]:
        ms = e.self_cpu_time_total / steps / 1000
        print(f"{ms:8.1f} ms {100 * ms / total:5.1f}%  x{e.count // steps:<3d} {e.key[:46]:46s} "
              f"{str(e.input_shapes)[:80]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3, help="steps per side and round")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--baseline", metavar="REV", help="also time barkgpt/model.py as at this git revision")
    ap.add_argument("--profile-steps", type=int, default=3, help="0: no profile")
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--profile-sides", nargs="+", default=["barkgpt"], choices=["barkgpt", "reference"],
                    help="whose steps to profile")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of BarkGPT's model")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = calibrate.cpu_flags()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"AVX512_BF16 {'yes' if 'avx512_bf16' in flags else 'no'}, AMX {'yes' if 'amx_bf16' in flags else 'no'}")
    print(f"load average at start: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    sides = {"reference": ref_step(args.dtype), "barkgpt": bark_step(args.dtype)}
    if args.baseline:
        sides[f"barkgpt@{args.baseline}"] = bark_step(args.dtype, model_at(args.baseline))
    if args.compile:
        t0 = time.perf_counter()
        compiled = bark_step(args.dtype, compile_model=True)
        compiled(), compiled()  # the first calls compile forward and backward
        print(f"torch.compile: first two steps took {time.perf_counter() - t0:.1f} s")
        sides["barkgpt+compile"] = compiled
    tps = paired(sides, args.rounds, args.steps)
    print(f"load average at end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"\n{args.dtype}, {args.rounds} alternating rounds of {args.steps} steps of {TOKENS} tokens per side")
    for name, values in tps.items():
        print(f"{name:22s} median {statistics.median(values):8,.0f} tok/s   rounds: "
              + ", ".join(f"{v:,.0f}" for v in values))
    for name in tps:
        if name != "reference":
            ratios = [b / a for a, b in zip(tps["reference"], tps[name])]
            print(f"{name} / reference: {statistics.median(ratios):.2f}x (median of per-round ratios; "
                  f"range {min(ratios):.2f}-{max(ratios):.2f}); fastest round: "
                  f"{max(tps[name]) / max(tps['reference']):.2f}x")
    pairs = [("barkgpt", f"barkgpt@{args.baseline}")] if args.baseline else []
    pairs += [("barkgpt+compile", "barkgpt")] if args.compile else []
    for name, base in pairs:
        ratios = [b / a for a, b in zip(tps[base], tps[name])]
        print(f"{name} / {base}: {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}); "
              f"fastest round: {max(tps[name]) / max(tps[base]):.2f}x")
    for name in args.profile_sides if args.profile_steps else []:
        top_ops(name, sides[name], args.profile_steps, args.rows)


if __name__ == "__main__":
    main()
