#!/usr/bin/env python
"""kill -9 the bark pipeline's doors at random moments, re-run, and check the state each time.

In a throw-away DVC project (a copy of this checkout's tracked files, its own git repository;
tracking off, the default bark settings) with a moto server on loopback standing in for S3 and
Lambda. Each round starts one kill target, kills its whole process group with SIGKILL after a
random delay (within the time the target took uninterrupted), re-runs, and checks the state:

    train, evaluate, export, quantize, parity   `dvc repro -f -s bark-<stage>` (DVC's door: the
                                                stage's command, then DVC's own dvc.lock write)
    deploy                                      `barkgpt deploy bark`
    flow                                        `bark.train.log_every: N` written into
                                                params.yaml, then `python -m flows.pipeline bark`
                                                (N alternates between params.yaml's value and one
                                                less, so every flow round has stages to run, from
                                                training on; not `--set`, which makes the run a
                                                DVC experiment and puts the workspace back)

The re-run after a stage or deploy kill is what a user does: `dvc repro dvc.yaml` (the bark
pipeline's stages; evaluate is not upstream of parity, so `dvc repro bark-parity` is not enough), then
`barkgpt deploy bark` (when a kill left dvc.lock empty, deploy must refuse with the fix it names,
`git checkout -- dvc.lock`, which is then applied: DVC's own lock write is not atomic); after a
flow kill, the same flow again. Then every re-run command must exit 0 and:
  - `dvc status dvc.yaml` is clean, and truthful: every file and folder dvc.lock
    records for the bark stages hashes (md5, folders against DVC's .dir listing) to what it says,
    and every param it records equals params.yaml's;
  - best.pt loads; no `.*.tmp` is left in an output folder;
  - the parity report, re-judged by barkgpt.gates with params.yaml, passes, and the `live` Lambda
    version's manifest names the GGUF parity judged, whose bytes on S3 hash to it.

    python scripts/kill_test.py --kills 20 --seed 0      # one line per round, a table at the end
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
STAGES = ["train", "evaluate", "export", "quantize", "parity"]
TARGETS = [*STAGES, "deploy", "flow"]
OVERRIDES = {"tracking": {"enabled": False}, "deploy": {"bucket": "barkgpt-kill-test", "target": "aws"}}
GIT = ["git", "-c", "user.name=kill-test", "-c", "user.email=kill-test@localhost"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(endpoint: str, root: Path) -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PYTHONPATH": str(root), "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
            "BARKGPT_WARM": "0", "TQDM_DISABLE": "1", "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_DISABLE_TELEMETRY": "true",
            "PREFECT_HOME": str(root / ".prefect-home")}


def copy_checkout(root: Path) -> None:
    """This checkout's tracked and unignored files, as a new git repository (a fresh clone)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for rel in files:
        if (REPO / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    from barkgpt.params import deep_merge

    base = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(deep_merge(base, OVERRIDES), sort_keys=False))
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "kill test project"]):
        subprocess.run(GIT + args, cwd=root, check=True, capture_output=True)


def command(target: str, log_every: int) -> list[str]:
    if target in STAGES:
        return [sys.executable, "-m", "dvc", "repro", "-f", "-s", f"bark-{target}"]
    if target == "deploy":
        return [sys.executable, "-m", "barkgpt", "deploy", "bark"]
    edit_then_flow = ("import sys; from pathlib import Path; from tasks.common import write_overrides; "
                      f"write_overrides(Path('params.yaml'), {{'bark': {{'train': {{'log_every': {log_every}}}}}}}); "
                      "from flows.pipeline import main; sys.exit(main(['bark']))")
    return [sys.executable, "-c", edit_then_flow]


