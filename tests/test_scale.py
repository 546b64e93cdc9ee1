"""Training past one process: DDP under torchrun (gloo, 2 CPU processes), exact resume after kill -9,
rank-0-only writes; devices; token-shard errors; progress lines without a terminal.

The equivalence tested: 2 processes x grad_accum 1 x batch B == 1 process x grad_accum 2 x batch B.
It holds because micro-batch j of step s draws its windows (and dropout masks) from a generator
seeded by (seed, s, j), process r trains micro-batches j = r*grad_accum + a, and DDP's all-reduce
mean of the per-process gradients (each the mean over its micro-batches of loss/grad_accum) is
the single process's mean over all 2*grad_accum micro-batches: the same sum, in another order.
Float summation order is the only difference, hence a tolerance (1e-5) rather than equality.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from barkgpt.checkpoint import load_checkpoint
from barkgpt.cli import main as cli_main
from barkgpt.config import load_params
from barkgpt.pipelines import run_stage

from conftest import ROOT, make_project

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # the `torchrun` console script, by module
STEPS = 40
BARK = {"bark": {
    "data": {"train_conversations": 400, "val_conversations": 60},
    "train": {"max_steps": STEPS, "batch_size": 16, "grad_accum": 1, "warmup_steps": 5, "threads": 1,
              "log_every": 5, "eval_every": 10, "checkpoint_every": 5, "device": "cpu"},
}}
AUDIT = '''
import os, sys
_rank, _root, _log = os.environ.get("RANK"), os.environ.get("AUDIT_ROOT"), os.environ.get("AUDIT_LOG")
if _rank is not None and _root and _log:
    _fd = os.open(f"{_log}.rank{_rank}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _audit(event, args):
        if event == "open":
            path, writes = args[0], bool((args[2] or 0) & _WRITE)
        elif event in ("os.rename", "os.replace"):
            path, writes = args[1], True  # the destination
        elif event in ("os.remove", "os.mkdir", "sqlite3.connect"):
            path, writes = args[0], True
        else:
            return
        if writes and isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(_root):
            os.write(_fd, f"{event} {path}\\n".encode())

    sys.addaudithook(_audit)
'''


def env_for(tmp: Path, root: Path) -> dict:
    """PYTHONPATH with the code and an audit hook (sitecustomize) that logs, per rank, every write
    a process makes inside the project root."""
    hook = tmp / "audit"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(AUDIT)
    return {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1",
            "AUDIT_ROOT": str(root.resolve()), "AUDIT_LOG": str(tmp / "writes")}


def bark_project(folder: Path, **train) -> Path:
    root = make_project(folder, {"bark": {**BARK["bark"], "train": {**BARK["bark"]["train"], **train}}})
    params = load_params(root / "params.yaml")
    run_stage(params, "bark", "data", root)
    run_stage(params, "bark", "tokenize", root)
    return root


def weights(root: Path, pipeline: str = "bark") -> dict:
    return load_checkpoint(root / "models" / pipeline / "last.pt")["model"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def ddp_bark(tmp_path_factory):
    """The bark model trained by `torchrun --nproc-per-node 2 -m barkgpt train bark`, each rank's
    output in its own log file (torchrun --redirects) and each rank's writes audited."""
    tmp = tmp_path_factory.mktemp("ddp")
    root = bark_project(tmp / "project")
    logs = tmp / "torchrun-logs"
    done = subprocess.run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "--log-dir", str(logs),
                           "--redirects", "3", "-m", "barkgpt", "train", "bark", "--quiet", "--tag", "door=torchrun"],
                          cwd=root, env=env_for(tmp, root), capture_output=True, text=True, timeout=600)
    rank_logs = {int(p.parent.name): p.read_text() + p.with_name("stdout.log").read_text()
                 for p in logs.rglob("stderr.log")}
    assert done.returncode == 0, done.stderr[-3000:] + str(rank_logs)
    return {"root": root, "tmp": tmp, "logs": rank_logs}


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(ddp_bark, tmp_path):
    single = bark_project(tmp_path / "single", grad_accum=2)  # 1 process x 2 micro-batches x 16
    summary = run_stage(load_params(single / "params.yaml"), "bark", "train", single, progress=False)
    ddp = weights(ddp_bark["root"])
    diff = max_diff(weights(single), ddp)
    assert diff < 1e-5, diff
    # not vacuous: the weights moved far more than the tolerance
    assert max_diff(weights(single), {k: torch.zeros_like(v) for k, v in ddp.items()}) > 0.1
    ddp_summary = json.loads((ddp_bark["root"] / "reports/bark/train.json").read_text())
    assert ddp_summary["nproc"] == 2 and ddp_summary["tokens"] == summary["tokens"] == STEPS * 2 * 16 * 64
    assert ddp_summary["train_loss"] == pytest.approx(summary["train_loss"], abs=1e-4)
    assert ddp_summary["best_val_loss"] == pytest.approx(summary["best_val_loss"], abs=1e-4)


