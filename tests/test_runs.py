"""Training safety: runs in their own folders, promotion only of finite results, one writer at a
time, and single-file checkpoints that survive kill -9 at any moment (barkgpt/runs.py)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from barkgpt.checkpoint import load_checkpoint, save_checkpoint, model_from_checkpoint
from barkgpt.config import load_params
from barkgpt.errors import BarkError
from barkgpt.layout import layout
from barkgpt.pipelines import run_stage
from barkgpt.runs import TrainingDiverged, latest_interrupted, open_run, writer_lock

from conftest import ROOT, make_project

TINY = {"bark": {"data": {"train_conversations": 200, "val_conversations": 40},
                 "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16},
                 "train": {"max_steps": 40, "batch_size": 4, "warmup_steps": 2, "threads": 1,
                           "checkpoint_every": 1, "eval_every": 5, "log_every": 5, "eval_batches": 2}},
        "tracking": {"enabled": False}}


def cli(*args, cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "barkgpt", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def snapshot(*folders: Path) -> dict[str, str]:
    """sha256 of every file under `folders`: what "changes nothing" is checked against."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A project with the tiny model's data and token shards (not trained)."""
    root = make_project(tmp_path_factory.mktemp("tiny"), TINY)
    params = load_params(root / "params.yaml")
    run_stage(params, "bark", "data", root)
    run_stage(params, "bark", "tokenize", root)
    return root


@pytest.fixture
def tiny(tiny_data, tmp_path) -> Path:
    dest = tmp_path / "project"
    shutil.copytree(tiny_data, dest)
    return dest


def test_checkpoint_is_one_file_and_refuses_garbage(tiny, tmp_path):
    params = load_params(tiny / "params.yaml", {"bark": {"train": {"max_steps": 5}}})
    run_stage(params, "bark", "train", tiny, progress=False)
    models = tiny / "models/bark"
    assert sorted(p.name for p in models.iterdir()) == ["best.pt", "last.pt"]  # no checksum side files
    model, tok = model_from_checkpoint(load_checkpoint(models / "best.pt"))
    bad = tmp_path / "bad.pt"
    for content in (b"", b"[]", b"\x00" * 500, (models / "best.pt").read_bytes()[:-1]):
        bad.write_bytes(content)
        with pytest.raises(BarkError, match="checksum mismatch.*truncated or was modified"):
            load_checkpoint(bad)
    save_checkpoint(bad, model=model, tokenizer=tok, params={}, step=1)  # inference-only: no optimizer
    shutil.copy(bad, tiny / "models/bark/last.pt")
    with pytest.raises(BarkError, match="holds no training state"):
        run_stage(params, "bark", "train", tiny, resume=True, progress=False)


def test_infinite_learning_rate_stops_with_a_clear_error(bark_copy):
    before = snapshot(bark_copy / "models", bark_copy / "reports")
    raw = yaml.safe_load((bark_copy / "params.yaml").read_text())
    raw["bark"]["train"]["learning_rate"] = float("inf")  # written as `.inf`, as a user would
    (bark_copy / "params.yaml").write_text(yaml.safe_dump(raw))
    assert "learning_rate: .inf" in (bark_copy / "params.yaml").read_text()
    proc = cli("train", "bark", "--quiet", cwd=bark_copy)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert "bark.train.learning_rate: Input should be a finite number" in err and "Traceback" not in err
    assert snapshot(bark_copy / "models", bark_copy / "reports") == before  # best.pt byte-identical


