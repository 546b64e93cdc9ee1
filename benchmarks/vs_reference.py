"""BarkGPT against a plain nanoGPT-style trainer (reference_gpt.py), back to back, on one machine.

Both sides train on the same text: the first 90% of the lines of --source for training, the last
10% for validation. Two measurements, each a ratio of figures taken in this one run:

1. Training throughput on the reference's own configuration (4 layers, width 256, 4 heads,
   context 256, batch 16, BPE 4096): the reference trainer, in its own fastest dtype on this
   machine (fp32 or bf16 autocast, measured here first, not assumed), and BarkGPT's trainer (with
   its params.yaml training settings: dtype, optimizer, compile, ...; `auto` ones measured by its
   calibration) alternate for --rounds rounds of --throughput-seconds each; steady-state tokens/s
   (after the first steps, so compilation is excluded and reported apart), median over rounds.
2. Quality at a wall-clock budget: the reference (BPE 4096) and BarkGPT's default WebText-2
   configuration (params.yaml, its own tokenizer) each train for --seconds; validation bits per
   byte of the final model over the whole validation split, by the same function
   (barkgpt.loss_eval), in fp32; and how many seconds BarkGPT's training took to first reach the
   reference's final bpb (from the validation bpb its trainer logs every `eval_every` steps).

    python benchmarks/vs_reference.py                     # 300 s per side: ~15 minutes
    python benchmarks/vs_reference.py --seconds 20 --throughput-seconds 10 --rounds 1   # smoke run

Targets (issue 23): tokens/s ratio >= 1.5, bpb ratio <= 0.90. On a shared machine run it more
than once: other processes slow whichever side runs while they do.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference_gpt as ref  # noqa: E402

from barkgpt import calibrate  # noqa: E402
from barkgpt.checkpoint import load_model  # noqa: E402
from barkgpt.config import load_params, parse_params
from barkgpt.layout import Layout  # noqa: E402
from barkgpt.params import deep_merge, parse_assignments  # noqa: E402
from barkgpt.pipelines import run_stage  # noqa: E402
from barkgpt.stages import load_split  # noqa: E402
from barkgpt.tokenizer import load_tokenizer  # noqa: E402

# The reference's configuration, dropout included (it has none; dropout costs BarkGPT 10% of its step).
REF_SHAPE = {"model": {"n_layer": 4, "n_head": 4, "n_kv_head": None, "n_embd": 256, "block_size": 256,
                       "ffn_hidden": None, "dropout": 0.0},
             "train": {"batch_size": 16, "grad_accum": 1}}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def make_project(root: Path, webtext: dict) -> object:
    """A scratch project: the repo's params.yaml with `webtext` overrides and tracking off."""
    root.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = deep_merge(raw, {"webtext": webtext, "tracking": {"enabled": False}})
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return load_params(root / "params.yaml")


def prepare(params, root: Path) -> None:
    for stage in ("ingest", "tokenizer", "tokenize"):
        run_stage(params, "webtext", stage, root)


def split_ids(root: Path, split: str) -> tuple[np.ndarray, object]:
    """(a split's token ids as one array, the tokenizer) of a scratch project."""
    lay = Layout("webtext", root)
    tok = load_tokenizer(lay.tokenizer)
    stream, _ = load_split(lay, split, tok)
    return np.asarray(stream), tok


def final_bpb(model, root: Path) -> float:
    val_ids, tok = split_ids(root, "val")
    return ref.val_bpb(model, val_ids, np.array(tok.token_bytes()), tok.eos_id)


def reference_dtype(root: Path) -> tuple[str, dict[str, float]]:
    """The reference's fastest dtype here: its own training step timed in float32 and in bf16
    autocast, alternating, fastest step of each (barkgpt.calibrate.measure, as BarkGPT's own)."""
    train_ids, tok = split_ids(root, "train")
    cfg = ref.RefConfig(vocab_size=tok.vocab_size)

    def make_step(setting: calibrate.Setting):
        t = ref.RefTrain(dtype=setting.dtype)
        model = ref.RefGPT(cfg)
        optimizer = ref.make_optimizer(model, t)
        x, y = ref.batch(train_ids, t.batch_size, cfg.block_size, torch.Generator().manual_seed(0))
        return lambda: ref.train_step(model, optimizer, x, y, t)

    settings = [calibrate.Setting(d, None) for d in ("float32", "bfloat16")]
    tps = calibrate.measure(settings, make_step, ref.RefTrain.batch_size * cfg.block_size, seconds=1.0, rounds=3)
    by_dtype = {s.dtype: tps[s.label] for s in settings}
    return max(by_dtype, key=by_dtype.get), by_dtype