def start(cmd: list[str], root: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=root, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(cmd: list[str], root: Path, env: dict, expect: int = 0) -> tuple[float, str]:
    started = time.perf_counter()
    proc = start(cmd, root, env)
    out, _ = proc.communicate(timeout=1200)
    if proc.returncode != expect:
        raise RuntimeError(f"`{' '.join(cmd[1:])}` exited {proc.returncode} (expected {expect}):\n{out[-3000:]}")
    return time.perf_counter() - started, out


def lock_broken(root: Path) -> str | None:
    from barkgpt.dvclock import read_lock
    from barkgpt.errors import BarkError

    try:
        read_lock(root / "dvc.lock")
    except BarkError as err:
        return str(err)
    return None


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lock_untruths(root: Path) -> list[str]:
    """What dvc.lock says about the bark stages that the files on disk and params.yaml contradict,
    checked by hashing here (not DVC's cached judgement)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    params = yaml.safe_load((root / "params.yaml").read_text())
    cache = root / ".dvc" / "cache" / "files" / "md5"
    problems = []
    for stage, entry in lock["stages"].items():
        if not stage.startswith("bark-"):
            continue
        for item in [*entry.get("deps", []), *entry.get("outs", [])]:
            path, md5 = root / item["path"], item.get("md5", "")
            if md5.endswith(".dir"):
                listing = cache / md5[:2] / md5[2:]
                if not listing.exists():
                    problems.append(f"{stage}: {item['path']}: DVC's listing {md5} is not in the cache")
                    continue
                want = {e["relpath"]: e["md5"] for e in json.loads(listing.read_text())}
                have = {p.relative_to(path).as_posix(): md5_file(p) for p in path.rglob("*") if p.is_file()} \
                    if path.is_dir() else {}
                if want != have:
                    diff = sorted(set(want.items()) ^ set(have.items()))[:3]
                    problems.append(f"{stage}: {item['path']} differs from dvc.lock ({diff})")
            elif not path.is_file() or md5_file(path) != md5:
                problems.append(f"{stage}: {item['path']} differs from dvc.lock")
        for _file, values in (entry.get("params") or {}).items():
            for key, value in values.items():
                node = params
                for part in key.split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                if node != value:
                    problems.append(f"{stage}: param {key} is {node!r} in params.yaml, {value!r} in dvc.lock")
    return problems


def check(root: Path, env: dict) -> list[str]:
    """What is inconsistent now (empty: all good)."""
    import boto3

    from barkgpt.checkpoint import load_model
    from barkgpt.errors import BarkError
    from barkgpt.gates import judge
    from barkgpt.params import load_params

    problems = []
    done = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", "dvc.yaml"], cwd=root,
                          env=env, capture_output=True, text=True)
    if done.returncode != 0 or json.loads(done.stdout or "{}"):
        problems.append(f"dvc status not clean (exit {done.returncode}): {(done.stdout or done.stderr)[:300]}")
    problems += lock_untruths(root)
    try:
        load_model(root / "models/bark/best.pt")
    except BarkError as err:
        problems.append(f"best.pt: {err}")
    leftovers = [str(p.relative_to(root)) for folder in ("exports", "models", "reports") for p in (root / folder).rglob(".*.tmp")]
    if leftovers:
        problems.append(f"leftover temp files: {leftovers}")
    parity = json.loads((root / "reports/bark/parity.json").read_text())
    verdict = judge(parity, load_params(root / "params.yaml"))
    if not verdict.passed:
        problems.append(f"the parity report fails its gate: {verdict.reason()}")
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


def rerun(target: str, root: Path, env: dict, log_every: int, notes: list[str]) -> None:
    """Re-run after a kill as a user would; `notes` gets what the re-run had to do."""
    if target == "flow":
        _, out = run(command("flow", log_every), root, env)
        ran = [m.group(1) for m in re.finditer(r"bark-([a-z-]+): stale \(", out)]
        notes.append(f"flow ran {','.join(ran) or 'no stage'}" + (", restored dvc.lock" if "restored the lock" in out else ""))
        return
    broken = lock_broken(root)
    if broken:  # DVC's own write was cut: every door must refuse, naming the fix, which the user applies
        _, out = run([sys.executable, "-m", "barkgpt", "deploy", "bark"], root, env, expect=2)
        if "git checkout -- dvc.lock" not in out or "Traceback" in out:
            raise RuntimeError(f"deploy over a broken dvc.lock did not name the fix:\n{out[-1500:]}")
        subprocess.run(GIT + ["checkout", "--", "dvc.lock"], cwd=root, check=True, capture_output=True)
        notes.append("dvc.lock left empty by DVC's write: deploy refused (exit 2), restored from git")
    if target != "deploy":
        _, out = run([sys.executable, "-m", "dvc", "repro", "dvc.yaml"], root, env)
        ran = [line.split("'")[1].removeprefix("bark-") for line in out.splitlines() if line.startswith("Running stage")]
        notes.append(f"dvc repro ran {','.join(ran) or 'nothing'}")
    run(command("deploy", log_every), root, env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="prepare the project in this folder (kept), not a temporary one")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    sys.path.insert(0, str(REPO))

    port = free_port()
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="barkgpt-kill-") as tmp:
            root = Path(args.keep or tmp)
            root.mkdir(parents=True, exist_ok=True)
            copy_checkout(root)
            env = environment(f"http://127.0.0.1:{port}", root)
            base_log_every = yaml.safe_load((root / "params.yaml").read_text())["bark"]["train"]["log_every"]
            flips = [base_log_every - 1, base_log_every]
            seconds = {}
            started = time.perf_counter()
            run([sys.executable, "-m", "dvc", "repro", "bark-validate-tokens"], root, env)
            for target in TARGETS:
                seconds[target], _ = run(command(target, flips[0]), root, env)
            flips.reverse()  # the flow ran with flips[0]; the next flow round sets the other value
            problems = check(root, env)
            if problems:
                print("the prepared project is already inconsistent: " + "; ".join(problems), flush=True)
                return 1
            print(f"prepared in {time.perf_counter() - started:.0f} s; uninterrupted: "
                  + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()), flush=True)
            schedule = (TARGETS * math.ceil(args.kills / len(TARGETS)))[:args.kills]
            rng.shuffle(schedule)  # every target killed about equally often, in random order
            for i, target in enumerate(schedule, 1):
                for attempt in range(4):  # a command that ends before its kill is no kill: again, sooner
                    delay = rng.uniform(0.05, seconds[target])
                    log_every = flips[0]
                    begun = time.perf_counter()
                    proc = start(command(target, log_every), root, env)
                    while proc.poll() is None and time.perf_counter() - begun < delay:
                        time.sleep(0.01)
                    finished = proc.poll() is not None
                    if not finished:
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    if target == "flow":
                        flips.reverse()
                    if not finished:
                        break
                    seconds[target] = time.perf_counter() - begun  # the machine is faster now than at first
                    print(f"    {target} finished in {seconds[target]:.1f} s, before its kill at {delay:.2f} s; "
                          "again", flush=True)
                again = time.perf_counter()
                notes: list[str] = []
                try:
                    rerun(target, root, env, log_every, notes)
                    problems = check(root, env)
                except Exception as err:  # a re-run that failed is the finding
                    problems = [" ".join(str(err)[-1500:].split())]
                what = "finished before the kill" if finished else "killed" + (f" (try {attempt + 1})" if attempt else "")
                outcome = "consistent" if not problems else "INCONSISTENT: " + "; ".join(problems)
                rows.append((i, target, delay, what, time.perf_counter() - again, "; ".join(notes), outcome))
                print(f"{i:>2}. {target:<8} {what} at {delay:.2f} s; re-run in {rows[-1][4]:.0f} s "
                      f"({rows[-1][5] or 'no notes'}): {outcome}", flush=True)
    finally:
        moto.terminate()
        moto.wait(10)
    failures = sum(1 for row in rows if row[-1] != "consistent")
    kills = sum(1 for row in rows if row[3].startswith("killed"))
    print("\n| # | killed | at (s) | | re-run (s) | re-run did | state after |\n|---|---|---|---|---|---|---|")
    for i, target, delay, what, took, notes, outcome in rows:
        print(f"| {i} | {target} | {delay:.2f} | {what} | {took:.0f} | {notes} | {outcome} |")
    counts = {t: sum(1 for r in rows if r[1] == t) for t in TARGETS}
    print(f"\n{len(rows)} rounds ({', '.join(f'{t} {n}' for t, n in counts.items())}), {kills} killed mid-run, "
          f"{failures} inconsistent", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