def test_nan_mid_training_changes_nothing(bark_copy):
    """A learning rate that makes the loss NaN after a few finite steps: the run stops at once, and
    the model, its MLflow run record and the training reports stay byte-identical."""
    import mlflow

    before = snapshot(bark_copy / "models", bark_copy / "reports")
    old_run = (bark_copy / "models/bark/mlflow_run.json").read_text()
    params = load_params(bark_copy / "params.yaml", {"bark": {"train": {"learning_rate": 1000.0, "max_steps": 60,
                                                                         "warmup_steps": 10}}})
    with pytest.raises(TrainingDiverged) as err:
        run_stage(params, "bark", "train", bark_copy, progress=False)
    message = str(err.value)
    assert "training diverged at step" in message and "train loss is nan" in message
    assert "nothing was promoted" in message and "best.pt" in message
    step = int(message.split("at step ")[1].split(":")[0])
    assert 1 < step < 60  # finite steps first, then NaN mid-training, then an early stop
    assert snapshot(bark_copy / "models", bark_copy / "reports") == before
    assert (bark_copy / "models/bark/mlflow_run.json").read_text() == old_run
    failed = latest_run_folder(bark_copy)
    assert failed.status()["status"] == "diverged"
    assert latest_interrupted(layout("bark", bark_copy)) is None  # a diverged run is never resumed
    client = mlflow.MlflowClient(f"sqlite:///{bark_copy / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("barkgpt").experiment_id],
                              order_by=["attributes.start_time DESC"], max_results=1)
    assert runs[0].info.status == "FAILED" and runs[0].info.run_id not in old_run


def latest_run_folder(root: Path):
    from barkgpt.runs import RunFolder

    folders = [RunFolder(p) for p in layout("bark", root).runs.iterdir() if p.is_dir()]
    return max(folders, key=lambda f: f.status().get("started", ""))


def test_second_writer_gets_a_clear_lock_error(tiny):
    """Held in this process: the stage's own attempt is refused, naming who holds it."""
    params = load_params(tiny / "params.yaml")
    with writer_lock(layout("bark", tiny), "train bark"):
        with pytest.raises(BarkError, match=rf"another process is writing the bark pipeline.*pid {os.getpid()}.*since"):
            run_stage(params, "bark", "train", tiny, progress=False)
    assert not (tiny / "models").exists()


def test_two_trainings_started_at_once(tiny):
    raw = yaml.safe_load((tiny / "params.yaml").read_text())
    raw["bark"]["train"].update({"max_steps": 100000, "max_seconds": 6, "checkpoint_every": 50})
    (tiny / "params.yaml").write_text(yaml.safe_dump(raw))
    procs = [cli("train", "bark", "--quiet", cwd=tiny) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = next(i for i, p in enumerate(procs) if p.returncode == 2)
    winner = procs[1 - loser]
    err = outs[loser][1]
    assert f"pid {winner.pid}" in err and "barkgpt train bark" in err and "since" in err, err
    assert "Traceback" not in err
    assert load_checkpoint(tiny / "models/bark/best.pt")["step"] > 0  # the winner's model, promoted


# Forks trainings on request, so each killed training starts in milliseconds instead of paying the
# imports of torch and torch._dynamo again; no parallel torch op runs before a fork (fork-safe).
ZYGOTE = """
import os, sys, traceback
import torch
from barkgpt.config import load_params
from barkgpt.pipelines import run_stage
torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # imports torch._dynamo (seconds) once, here
root = sys.argv[1]
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        os.dup2(2, 1)  # the child's prints must not mix with the protocol on stdout
        try:
            run_stage(load_params(os.path.join(root, "params.yaml")), "bark", "train", root, resume=True,
                      progress=False)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(3)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def test_kill_9_at_random_moments_then_resume_is_bit_identical(tiny_data, tmp_path):
    """checkpoint_every 1; kill -9 a dozen times at random moments (mid-step, mid-checkpoint,
    mid-promotion); every resume works; the final weights equal an uninterrupted run's."""
    # Enough steps that a dozen kills, each after 1-3 checkpoints plus up to 30 ms, all land before
    # the end, however fast this machine's steps are.
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for project in (straight, killed):
        shutil.copytree(tiny_data, project)
        raw = yaml.safe_load((project / "params.yaml").read_text())
        raw["bark"]["train"]["max_steps"] = 400
        (project / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(straight / "params.yaml")
    run_stage(params, "bark", "train", straight, progress=False)

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "trainings.log", "w")
    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(killed)], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=log, text=True)

    def training() -> int:
        zygote.stdin.write("go\n")
        zygote.stdin.flush()
        return int(zygote.stdout.readline())

    rng = random.Random(0)
    max_steps = params.bark.train.max_steps
    kills = 0
    try:
        for _ in range(12):
            before = checkpoint_versions(killed)
            pid = training()
            wait_for_checkpoints(killed, before, rng.randint(1, 3))  # progress first, then a random moment:
            time.sleep(rng.uniform(0, 0.03))  # inside a step, a checkpoint write or the promotion
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            code = int(zygote.stdout.readline())
            assert code in (0, -signal.SIGKILL), (tmp_path / "trainings.log").read_text()  # resuming never failed
            kills += code == -signal.SIGKILL and not (killed / "models/bark/last.pt").exists()
        assert kills >= 10  # each one interrupted an unfinished training
        training()
        assert int(zygote.stdout.readline()) == 0, (tmp_path / "trainings.log").read_text()  # runs to the end
    finally:
        zygote.stdin.close()
        zygote.wait(30)
        log.close()
    assert not list((killed / "models/bark").glob(".*"))  # no temp file of a killed write in the output
    a, b = load_checkpoint(straight / "models/bark/last.pt"), load_checkpoint(killed / "models/bark/last.pt")
    assert a["step"] == b["step"] == max_steps
    assert_same(a["optimizer"], b["optimizer"])  # moments and step counts too, whatever the optimizer
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(straight / "models/bark" / name), load_checkpoint(killed / "models/bark" / name)
        assert a["step"] == b["step"]
        for key, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][key]), (name, key)