def reference_throughput(root: Path, seconds: float, dtype: str, skip_steps: int = 3) -> float:
    """Steady-state tokens/s of the reference trainer on the project's shards."""
    train_ids, tok = split_ids(root, "train")
    cfg, t = ref.RefConfig(vocab_size=tok.vocab_size), ref.RefTrain(dtype=dtype)
    torch.manual_seed(t.seed)
    gen = torch.Generator().manual_seed(t.seed)
    model = ref.RefGPT(cfg)
    optimizer = ref.make_optimizer(model, t)
    start, step, t0 = time.perf_counter(), 0, None
    while time.perf_counter() - start < seconds or step <= skip_steps + 1:
        if step == skip_steps:
            t0 = time.perf_counter()
        x, y = ref.batch(train_ids, t.batch_size, cfg.block_size, gen)
        ref.train_step(model, optimizer, x, y, t)
        step += 1
    return (step - skip_steps) * t.batch_size * cfg.block_size / (time.perf_counter() - t0)


def barkgpt_throughput(params, root: Path) -> tuple[float, float, dict]:
    """(steady-state tokens/s, seconds of the first log window, the settings it trained with) of
    BarkGPT's trainer, from the windows of its log (train_log.csv); the first window is left out."""
    import csv

    out = run_stage(params, "webtext", "train", root, progress=False)
    windows, prev = [], 0
    for row in csv.DictReader(Layout("webtext", root).train_log.open()):
        tokens = int(row["tokens"])
        windows.append((tokens - prev, (tokens - prev) / float(row["tokens_per_s"])))
        prev = tokens
    steady = windows[1:] or windows
    return sum(n for n, _ in steady) / sum(s for _, s in steady), windows[0][1], out.get("settings", {})


