"""The team stack on loopback, used from two clones standing in for two machines.

One stack per module (PostgreSQL, MLflow server with S3 artifacts, Prefect server, work pool and
worker, moto's S3), started by `barkgpt stack up` in its own port range and stopped by the last
test, which checks that no process of it is left.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from barkgpt.stack.compose import render
from barkgpt.stack.run import Stack, group_alive
from barkgpt.stack.services import DVC_BUCKET, MLFLOW_BUCKET, services
from tests.conftest import ROOT, copy_worktree, run_server

BIN = Path(sys.executable).parent
PORT_RANGE = range(18400, 18496, 4)  # this suite's ports for the stack (4 each)


def sh(cmd: list[str] | str, cwd: Path, env: dict, check: bool = True, timeout: float = 600) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                         shell=isinstance(cmd, str))
    if check:
        assert out.returncode == 0, f"{cmd}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def free_base() -> int:
    for base in PORT_RANGE:
        if all(socket.socket().connect_ex(("127.0.0.1", p)) != 0 for p in range(base, base + 4)):
            return base
    pytest.skip("no free port range for the stack")


def test_compose_file_is_written_from_the_stack_declarations():
    """compose.yaml runs each service's command exactly as `barkgpt stack up` does (one source)."""
    committed = (ROOT / "compose.yaml").read_text()
    assert committed == render(), "run `barkgpt stack compose --write` and commit compose.yaml"
    compose = yaml.safe_load(committed)["services"]
    for service in services():
        assert compose[service.name]["command"][0] == service.command[0]
        assert len(compose[service.name]["command"]) == len(service.command)
    for cli in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cli[0]) and subprocess.run([*cli, "version"], capture_output=True).returncode == 0:
            out = subprocess.run([*cli, "-f", str(ROOT / "compose.yaml"), "config", "-q"], capture_output=True,
                                 text=True, env={**os.environ, "POSTGRES_PASSWORD": "x"}, cwd=ROOT)
            assert out.returncode == 0, out.stderr


def team_block() -> list[str]:
    """docs/team.md's first block, its commands as written (the docs test leaves it to this file)."""
    from tests.test_docs_commands import commands, strip_comment

    lines = [strip_comment(c.text) for c in commands("docs/team.md") if c.block == 0]
    assert lines[0] == "barkgpt stack up" and lines[-1] == "barkgpt stack down", lines
    return lines


@pytest.fixture(scope="module")
def stack():  # about 2 minutes on an idle 2-core machine: PostgreSQL migrations for MLflow and Prefect
    # PostgreSQL runs as the `postgres` user when the tests run as root: a folder it can reach
    state = Path(tempfile.mkdtemp(prefix="barkgpt-stack-", dir="/tmp"))
    state.chmod(0o755)
    base = free_base()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "BARKGPT_STACK_DIR": str(state),
           "BARKGPT_STACK_BASE_PORT": str(base)}  # where docs/team.md's commands put it, without flags
    try:
        out = sh(team_block()[0], ROOT, env)  # `barkgpt stack up`, as written
        assert "prefect-worker  ready" in out and f"127.0.0.1:{base + 2}" in out, out
        yield Stack(state)
    finally:
        Stack(state).down(echo=lambda *_: None)
        shutil.rmtree(state, ignore_errors=True)


def client_env(stack: Stack, project: Path) -> dict:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(project),
            "BARKGPT_WARM": "0", "GX_ANALYTICS_ENABLED": "False", "TQDM_DISABLE": "1",
            "BARKGPT_STACK_DIR": str(stack.state), **stack.status()["env"]}


def s3_object(env: dict, bucket: str, suffix: str) -> bytes:
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    match = [k for k in keys if k.endswith(suffix)]
    assert len(match) == 1, f"{suffix} in s3://{bucket}: {match or keys[:20]}"
    return s3.get_object(Bucket=bucket, Key=match[0])["Body"].read()


