"""Bark model training speed: tokens/s in fp32 and bf16, and the time to 0.99 contract accuracy.

    python benchmarks/bark_train.py [--params params.yaml]

Trains the default bark configuration in a temporary project. Time to accuracy trains fresh
models with growing step budgets (each with its full warm-up + cosine schedule) and reports the
smallest budget whose model reaches the contract-accuracy gate, with its training wall time
(the trainer's clock; MLflow tracking is off in the scratch project).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from barkgpt.config import load_params
from barkgpt.pipelines import run_stage


def project(root: Path, params_file: Path, overrides: dict) -> object:
    from barkgpt.params import deep_merge

    # MLflow off: the figures are the trainer's, not the tracking store's
    raw = deep_merge(yaml.safe_load(params_file.read_text()), deep_merge({"tracking": {"enabled": False}}, overrides))
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return load_params(root / "params.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", type=Path)
    parser.add_argument("--budgets", default="30,50,70,100,150,200,300")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = project(root, args.params, {})
        run_stage(params, "bark", "data", root)
        run_stage(params, "bark", "tokenize", root)

        for dtype in ("float32", "bfloat16"):
            p = project(root, args.params, {"bark": {"train": {"dtype": dtype, "max_steps": 300}}})
            summary = run_stage(p, "bark", "train", root, progress=False)
            results[f"tokens_per_s_{dtype}"] = round(summary["tokens_per_s"])
            print(f"{dtype:>9}: {summary['tokens_per_s']:>10,.0f} tokens/s "
                  f"({summary['step']} steps, {summary['seconds']:.2f}s)")

        for steps in [int(s) for s in args.budgets.split(",")]:
            p = project(root, args.params, {"bark": {"train": {"max_steps": steps}}})
            summary = run_stage(p, "bark", "train", root, progress=False)
            train_s = summary["seconds"]  # the trainer's own clock: steps, evaluation, checkpoints
            metrics = run_stage(p, "bark", "evaluate", root)
            acc = metrics["contract_accuracy"]
            print(f"{steps:>4} steps: train {train_s:5.2f}s, contract accuracy {acc:.3f}")
            if metrics["gate_passed"]:
                results.update(steps_to_gate=steps, seconds_to_gate=round(train_s, 2), accuracy=acc)
                break
        else:
            results["steps_to_gate"] = None
    print(json.dumps(results))


if __name__ == "__main__":
    main()