def seconds_to_reach(train_log: Path, target_bpb: float) -> float | None:
    """Wall-clock seconds into training at which the validation bpb logged during training first
    reached `target_bpb`, interpolated linearly between the two evaluations around it; None if never."""
    import csv

    prev = (0.0, float("inf"))
    for row in csv.DictReader(train_log.open()):
        if not row.get("val_bpb"):
            continue
        now = (float(row["seconds"]), float(row["val_bpb"]))
        if now[1] <= target_bpb:
            if not math.isfinite(prev[1]):
                return now[0]
            return prev[0] + (now[0] - prev[0]) * (prev[1] - target_bpb) / (prev[1] - now[1])
        prev = now
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "wikitext-2-valid.txt"))
    ap.add_argument("--seconds", type=float, default=300.0, help="training budget per side for the bpb ratio")
    ap.add_argument("--throughput-seconds", type=float, default=30.0, help="per side and round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds")
    ap.add_argument("--skip-quality", action="store_true", help="throughput only")
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                    help="override BarkGPT's webtext params, e.g. train.optimizer=muon train.compile=false")
    ap.add_argument("--root", help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()

    work = Path(args.root or tempfile.mkdtemp(prefix="vs-reference-"))
    base = {"source": str(Path(args.source).resolve()), "split": {"mode": "head", "val_fraction": 0.1}}
    mine = parse_assignments(args.set)  # BarkGPT's side only
    flags = calibrate.cpu_flags()
    results = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "load_before": [round(x, 2) for x in os.getloadavg()],
               "cpu_flags": {f: f in flags for f in ("amx_tile", "amx_bf16", "avx512_bf16", "avx512f", "avx2")}}
    print(f"CPU: {results['cpu']} ({results['cores']} cores), torch {torch.__version__}, "
          f"load average {results['load_before']}", flush=True)
    print("CPU flags that decide the matmul kernels: " + ", ".join(
        f"{f.upper()} {'yes' if on else 'no'}" for f, on in results["cpu_flags"].items()), flush=True)

    # The reference's data and shape; BarkGPT's trainer on it with its own training settings.
    ref_root = work / "reference"
    ref_params = make_project(ref_root, deep_merge(base, {
        "tokenizer": {"kind": "bpe", "vocab_size": 4096},
        **deep_merge(deep_merge(mine, REF_SHAPE), {"train": {"max_seconds": args.throughput_seconds, "max_steps": 10**8,
                                           "log_every": 5, "eval_every": 10**9, "checkpoint_every": 10**9}}),
    }))
    prepare(ref_params, ref_root)
    ref_dtype, ref_dtypes = reference_dtype(ref_root)
    results["reference_dtype"] = {"chosen": ref_dtype, "measured_tokens_per_s": {k: round(v) for k, v in ref_dtypes.items()}}
    print(f"reference's fastest dtype here: {ref_dtype} (measured " + ", ".join(
        f"{d} {v:,.0f} tok/s" for d, v in ref_dtypes.items()) + ")", flush=True)
    # One short run first: torch.compile's cold start (or its per-machine cache) is paid here, and
    # reported, so the rounds measure the steady state the 300 s runs spend most of their time in.
    warm_params = parse_params(deep_merge(ref_params.model_dump(), {"webtext": {"train": {"max_steps": 3}}}))
    t0 = time.perf_counter()
    run_stage(warm_params, "webtext", "train", ref_root, progress=False)
    results["barkgpt_warm_up_s"] = round(time.perf_counter() - t0, 1)
    print(f"BarkGPT warm-up (3 steps, compile included): {results['barkgpt_warm_up_s']} s", flush=True)
    ref_tps, bark_tps, warm, settings = [], [], [], {}
    for i in range(args.rounds):
        ref_tps.append(reference_throughput(ref_root, args.throughput_seconds, ref_dtype))
        tps, first_s, settings = barkgpt_throughput(ref_params, ref_root)
        bark_tps.append(tps)
        warm.append(first_s)
        print(f"round {i + 1}: reference {ref_tps[-1]:,.0f} tok/s, BarkGPT {bark_tps[-1]:,.0f} tok/s "
              f"(first {ref_params.webtext.train.log_every} steps took {first_s:.1f} s)", flush=True)
    t = ref_params.webtext.train
    results["throughput"] = {
        "config": "4 layers, width 256, 4 heads, context 256, batch 16, BPE 4096, no dropout",
        "reference_dtype": ref_dtype,
        "barkgpt_settings": {"dtype": settings.get("dtype", t.dtype), "compile": settings.get("compile", t.compile),
                             "threads": settings.get("threads", t.threads), "optimizer": t.optimizer,
                             "how": settings.get("note", "")},
        "reference_tokens_per_s": [round(x) for x in ref_tps],
        "barkgpt_tokens_per_s": [round(x) for x in bark_tps],
        "barkgpt_first_window_s": [round(x, 2) for x in warm],
        "ratio": round(statistics.median(bark_tps) / statistics.median(ref_tps), 3),
    }
    print(f"BarkGPT trained with {results['throughput']['barkgpt_settings']}", flush=True)
    print(f"tokens/s ratio (median over rounds): {results['throughput']['ratio']:.2f}x (target >= 1.5)", flush=True)

    if not args.skip_quality:
        train_ids, tok = split_ids(ref_root, "train")
        model, summary = ref.train(train_ids, args.seconds, ref.RefConfig(vocab_size=tok.vocab_size),
                                   ref.RefTrain(dtype=ref_dtype), log=lambda m: None)
        ref_bpb = final_bpb(model, ref_root)
        print(f"reference: {summary['steps']} steps, {summary['tokens_per_s']:,.0f} tok/s, "
              f"final val bpb {ref_bpb:.4f}", flush=True)

        bark_root = work / "barkgpt"
        bark_params = make_project(bark_root, deep_merge(deep_merge(base, mine), {"train": {"max_seconds": args.seconds}}))
        prepare(bark_params, bark_root)
        out = run_stage(bark_params, "webtext", "train", bark_root, progress=False)
        bark_model, _ = load_model(Layout("webtext", bark_root).last_checkpoint)
        bark_bpb = final_bpb(bark_model, bark_root)
        m, tr = bark_params.webtext.model, bark_params.webtext.train
        print(f"BarkGPT: {out['step']} steps, {out['tokens_per_s']:,.0f} tok/s, final val bpb {bark_bpb:.4f}",
              flush=True)
        results["quality"] = {
            "seconds": args.seconds,
            "reference": {"val_bpb": round(ref_bpb, 4), "steps": summary["steps"],
                          "tokens_per_s": round(summary["tokens_per_s"]), "params": model.num_params()},
            "barkgpt": {"val_bpb": round(bark_bpb, 4), "steps": out["step"], "tokens_per_s": round(out["tokens_per_s"]),
                        "params": bark_model.num_params(),
                        "config": f"{m.n_layer}L {m.n_embd}d {m.n_head}h ctx {m.block_size}, batch "
                                  f"{tr.batch_size}x{tr.grad_accum}, BPE {bark_params.webtext.tokenizer.vocab_size}"},
            "ratio": round(bark_bpb / ref_bpb, 3),
        }
        print(f"bpb ratio at {args.seconds:g} s: {results['quality']['ratio']:.3f} (target <= 0.90)", flush=True)
        # Faster to a given quality: when BarkGPT's training first reached the reference's final bpb.
        reached = seconds_to_reach(Layout("webtext", bark_root).train_log, ref_bpb)
        results["quality"]["barkgpt_seconds_to_reference_bpb"] = None if reached is None else round(reached, 1)
        if reached is not None:
            results["quality"]["time_to_reference_bpb_speedup"] = round(args.seconds / reached, 2)
            print(f"BarkGPT reached the reference's final bpb ({ref_bpb:.4f}) after {reached:.0f} s of its "
                  f"{args.seconds:g}: {args.seconds / reached:.2f}x faster to that quality", flush=True)
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    results["root"] = str(work)
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
