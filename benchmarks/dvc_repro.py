"""`dvc repro` of the bark pipeline from a clean state, with and without the warm server.

Each round clones the repository's HEAD (no data, models or MLflow store: a clean state) and
times `dvc repro` there, in three setups:

    cold       BARKGPT_WARM=0: every stage imports torch, MLflow and Great Expectations itself
    warm       the default, from nothing: the first stage starts the server, the others fork from it
    warm-hot   the default, with a server left running by an earlier `dvc repro` (same setup)

Rounds alternate the setups, so drift on a busy machine hits them alike; medians are printed, with
the CPU model, and what the server costs: its resident and proportional memory (MiB) once the
warm-hot `dvc repro` is done, against the seconds it saves. Each round checks that DVC ran all 9
stages and is clean afterwards.

    python benchmarks/dvc_repro.py              # 3 rounds, about 5 minutes on 2 cores
    python benchmarks/dvc_repro.py --rounds 1
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vs_reference import cpu_model

from barkgpt import warm

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def fresh_clone(dest: Path) -> Path:
    """A clone of this repository's HEAD: commit first to measure your own edits."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True, capture_output=True)
    return dest


def repro(project: Path, env: dict) -> float:
    start = time.perf_counter()
    out = subprocess.run([str(BIN / "dvc"), "repro"], cwd=project, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode != 0 or out.stdout.count("Running stage") != 9:
        sys.exit(f"dvc repro failed in {project}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    status = subprocess.run([str(BIN / "dvc"), "status", "dvc.yaml"], cwd=project, env=env, capture_output=True, text=True)
    if "changed" in status.stdout:
        sys.exit(f"dvc status is not clean after dvc repro in {project}:\n{status.stdout}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    times: dict[str, list[float]] = {"cold": [], "warm": [], "warm-hot": []}
    memory: list[dict] = []  # the server's, after each warm-hot run
    with tempfile.TemporaryDirectory(prefix="repro-") as tmp:
        for r in range(args.rounds):
            runtime = Path(tempfile.mkdtemp(prefix="bw-"))  # a private runtime folder: a server from nothing
            base = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "GX_ANALYTICS_ENABLED": "False",
                    "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "XDG_RUNTIME_DIR": str(runtime)}
            for setup in ("cold", "warm", "warm-hot"):
                project = fresh_clone(Path(tmp) / f"{r}-{setup}")
                # The same PYTHONPATH for both warm setups, so warm-hot finds warm's server.
                env = {**base, "PYTHONPATH": str(Path(tmp) / "code"), "BARKGPT_WARM": "0" if setup == "cold" else "1"}
                if not (Path(tmp) / "code").exists():
                    shutil.copytree(project / "barkgpt", Path(tmp) / "code" / "barkgpt")
                times[setup].append(repro(project, env))
                print(f"round {r + 1} {setup}: {times[setup][-1]:.1f} s", flush=True)
            (server,) = warm.servers(next(runtime.glob("barkgpt-warm-*")))
            memory.append(warm.memory_kib(server["pid"]))
            subprocess.run([sys.executable, "-m", "barkgpt.warm", "stop"], env={**base, "PYTHONPATH": str(ROOT)},
                           capture_output=True)
            shutil.rmtree(runtime, ignore_errors=True)
    print(f"\n{cpu_model()}, {os.cpu_count()} cores; `dvc repro` of the bark pipeline (9 stages) from a clean state, median of {args.rounds}:")
    cold = statistics.median(times["cold"])
    for setup, values in times.items():
        m = statistics.median(values)
        print(f"  {setup:9s} {m:5.1f} s  ({cold / m:.2f}x cold)   runs: {', '.join(f'{v:.1f}' for v in values)}")
    rss, pss = (statistics.median(m.get(k, 0) for m in memory) / 1024 for k in ("rss", "pss"))
    print(f"  the server: {rss:.0f} MiB resident ({pss:.0f} MiB proportional) after a `dvc repro`, median of {len(memory)}; "
          f"it saves {cold - statistics.median(times['warm']):.1f} s per `dvc repro` from nothing, "
          f"{cold - statistics.median(times['warm-hot']):.1f} s while it runs")


if __name__ == "__main__":
    main()