def test_only_rank_0_writes_files_logs_and_mlflow(ddp_bark):
    tmp, root = ddp_bark["tmp"], ddp_bark["root"]
    rank0 = (tmp / "writes.rank0").read_text()
    rank1 = (tmp / "writes.rank1").read_text() if (tmp / "writes.rank1").exists() else ""
    assert "models/bark/last.pt" in rank0 and "reports/bark/train_log.csv" in rank0  # the hook works
    assert "sqlite3.connect" in rank0 and "mlflow.db" in rank0
    assert rank1 == ""
    assert "step 1/40" in ddp_bark["logs"][0] and "trained 40 steps" in ddp_bark["logs"][0]
    assert "step" not in ddp_bark["logs"][1] and "trained" not in ddp_bark["logs"][1]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags["door"] == "torchrun"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in history] == list(range(5, STEPS + 1, 5))  # once per logged step, not per rank


def test_kill_9_of_the_ddp_job_then_resume_equals_an_uninterrupted_run(ddp_bark, tmp_path):
    root = bark_project(tmp_path / "project")
    env = {**env_for(tmp_path, root), "AUDIT_LOG": ""}
    command = [sys.executable, "-m", "barkgpt", "train", "bark", "--nproc", "2", "--quiet"]
    job = subprocess.Popen(command, cwd=root, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while run_step(root) < 10:  # the run writes into its own folder (barkgpt/runs.py) until promoted
        assert job.poll() is None, job.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(job.pid, signal.SIGKILL)  # the launcher, torchrun's agent and both workers
    assert job.wait() == -signal.SIGKILL
    killed_at = run_step(root)
    assert 10 <= killed_at < STEPS and not (root / "models/bark/last.pt").exists()  # really interrupted
    resumed = subprocess.run([*command, "--resume"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(ddp_bark["root"]), weights(root)
    assert all(torch.equal(a[k], b[k]) for k in a), max_diff(a, b)
    assert load_checkpoint(root / "models/bark/last.pt")["step"] == STEPS


def run_step(root: Path) -> int:
    """The step of the interrupted (or running) training's newest checkpoint; 0 before the first."""
    from barkgpt.layout import Layout
    from barkgpt.runs import latest_interrupted

    run = latest_interrupted(Layout("bark", root))
    return load_checkpoint(run.last)["step"] if run else 0


def test_webtext_model_under_two_processes_matches_one(wikitext_path, tmp_path):
    """The WebText-2 test model, with dropout on: its masks follow the same counters as the windows."""
    over = {"webtext": {"source": str(wikitext_path), "tokenizer": {"vocab_size": 300, "workers": 1},
                        "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "dropout": 0.1},
                        "train": {"max_steps": 6, "max_seconds": None, "batch_size": 4, "grad_accum": 1,
                                  "warmup_steps": 2, "eval_every": 3, "eval_batches": 2, "log_every": 3,
                                  "checkpoint_every": 3, "threads": 1, "dtype": "float32", "device": "cpu"}},
            "tracking": {"enabled": False}}
    single = make_project(tmp_path / "single", {**over, "webtext": {**over["webtext"], "train": {
        **over["webtext"]["train"], "grad_accum": 2}}})
    params = load_params(single / "params.yaml")
    for stage in ("ingest", "tokenizer", "tokenize"):
        run_stage(params, "webtext", stage, single)
    ddp = make_project(tmp_path / "ddp", over)
    shutil.copytree(single / "data", ddp / "data")
    run_stage(params, "webtext", "train", single, progress=False)
    done = subprocess.run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "barkgpt", "train",
                           "webtext", "--quiet"], cwd=ddp, env=env_for(tmp_path, ddp), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(single, "webtext"), weights(ddp, "webtext")
    assert max_diff(a, b) < 1e-5, max_diff(a, b)


# --- devices ----------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_stops_before_any_work(tmp_path):
    root = make_project(tmp_path, {"bark": {"train": {"device": "cuda"}}})  # no data, no tokens either
    run = subprocess.run([sys.executable, "-m", "barkgpt", "train", "bark"], cwd=root, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "train.device is cuda but no CUDA GPU is visible" in run.stderr and "train.device: auto or cpu" in run.stderr
    assert not (root / "mlflow.db").exists() and not (root / "models").exists()


def test_auto_device_is_the_cpu_here_and_bf16_autocast_follows_the_device():
    from barkgpt.device import autocast, resolve_device

    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with autocast("bfloat16", "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("float32", "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


# --- bad token shards (a clear error naming the file, exit 2) -----------------------------------

def corrupt_odd_size(tokens: Path):
    shard = tokens / "train-000000.bin"
    shard.write_bytes(shard.read_bytes() + b"\x01")
    return shard, "not a whole number of uint16 tokens"


def corrupt_empty(tokens: Path):
    shard = tokens / "val-000000.bin"
    shard.write_bytes(b"")
    return shard, "shard is empty"


def corrupt_id_past_vocab(tokens: Path):
    shard = tokens / "train-000000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[123] = 9  # the bark vocabulary has 9 words: ids 0..8
    ids.tofile(shard)
    return shard, "token id 9 at position 123 is outside the vocabulary"


def corrupt_manifest(tokens: Path):
    (tokens / "train.json").write_text("{}")
    return tokens / "train.json", "not a token shard manifest (missing tokens, dtype, vocab_size, files)"


def corrupt_missing_shard(tokens: Path):
    (tokens / "val-000000.bin").unlink()
    return tokens / "val-000000.bin", "is missing"


def rename_a_vocabulary_word(tokens: Path):
    tokenizer = tokens.parent / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"woof"', '"bark"'))
    # bark's vocabulary is a contract, checked before the shards' tokenizer hash is
    return tokenizer, "the bark vocabulary is fixed"


@pytest.mark.parametrize("corrupt", [corrupt_odd_size, corrupt_empty, corrupt_id_past_vocab, corrupt_manifest,
                                     corrupt_missing_shard, rename_a_vocabulary_word])
def test_bad_token_shards_stop_training_with_a_clear_error(bark_copy, corrupt, monkeypatch, capsys):
    path, problem = corrupt(bark_copy / "data/bark/tokens")
    monkeypatch.chdir(bark_copy)
    assert cli_main(["train", "bark", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert problem in err and str(path.relative_to(bark_copy)) in err and "barkgpt tokenize bark" in err
    assert "Traceback" not in err


def test_bark_token_suite_passes_then_names_the_bad_shard(bark_copy):
    params = load_params(bark_copy / "params.yaml")
    report = run_stage(params, "bark", "validate-tokens", bark_copy)
    assert report["success"] and report["expectations"] == 10
    corrupt_id_past_vocab(bark_copy / "data/bark/tokens")
    run = subprocess.run([sys.executable, "-m", "barkgpt", "validate-tokens", "bark"], cwd=bark_copy,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "bark.train.token_ids: expect_column_values_to_be_between(id) failed; position 123" in run.stderr
    assert "bark.shards.files: expect_column_values_to_be_between(out_of_vocab) failed; file train/train-000000.bin" \
        in run.stderr


# --- progress without a terminal ------------------------------------------------------------------

def test_progress_lines_without_a_terminal(tmp_path, monkeypatch, caplog):
    """A line at least every PROGRESS_EVERY_S (0.2 s here, 10 s in use) with step, loss, tokens/s, ETA."""
    import barkgpt.train

    monkeypatch.setattr(barkgpt.train, "PROGRESS_EVERY_S", 0.2)
    steps = 100
    root = bark_project(tmp_path, max_steps=steps, checkpoint_every=steps)
    params = load_params(root / "params.yaml", {"tracking": {"enabled": False}})
    caplog.set_level(logging.INFO, logger="barkgpt.train")
    run_stage(params, "bark", "train", root, progress=True)  # stderr is not a terminal under pytest: no bar
    records = [r for r in caplog.records if r.name == "barkgpt.train" and r.getMessage().startswith("step")]
    lines = [r.getMessage() for r in records]
    assert lines[0].startswith(f"step 1/{steps}") and lines[-1].startswith(f"step {steps}/{steps} (100%)")
    assert all(" loss " in x and " tok/s | elapsed " in x and " | ETA " in x for x in lines)
    duration = records[-1].created - records[0].created
    step_time = duration / (steps - 1)
    # every gap is at most the interval plus the step that crossed it (3x the mean step: load varies)
    assert len(lines) >= duration / (0.2 + 3 * step_time), (len(lines), duration)


def test_gpu_benchmark_smoke_check_runs_on_the_cpu():
    run = subprocess.run([sys.executable, "benchmarks/gpu_train.py", "--tiny", "--device", "cpu", "--no-compile",
                          "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "batch 4 x 64 tokens" in run.stdout and "tokens/s: " in run.stdout and "MFU: n/a" in run.stdout