@pytest.mark.timeout(1800)  # the stack's start, a whole bark flow through the worker, push, pull, serve
def test_two_machines_share_runs_data_and_models_through_the_stack(stack, tmp_path):
    # Machine A: docs/team.md's block as written, between its `stack up` (the fixture) and its
    # `stack down` (the last test): the bark flow through a Prefect deployment on the stack's
    # worker, then dvc push to the team's S3 remote.
    a = copy_worktree(tmp_path / "a")
    env_a = {k: v for k, v in client_env(stack, a).items() if k not in stack.status()["env"]}  # the block's eval sets them
    run = sh("set -e\n" + "\n".join(team_block()[1:-1]), a, env_a, timeout=1200)
    assert "Completed" in run, run[-3000:]
    run_id = json.loads((a / "models/bark/mlflow_run.json").read_text())["run_id"]
    assert sh(["git", "status", "--porcelain", "dvc.lock"], a, env_a).strip(), "the flow did not record dvc.lock"
    sh("git add -A && git -c user.name=a -c user.email=a@a commit -qm 'bark, trained on A'", a, env_a)
    env_a = client_env(stack, a)

    # Machine B: a clone without the in-repo remote, so every byte comes from S3.
    b = tmp_path / "b"
    sh(["git", "clone", "-q", str(a), str(b)], tmp_path, env_a)
    shutil.rmtree(b / ".dvc-remote")
    env_b = client_env(stack, b)
    sh(["dvc", "remote", "default", "--local", "team"], b, env_b)
    sh(["dvc", "pull", "dvc.yaml"], b, env_b)  # the bark pipeline (the others were never pushed)
    for f in ("data/bark/train.txt", "models/bark/best.pt", "exports/bark/quantized/bark-q8_0.gguf"):
        assert (b / f).read_bytes() == (a / f).read_bytes(), f
    assert "Data and pipelines are up to date" in sh(["dvc", "status", "dvc.yaml"], b, env_b)
    md5 = hashlib.md5((a / "models/bark/best.pt").read_bytes()).hexdigest()
    assert s3_object(env_b, DVC_BUCKET, f"files/md5/{md5[:2]}/{md5[2:]}") == (b / "models/bark/best.pt").read_bytes()

    # A's run, metrics and artifacts through the tracking server; the artifact bytes are S3's.
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    uri = env_b["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)
    got = client.get_run(run_id)
    metrics = json.loads((a / "reports/bark/metrics.json").read_text())
    assert got.data.metrics["eval.contract_accuracy"] == pytest.approx(metrics["contract_accuracy"])
    assert got.data.tags["gate_passed"] == "true"
    local = Path(download_artifacts(run_id=run_id, artifact_path="reports/metrics.json",
                                    dst_path=str(tmp_path / "dl"), tracking_uri=uri))
    assert local.read_bytes() == s3_object(env_b, MLFLOW_BUCKET, f"{run_id}/artifacts/reports/metrics.json")

    # B serves the champion, staged from the registry (the checkpoint A trained, read from S3).
    code = ("import sys; from barkgpt.config import load_params; from barkgpt.deploy.registry import "
            "stage_model_version; root, info = stage_model_version(load_params('params.yaml'), 'bark', '.'); "
            "print(root)")
    staged = Path(sh([sys.executable, "-c", code], b, env_b).strip().splitlines()[-1])
    staged = staged if staged.is_absolute() else b / staged
    assert (staged / "models/bark/best.pt").read_bytes() == (a / "models/bark/best.pt").read_bytes()
    import httpx

    with run_server(["serve", "--model", str(staged / "models/bark/best.pt"), "--backend", "torch"],
                    env={"PYTHONPATH": str(b)}, cwd=b) as url:
        reply = httpx.post(url + "/v1/model/generate", json={"prompt": "User: speak Assistant:"}, timeout=30)
        assert reply.status_code == 200 and reply.json(), reply.text


@pytest.mark.timeout(1800)  # the setup included: the session's trained project and the stack
def test_database_lost_during_training_fails_clearly_and_resumes(stack, bark_copy):
    """PostgreSQL stops under a running training: the stage exits 2 with one message naming the
    tracking server, models/ is untouched and the run folder's checkpoint is whole; with the
    database back, --resume finishes the same MLflow run."""
    from barkgpt.checkpoint import load_checkpoint

    raw = yaml.safe_load((bark_copy / "params.yaml").read_text())
    # a budget in seconds: long enough to stop the database under it on an idle or a loaded machine
    raw["bark"]["train"].update(max_steps=1_000_000, max_seconds=40, log_every=5, checkpoint_every=5,
                                eval_every=50, warmup_steps=5)
    (bark_copy / "params.yaml").write_text(yaml.safe_dump(raw))
    before = (bark_copy / "models/bark/best.pt").read_bytes()
    # MLflow's client retries a failing server for minutes by default; one try shows the failure now
    env = {**client_env(stack, bark_copy), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    train = subprocess.Popen([str(BIN / "barkgpt"), "train", "bark"], cwd=bark_copy, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    old = set((bark_copy / "runs/bark").glob("*")) if (bark_copy / "runs/bark").exists() else set()
    deadline = time.monotonic() + 300
    while not [p for p in (bark_copy / "runs/bark").glob("*/last.pt") if p.parent not in old]:  # under way
        assert train.poll() is None and time.monotonic() < deadline, train.communicate()
        time.sleep(0.05)
    stack.stop_service("postgres")
    out, err = train.communicate(timeout=300)
    assert train.returncode == 2, out + err
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    assert f"MLflow tracking server {env['MLFLOW_TRACKING_URI']}" in err and "--resume" in err, err
    assert (bark_copy / "models/bark/best.pt").read_bytes() == before  # nothing promoted
    (folder,) = set((bark_copy / "runs/bark").iterdir()) - old
    stopped_at = load_checkpoint(folder / "last.pt")["step"]  # whole: its sha256 trailer checks
    assert stopped_at >= 5
    run_id = json.loads((folder / "mlflow_run.json").read_text())["run_id"]

    stack.start_service("postgres")
    sh([str(BIN / "barkgpt"), "train", "bark", "--resume"], bark_copy, env)
    assert (bark_copy / "models/bark/best.pt").read_bytes() != before
    assert json.loads((bark_copy / "models/bark/mlflow_run.json").read_text())["run_id"] == run_id
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert max(steps) > stopped_at, steps  # the same run goes on after the failure


def test_stack_down_leaves_no_process(stack):
    procs = stack.read()["processes"]
    assert set(procs) == {s.name for s in services() if s.loopback and not s.job}
    started = time.monotonic()
    out = sh(team_block()[-1], ROOT, {**os.environ, "BARKGPT_STACK_DIR": str(stack.state)})  # as written
    print(f"stack down: {time.monotonic() - started:.1f} s\n{out}")  # each service's time (pytest -rP)
    assert "prefect-worker: stopped" in out and "postgres: stopped" in out
    assert not [name for name, p in procs.items() if group_alive(p["pid"])]
    # nor anything they spawned in a session of its own: every stack process has the state in its environment
    left = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(stack.state).encode() in (proc / "environ").read_bytes():
                left.append((proc / "cmdline").read_bytes().replace(b"\0", b" ")[:200])
        except OSError:
            pass
    assert not left, left
    assert " ready" not in sh([str(BIN / "barkgpt"), "stack", "status", "--dir", str(stack.state)], ROOT, os.environ)
