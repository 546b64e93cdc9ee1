#!/usr/bin/env python
"""kill -9 the bark pipeline's commands at random moments, re-run, and check the state each time.

In a throw-away project (tracking off, the default bark settings) with a moto server on loopback
standing in for S3 and Lambda: each round starts one of train, evaluate, export, quantize, parity
or deploy, kills its whole process group with SIGKILL after a random delay (within the time the
command took uninterrupted), then re-runs the pipeline from that stage through deploy and checks:
every command exits 0; best.pt loads; no `.*.tmp` is left in an output folder; and the `live`
Lambda version's manifest names the deploy GGUF parity judged, whose bytes on S3 hash to it.

    python scripts/kill_test.py --kills 20 --seed 0      # one line per round, a summary at the end
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
ORDER = ["train", "evaluate", "export", "quantize", "parity", "deploy"]
OVERRIDES = {"tracking": {"enabled": False}, "deploy": {"bucket": "barkgpt-kill-test", "target": "aws"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(endpoint: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "BARKGPT_WARM": "0", "TQDM_DISABLE": "1",
            "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def start(stage: str, root: Path, env: dict) -> subprocess.Popen:
    args = [stage, "bark"] + (["--quiet"] if stage == "train" else [])
    return subprocess.Popen([sys.executable, "-m", "barkgpt", *args], cwd=root, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(stage: str, root: Path, env: dict) -> float:
    started = time.perf_counter()
    proc = start(stage, root, env)
    out, _ = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"barkgpt {stage} bark exited {proc.returncode}:\n{out[-3000:]}")
    return time.perf_counter() - started


def check(root: Path, env: dict) -> list[str]:
    """What is inconsistent now (empty: all good)."""
    import boto3

    from barkgpt.checkpoint import load_model
    from barkgpt.errors import BarkError

    problems = []
    try:
        load_model(root / "models/bark/best.pt")
    except BarkError as err:
        problems.append(f"best.pt: {err}")
    leftovers = [str(p.relative_to(root)) for folder in ("exports", "models", "reports") for p in (root / folder).rglob(".*.tmp")]
    if leftovers:
        problems.append(f"leftover temp files: {leftovers}")
    parity = json.loads((root / "reports/bark/parity.json").read_text())
    quant = parity["gate"]["deploy_quantization"]
    judged = parity["judged"][quant]["sha256"]
    session = boto3.session.Session(aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                    aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    lam = session.client("lambda", endpoint_url=env["AWS_ENDPOINT_URL"])
    s3 = session.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    deploy = json.loads((root / "reports/bark/deploy.json").read_text())
    name = deploy["function"]["name"]
    live = lam.get_alias(FunctionName=name, Name="live")["FunctionVersion"]
    uri = lam.get_function_configuration(FunctionName=name, Qualifier=live)["Environment"]["Variables"]["BARKGPT_MANIFEST_URI"]
    bucket, key = uri[5:].split("/", 1)
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    model = manifest["files"]["model"]
    body = s3.get_object(Bucket=bucket, Key=model["key"])["Body"].read()
    if model["sha256"] != judged or hashlib.sha256(body).hexdigest() != judged:
        problems.append(f"live version {live} serves {model['sha256'][:12]}..., parity judged {judged[:12]}...")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="prepare the project in this folder (kept), not a temporary one")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    sys.path.insert(0, str(REPO))
    from barkgpt.params import deep_merge

    port = free_port()
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = environment(f"http://127.0.0.1:{port}")
    failures = 0
    try:
        with tempfile.TemporaryDirectory(prefix="barkgpt-kill-") as tmp:
            root = Path(args.keep or tmp)
            root.mkdir(parents=True, exist_ok=True)
            base = yaml.safe_load((REPO / "params.yaml").read_text())
            (root / "params.yaml").write_text(yaml.safe_dump(deep_merge(base, OVERRIDES)))
            seconds = {}
            for stage in ["data", "tokenize", *ORDER]:
                seconds[stage] = run(stage, root, env)
            print(f"prepared in {sum(seconds.values()):.0f} s: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()),
                  flush=True)
            for i in range(1, args.kills + 1):
                stage = rng.choice(ORDER)
                delay = rng.uniform(0.05, seconds[stage])
                proc = start(stage, root, env)
                time.sleep(delay)
                finished = proc.poll() is not None
                if not finished:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                started = time.perf_counter()
                try:
                    for again in ORDER[ORDER.index(stage):]:
                        run(again, root, env)
                    problems = check(root, env)
                except Exception as err:  # a re-run that failed is the finding
                    problems = [str(err)[-1500:]]
                failures += bool(problems)
                what = "finished before the kill" if finished else f"killed after {delay:.2f} s"
                print(f"{i:>2}. {stage:<8} {what}; re-run from {stage} in {time.perf_counter() - started:.0f} s: "
                      f"{'consistent' if not problems else 'INCONSISTENT: ' + '; '.join(problems)}", flush=True)
    finally:
        moto.terminate()
        moto.wait(10)
    print(f"{args.kills} rounds, {failures} inconsistent", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
