"""Validation bits per byte after a wall-clock training budget, on the issue's benchmark split.

Takes a text file (default: ../shared/data/wikitext-2-valid.txt), uses its first 90% of lines for
training and its last 10% for validation (webtext.split.mode: head), trains the default WebText-2
configuration from params.yaml for `--seconds` of wall-clock time and prints the validation bits
per byte over the validation text's UTF-8 bytes. Every step goes through the pipeline's stage
functions, in a scratch project folder.

    python benchmarks/webtext_bpb.py                       # the 300-second benchmark (target <= 2.25)
    python benchmarks/webtext_bpb.py --seconds 30          # a quick check
    python benchmarks/webtext_bpb.py --seconds 60 --no-tracking --set train.device=cuda   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from barkgpt.config import load_params
from barkgpt.params import deep_merge, parse_assignments
from barkgpt.pipelines import run_stage

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "wikitext-2-valid.txt"))
    ap.add_argument("--seconds", type=float, default=300.0, help="wall-clock training budget")
    ap.add_argument("--root", help="project folder to use (default: a temporary one)")
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                    help="override webtext params, e.g. train.learning_rate=0.002 model.n_layer=6")
    ap.add_argument("--no-tracking", dest="tracking", action="store_false",
                    help="no MLflow run (tracking.enabled: false), e.g. on a GPU machine without MLflow installed")
    args = ap.parse_args()

    over = deep_merge({"source": str(Path(args.source).resolve()), "split": {"mode": "head", "val_fraction": 0.1},
                       "train": {"max_seconds": args.seconds}}, parse_assignments(args.set))
    root = Path(args.root or tempfile.mkdtemp(prefix="webtext-bpb-"))
    root.mkdir(parents=True, exist_ok=True)
    raw = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                     {"webtext": over, "tracking": {"enabled": args.tracking}})
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(root / "params.yaml")

    ingest = run_stage(params, "webtext", "ingest", root)
    tok = run_stage(params, "webtext", "tokenizer", root)
    run_stage(params, "webtext", "tokenize", root)
    print(f"train {ingest['train_lines']:,} lines / {ingest['train_bytes']:,} bytes, "
          f"val {ingest['val_lines']:,} lines / {ingest['val_bytes']:,} bytes; "
          f"BPE {tok['vocab_size']}: {tok['val_bytes_per_token']:.3f} bytes/token on val", flush=True)
    start = time.perf_counter()
    summary = run_stage(params, "webtext", "train", root, progress=False, on_log=lambda step, row: print(
        f"step {step}: loss {row['loss']:.3f}, val bpb {row['val_bpb']:.4f}, {row['tokens_per_s']:,.0f} tok/s",
        flush=True) if "val_bpb" in row else None)
    train_s = time.perf_counter() - start
    metrics = run_stage(params, "webtext", "evaluate", root)
    m = params.webtext.model
    print(json.dumps({
        "val_bpb": round(metrics["val_bpb"], 4), "val_perplexity": round(metrics["val_perplexity"], 2),
        "train_seconds": round(train_s, 1), "steps": summary["step"], "tokens": summary["tokens"],
        "tokens_per_s": round(summary["tokens_per_s"]),
        # Where the budget went: training steps, the rest (evaluations, checkpoints) within it, and
        # before its clock started, calibration and compile (train.json's figures).
        "step_seconds": summary.get("step_seconds"), "budget_seconds": round(summary["seconds"], 1),
        "not_training_share_of_budget": round(1 - summary.get("step_seconds", 0) / summary["seconds"], 3),
        "calibration_seconds": summary.get("calibration_seconds"), "compile_seconds": summary.get("compile_seconds"),
        "settings": (summary.get("settings") or {}).get("note"),
        "model": f"{m.n_layer}L {m.n_embd}d {m.n_head}h ctx {m.block_size}", "vocab": metrics["vocab_size"],
        "root": str(root),
    }, indent=2))


if __name__ == "__main__":
    main()
