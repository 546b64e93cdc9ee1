"""Wall time of a sweep: the same trials one at a time and `--jobs N` at a time.

Each setup runs in its own clone of the repository's HEAD, with the bark data pulled from the DVC
remote (so every setup starts from the same state), and a fresh Optuna study and MLflow store:

    python benchmarks/sweep_wall.py                       # 4-trial bark grid, --jobs 1 then --jobs 2
    python benchmarks/sweep_wall.py --jobs 1 2 --grid bark.train.learning_rate=0.003,0.01 \\
        --grid bark.train.max_steps=20,100

For a WebText-2 sweep (a corpus and a space file of your own; docs/experiments.md):

    python benchmarks/sweep_wall.py --pipeline webtext --space space.yaml --trials 12 --prune both \\
        --set webtext.source=/path/to/corpus.txt

It prints, per setup, the wall time, the trials that completed, were pruned or failed, the best
validation bpb and the pipeline's metric of the best gated trial, with the CPU model. Commit first:
the clones are of HEAD.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vs_reference import cpu_model

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def prepared_clone(dest: Path, pipeline: str, assignments: list[str]) -> Path:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    if assignments:  # e.g. webtext.source: set it as params, committed, as a user would
        import yaml

        from barkgpt.params import deep_merge, parse_assignments

        path = dest / "params.yaml"
        path.write_text(yaml.safe_dump(deep_merge(yaml.safe_load(path.read_text()), parse_assignments(assignments)),
                                       sort_keys=False))
        git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
        subprocess.run(git + ["commit", "-qam", "benchmark params"], cwd=dest, check=True)
    dvc_file = "dvc.yaml" if pipeline == "bark" else f"pipelines/{pipeline}/dvc.yaml"
    if pipeline == "bark":
        subprocess.run([str(BIN / "dvc"), "pull", "-q", dvc_file], cwd=dest, check=True)
    else:  # the data stages once, before the clock starts; every trial then restores them from the cache
        target = f"{dvc_file}:{pipeline}-validate-tokens"
        subprocess.run([str(BIN / "dvc"), "repro", "-q", target], cwd=dest, check=True)
    return dest


def sweep(project: Path, args, jobs: int, prune: bool, study: str) -> dict:
    argv = [str(BIN / "barkgpt"), "sweep", args.pipeline, "--jobs", str(jobs), "--study", study]
    argv += [a for g in args.grid for a in ("--grid", g)]
    if args.space:
        argv += ["--space", str(Path(args.space).resolve()), "--trials", str(args.trials)]
    if not prune:
        argv.append("--no-prune")
    start = time.perf_counter()
    out = subprocess.run(argv, cwd=project, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    summary_file = project / "sweeps" / args.pipeline / study / "summary.json"
    if not summary_file.exists():
        sys.exit(f"the sweep wrote no summary (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    summary = json.loads(summary_file.read_text())
    states = [t["state"] for t in summary["trials"]]
    bpbs = [t["val_bpb"] for t in summary["trials"] if t["val_bpb"] is not None]
    for t in summary["trials"]:
        if t["state"] == "failed":  # why, before the clone is gone
            print(f"jobs {jobs}: trial {t.get('trial')} failed: {t.get('error')}", flush=True)
            log = summary_file.parent / f"trial-{t.get('trial'):03d}.log"
            if log.exists():
                print("\n".join(log.read_text(errors="replace").splitlines()[-40:]), flush=True)
    return {"jobs": jobs, "prune": prune, "seconds": round(seconds, 1), "trials": len(states),
            "complete": states.count("complete"), "pruned": states.count("pruned"), "failed": states.count("failed"),
            "best_val_bpb": min(bpbs) if bpbs else None, "best_gated": summary["best"], "exit": out.returncode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default="bark")
    ap.add_argument("--grid", action="append", default=[])
    ap.add_argument("--space")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prune", choices=["on", "off", "both"], default="on")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params for every setup")
    args = ap.parse_args()
    if not args.grid and not args.space:
        args.grid = ["bark.train.learning_rate=0.003,0.01", "bark.train.max_steps=20,100"]
    prunes = {"on": [True], "off": [False], "both": [False, True]}[args.prune]
    print(f"CPU: {cpu_model()}")
    rows = []
    for jobs in args.jobs:
        for prune in prunes:
            with tempfile.TemporaryDirectory(prefix="barkgpt-sweep-") as scratch:
                project = prepared_clone(Path(scratch) / "project", args.pipeline, args.set)
                row = sweep(project, args, jobs, prune, f"bench-j{jobs}-{'prune' if prune else 'noprune'}")
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    print("\n| jobs | pruning | wall s | trials | complete | pruned | failed | best val bpb |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        bpb = "" if r["best_val_bpb"] is None else f"{r['best_val_bpb']:.4f}"
        print(f"| {r['jobs']} | {'on' if r['prune'] else 'off'} | {r['seconds']} | {r['trials']} | {r['complete']} "
              f"| {r['pruned']} | {r['failed']} | {bpb} |")


if __name__ == "__main__":
    main()