def assert_same(a, b, where: str = "optimizer") -> None:
    """Nested dicts/lists of tensors and numbers, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def checkpoint_versions(root: Path) -> set:
    """Every run's last.pt as (run, inode, change time): each atomic rename is a new version."""
    out = set()
    for ckpt in (root / "runs/bark").glob("*/last.pt"):
        try:
            st = ckpt.stat()
            out.add((ckpt.parent.name, st.st_ino, st.st_ctime_ns))
        except FileNotFoundError:
            pass
    return out


def wait_for_checkpoints(root: Path, before: set, count: int, timeout: float = 120) -> None:
    """Until `count` checkpoints were written since `before`, or the training finished.
    Polls os.stat only, so the trainer keeps the CPU."""
    deadline, seen = time.monotonic() + timeout, set()
    while len(seen) < count and not (root / "models/bark/last.pt").exists() and time.monotonic() < deadline:
        seen |= checkpoint_versions(root) - before
        time.sleep(0.001)


def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_runs_lists_and_prunes_all_but_the_resumable_run(tiny):
    """`barkgpt runs bark` lists each run under a header, with its status, its real size, and whether
    its process still lives; it says what `train --resume` will continue; `--prune` removes all but
    that run, which then still resumes; a running writer blocks the prune."""
    from barkgpt.runs import RunFolder

    params = load_params(tiny / "params.yaml", {"bark": {"train": {"max_steps": 5}}})
    run_stage(params, "bark", "train", tiny, progress=False)  # a promoted run
    lay = layout("bark", tiny)
    promoted = next(p for p in lay.runs.iterdir() if p.is_dir())
    # Three runs that say "running": two whose process died (the newer one is what --resume picks),
    # one whose process lives (this test's: it started before the run did); and a diverged one.
    host = socket.gethostname()
    for run_id, status, started, pid in (("20260101T000000-aaaaaa", "running", "2026-01-01T00:00:00.000000Z", dead_pid()),
                                         ("20260102T000000-bbbbbb", "running", "2026-01-02T00:00:00.000000Z", dead_pid()),
                                         ("20260103T000000-cccccc", "diverged", "2026-01-03T00:00:00.000000Z", None)):
        folder = RunFolder(lay.runs / run_id)
        folder.path.mkdir()
        shutil.copy(tiny / "models/bark/last.pt", folder.last)
        (folder.path / "run.json").write_text(json.dumps({"status": status, "started": started, "pid": pid, "host": host}))
    (lay.runs / "20260104T000000-dddddd").mkdir()  # never started: no run.json
    checkpoint_bytes = (tiny / "models/bark/last.pt").stat().st_size
    step = load_checkpoint(tiny / "models/bark/last.pt")["step"]

    def listing() -> tuple[list[str], dict[str, str]]:
        proc = cli("runs", "bark", cwd=tiny)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        lines = out.splitlines()
        return lines, {line.split()[0]: line for line in lines[1:] if line[:8].isdigit()}

    lines, rows = listing()
    assert lines[0].split() == ["RUN", "STATUS", "STARTED", "SIZE"]
    assert len(rows) == 5
    assert rows[promoted.name].split()[1] == "promoted"
    assert rows["20260104T000000-dddddd"].split()[1] == "incomplete"
    for run_id in ("20260101T000000-aaaaaa", "20260102T000000-bbbbbb"):  # dead pids: not "running"
        assert rows[run_id].split()[1] == "interrupted" and "is gone" in rows[run_id], rows[run_id]
    # Sizes are the bytes on disk: a run folder holding a checkpoint shows at least its size.
    size = rows["20260102T000000-bbbbbb"].split()[4:6]
    assert float(size[0]) * {"B": 1, "kB": 1e3, "MB": 1e6}[size[1]] >= checkpoint_bytes * 0.99, size
    resumable = [line for line in lines if "--resume` continues this one" in line]
    assert len(resumable) == 1 and resumable[0].startswith("20260102T000000-bbbbbb")
    assert lines[-1] == f"`barkgpt train bark --resume` continues run 20260102T000000-bbbbbb from step {step}"

    # A run whose process lives is running, and --resume (which needs the lock) would not continue it.
    live = RunFolder(lay.runs / "20260105T000000-eeeeee")
    live.path.mkdir()
    (live.path / "run.json").write_text(json.dumps({"status": "running", "started": runs_now(), "pid": os.getpid(),
                                                    "host": host}))
    lines, rows = listing()
    assert rows[live.id].split()[1] == "running" and f"pid {os.getpid()}" in rows[live.id]
    assert "would stop at once" in lines[-1] and live.id in lines[-1]
    shutil.rmtree(live.path)

    with writer_lock(lay, "train bark"):
        blocked = cli("runs", "bark", "--prune", cwd=tiny)
        _, err = blocked.communicate(timeout=120)
    assert blocked.returncode == 2 and "cannot prune runs" in err and "Traceback" not in err
    assert len([p for p in lay.runs.iterdir() if p.is_dir()]) == 5

    proc = cli("runs", "bark", "--prune", cwd=tiny)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.startswith("removed 4 run folder(s)")
    assert sorted(p.name for p in lay.runs.iterdir() if p.is_dir()) == ["20260102T000000-bbbbbb"]
    assert (tiny / "models/bark/best.pt").exists()  # the promoted model is untouched
    assert latest_interrupted(lay).id == "20260102T000000-bbbbbb"  # --resume still finds it
    logged = []
    with writer_lock(lay, "train bark"):
        assert open_run(lay, resume=True, log=logged.append).id == "20260102T000000-bbbbbb"
    assert logged[0].startswith(f"resuming interrupted run 20260102T000000-bbbbbb from step {step}")
    assert json.loads((lay.runs / "20260102T000000-bbbbbb/run.json").read_text())["pid"] == os.getpid()


def runs_now() -> str:
    from barkgpt.runs import _now

    return _now()
