"""Orchestration overhead: the same bark pipeline run by each door, against plain in-process stage calls.

Doors: the plain CLI (one process per stage, as DVC runs them), `dvc repro`, the Prefect flow
in-process (`python -m flows.pipeline bark`, Prefect's local API) and a Prefect deployment run on an
already-running server + worker (server start-up is not timed: it is paid once, not per run).
Each door runs in a fresh copy of the project with the embedded MLflow store, so the work is equal.
Overhead = door wall time - baseline wall time (all stages called in one Python process).

    python benchmarks/orchestration_overhead.py                 # default params (300 steps)
    python benchmarks/orchestration_overhead.py --steps 30 --doors cli,prefect   # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ITEMS = ("barkgpt", "tasks", "flows", "params.yaml", "dvc.yaml", "prefect.yaml", ".dvc/config", ".dvcignore")
DOORS = ("baseline", "cli", "dvc", "prefect", "deployment")


def make_project(folder: Path, steps: int | None) -> Path:
    folder.mkdir(parents=True)
    for item in ITEMS:
        src, dest = ROOT / item, folder / item
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy(src, dest))
    if steps:
        raw = yaml.safe_load((folder / "params.yaml").read_text())
        raw["bark"]["train"]["max_steps"] = steps
        (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    return folder


def run(cmd: list[str], cwd: Path, env: dict) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return time.perf_counter() - t0


def stop(proc: subprocess.Popen) -> None:
    """Stop a process group this script started: SIGTERM, then SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_health(url: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not become healthy")


BASELINE = """
import sys, time
t0 = time.perf_counter()
from barkgpt.config import load_params
from barkgpt.net import free_port
from barkgpt.pipelines import run_stage
p = load_params("params.yaml")
run_stage(p, "bark", "data"); run_stage(p, "bark", "validate"); run_stage(p, "bark", "tokenize")
run_stage(p, "bark", "train", progress=False); run_stage(p, "bark", "evaluate")
run_stage(p, "bark", "export"); run_stage(p, "bark", "quantize"); run_stage(p, "bark", "parity")
"""


def door(name: str, project: Path, env: dict, deployment: dict | None) -> float:
    py = str(BIN / "python")
    if name == "baseline":
        return run([py, "-c", BASELINE], project, env)
    if name == "cli":
        total = 0.0
        for args in (["data", "bark"], ["validate", "bark"], ["tokenize", "bark"], ["train", "bark", "--quiet"],
                     ["evaluate", "bark"], ["export", "bark"], ["quantize", "bark"], ["parity", "bark"]):
            total += run([str(BIN / "barkgpt"), *args], project, env)
        return total
    if name == "dvc":
        run(["git", "init", "-q"], project, env)
        return run([str(BIN / "dvc"), "repro"], project, env)
    if name == "prefect":
        return run([py, "-m", "flows.pipeline", "bark", "--no-deploy"], project, env)
    if name == "deployment":
        env = {**env, **deployment["env"]}
        run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], project, env)
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "barkgpt-local"], cwd=project,
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        try:
            time.sleep(3)  # the worker is up and polling, as it would be in steady state
            return run([str(BIN / "prefect"), "deployment", "run", "bark-pipeline/local", "--param",
                        "deploy_model=false", "--watch",
                        "--watch-interval", "1"], project, env)
        finally:
            stop(worker)
    raise ValueError(name)


def main() -> None:
    # A SIGTERM (e.g. from `timeout`) must still run the cleanup below and stop the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="bark.train.max_steps (default: params.yaml)")
    parser.add_argument("--doors", default=",".join(DOORS), help=f"comma list of {DOORS}")
    args = parser.parse_args()
    doors = ["baseline"] + [d for d in args.doors.split(",") if d and d != "baseline"]
    tmp = Path(tempfile.mkdtemp(prefix="barkgpt-orch-"))
    base_env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "GX_ANALYTICS_ENABLED": "False",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TQDM_DISABLE": "1",
                "MLFLOW_DISABLE_TELEMETRY": "true"}
    base_env.pop("MLFLOW_TRACKING_URI", None)
    base_env.pop("PREFECT_API_URL", None)
    server, deployment = None, None
    try:
        if "deployment" in doors:
            port = free_port()
            denv = {"PREFECT_HOME": str(tmp / "prefect-server-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
                    "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_UI_ENABLED": "false"}
            server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                       str(port)], env={**base_env, **denv}, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
            t0 = time.perf_counter()
            wait_health(f"http://127.0.0.1:{port}/api/health")
            print(f"prefect server started in {time.perf_counter() - t0:.1f}s (not counted)")
            run([str(BIN / "prefect"), "work-pool", "create", "barkgpt-local", "--type", "process"], tmp,
                {**base_env, **denv})
            deployment = {"env": denv}
        results = {}
        for name in doors:
            project = make_project(tmp / name, args.steps)
            env = {**base_env, "PYTHONPATH": str(project), "PREFECT_HOME": str(project / ".prefect")}
            results[name] = door(name, project, env, deployment)
            print(f"{name:>10}: {results[name]:6.1f}s", flush=True)
        print("\ndoor          wall s   overhead s (vs one-process stage calls)")
        for name, secs in results.items():
            print(f"{name:<12} {secs:7.1f}   {secs - results['baseline']:+7.1f}")
        print(json.dumps({k: round(v, 2) for k, v in results.items()}))
    finally:
        if server is not None:
            stop(server)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
