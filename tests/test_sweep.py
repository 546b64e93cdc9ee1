"""Sweeps (barkgpt/sweep/, flows/sweep.py): many trainings of one pipeline, each a DVC experiment
and an MLflow run nested under the sweep's, compared, the best gated one promoted.

One project (a fresh copy of the repository, its data pulled from the DVC remote) serves every
test here; the sweeps run real DVC experiments, real MLflow and Optuna stores, in subprocesses
as a user would run them."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, copy_worktree, make_project

pytestmark = pytest.mark.timeout(1800)  # real trainings, several per test, on a 2-core machine
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}


def run(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV)


def barkgpt(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "barkgpt", *args], cwd, timeout)


def assert_clear(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 2, out.stdout[-1500:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for w in words:
        assert w in out.stderr, out.stderr[-3000:]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh clone with its data pulled, pruning from the first finished trial on, committed."""
    root = copy_worktree(tmp_path_factory.mktemp("sweep"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sweep"]["startup_trials"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=tests", "-c", "user.email=tests@localhost"]
    subprocess.run(git + ["commit", "-qam", "prune from the first trial"], cwd=root, check=True)
    pulled = run(["dvc", "pull", "-q", "dvc.yaml"], root)  # the bark pipeline's data and model
    assert pulled.returncode == 0, pulled.stderr
    return root


def mlflow_client(root: Path):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def sweep_runs(client, study: str) -> tuple[object, list]:
    exp = client.get_experiment_by_name("barkgpt")
    found = client.search_runs([exp.experiment_id], f"tags.`sweep.study` = '{study}'")
    parents = [r for r in found if r.data.tags.get("sweep.role") == "parent"]
    assert len(parents) == 1, [r.info.run_name for r in found]
    return parents[0], [r for r in found if r.data.tags.get("sweep.role") != "parent"]


def champion(client) -> int | None:
    try:
        alias = client.get_registered_model("barkgpt-bark").aliases.get("champion")
    except Exception:  # no model registered yet
        return None
    return None if alias is None else int(alias)


def experiments(root: Path) -> list[str]:
    out = run(["dvc", "exp", "ls", "--name-only"], root)
    assert out.returncode == 0, out.stderr
    return sorted(line.strip() for line in out.stdout.splitlines() if line.strip())


def readme_sweep() -> tuple[list[str], list[str]]:
    """The README's sweep and its `dvc exp show` line, as written (the docs test leaves them to this
    test, which checks what they did)."""
    from tests.test_docs_commands import commands, strip_comment

    lines = [strip_comment(c.text) for c in commands("README.md")]
    sweep = [shlex.split(line) for line in lines if line.startswith("barkgpt sweep ")]
    show = [shlex.split(line) for line in lines if line.startswith("dvc exp show ")]
    assert len(sweep) == 1 and len(show) == 1, lines
    return sweep[0], show[0]


def test_four_trials_two_at_a_time_promote_the_best_gated_one(project):
    sweep_cmd, show_cmd = readme_sweep()
    # named, so that the table's width below does not depend on the clock (the default name is
    # <pipeline>-<UTC date and time>)
    study = "grid4"
    out = barkgpt([*sweep_cmd[1:], "--study", study], project)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "best trial" in out.stdout and f"dvc exp apply {study}-t" in out.stdout

    # four DVC experiments, one per trial, each with the values it ran
    names = [n for n in experiments(project) if n.startswith(f"{study}-")]
    assert names == [f"{study}-t00{i}" for i in range(4)]
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    ran = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            rev = exp["revs"][0]
            if (rev.get("name") or "").startswith(f"{study}-"):
                train = rev["data"]["params"]["params.yaml"]["data"]["bark"]["train"]
                ran[rev["name"]] = (train["learning_rate"], train["max_steps"], train["threads"])
    # the values each ran, and no other params change: --jobs pins each trial to its share of the
    # cores instead of setting a thread count
    threads = yaml.safe_load((project / "params.yaml").read_text())["bark"]["train"]["threads"]
    assert sorted(ran.values()) == [(0.003, 20, threads), (0.003, 100, threads), (0.01, 20, threads),
                                    (0.01, 100, threads)]
    # the README's table (as written) shows what the trials changed and their headline, nothing
    # else: no hash columns from stages re-run on the same data (GX's run time once made two, 72
    # characters), no thread counts, no second copy of a metric
    table = run(show_cmd, project)
    assert table.returncode == 0 and f"{study}-t003" in table.stdout, table.stderr
    header = next(line for line in table.stdout.splitlines() if "Experiment" in line).split()
    assert sorted(header) == sorted(["Experiment", "Created", "contract_accuracy", "gate_passed",
                                     "bark.train.max_steps", "bark.train.learning_rate"]), table.stdout

    # four MLflow runs under one parent; the champion is the best gate-passing trial by the
    # registry's ranking (contract accuracy, then validation loss), read from the runs themselves
    client = mlflow_client(project)
    parent, trials = sweep_runs(client, study)
    assert len(trials) == 4 and all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in trials)
    assert all(t.info.status == "FINISHED" and "eval.val_bpb" in t.data.metrics for t in trials)
    passing = [t for t in trials if t.data.tags.get("gate_passed") == "true"]
    assert passing, [(t.info.run_name, t.data.metrics.get("eval.contract_accuracy")) for t in trials]
    best = min(passing, key=lambda t: (-t.data.metrics["eval.contract_accuracy"], t.data.metrics["eval.val_loss"]))
    version = champion(client)
    assert client.get_model_version("barkgpt-bark", str(version)).run_id == best.info.run_id
    assert parent.data.tags["sweep.best_run"] == best.info.run_id
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} >= {
        "sweep/trials.csv", "sweep/trials.png", "sweep/summary.json"}

    # the workspace is untouched: the trials ran in DVC's temporary workspaces
    status = run(["dvc", "status", "dvc.yaml"], project)  # the bark pipeline (the others never ran here)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout


def test_a_hopeless_trial_is_pruned_on_the_bpb_training_logs(project):
    # started as a background job is (SIGINT ignored, inherited), where a Ctrl-C to a trial was lost
    argv = [sys.executable, "-m", "barkgpt", "sweep", "bark", "--grid", "bark.train.learning_rate=0.01,0.00001",
            "--grid", "bark.train.max_steps=300", "--grid", "bark.train.eval_every=10", "--grid",
            "bark.train.log_every=10", "--study", "prune2"]
    out = subprocess.run(argv, cwd=project, capture_output=True, text=True, timeout=900, env=ENV,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert "trial 1 pruned" in out.stdout, out.stdout + out.stderr[-3000:]
    assert out.returncode in (0, 2) and "Traceback" not in out.stderr, out.stderr[-3000:]  # 2: trial 0 missed the gate
    _, trials = sweep_runs(mlflow_client(project), "prune2")
    pruned = [t for t in trials if t.data.tags["sweep.state"] == "pruned"]
    assert len(pruned) == 1 and pruned[0].info.status == "KILLED"
    assert pruned[0].data.tags["sweep.trial"] == "1"
    steps = [m.step for m in mlflow_client(project).get_metric_history(pruned[0].info.run_id, "val_bpb")]
    assert steps and max(steps) < 300, steps  # stopped before its budget
    log = (project / "sweeps/bark/prune2/trial-001.log").read_text()
    assert "interrupted" in log, log[-2000:]  # by the Ctrl-C (the training says so), not a kill
    assert "prune2-t001" not in experiments(project)  # no DVC experiment for an interrupted trial


def test_a_sweep_where_no_trial_passes_moves_nothing_and_fails(project):
    client = mlflow_client(project) if (project / "mlflow.db").exists() else None
    before = champion(client) if client else None
    out = run([sys.executable, "-m", "flows.sweep", "bark", "--grid", "bark.train.max_steps=2", "--study", "nopass"],
              project)
    assert_clear(out, "no trial passed the bark gate", "champion alias was not moved")
    assert champion(mlflow_client(project)) == before
    summary = json.loads((project / "sweeps/bark/nopass/summary.json").read_text())
    assert summary["best"] is None and summary["trials"][0]["gate_passed"] is False


@pytest.mark.parametrize("args, words", [
    (["--grid", "bark.train.learnig_rate=0.1,0.2"], ["bark.train.learnig_rate: unknown params key",
                                                     "did you mean bark.train.learning_rate"]),
    (["--grid", "serve.port=80,81"], ["does not shape the bark model"]),
    (["--grid", "bark.train.batch_size=8,big"], ["bark.train.batch_size='big' is not a valid value"]),
    (["--grid", "bark.train.optimizer=adamw,sgd"], ["bark.train.optimizer='sgd' is not a valid value"]),
    (["--space", "SPACE", "--trials", "2"], ["empty range (low 0.1 > high 0.01)"]),
    (["--space", "MISSING.yaml", "--trials", "2"], ["MISSING.yaml: not found"]),
    (["--grid", "bark.train.max_steps=10"], ["is not a DVC project"]),
    (["--grid", "bark.train.max_steps=10,20", "--storage", "postgresql://sweeper@127.0.0.1:9/optuna"],
     ["cannot be reached", "postgresql://sweeper@127.0.0.1:9/optuna"]),
    (["--grid", "bark.train.max_steps=10", "--space", "SPACE"], ["give the search space once"]),
])
def test_bad_sweep_input_is_one_clear_error_and_writes_nothing(tmp_path, project, args, words):
    root = project if "--storage" in args else make_project(tmp_path / "bare")
    space = tmp_path / "space.yaml"
    space.write_text("bark.train.learning_rate: {low: 0.1, high: 0.01}\n")
    args = [str(space) if a == "SPACE" else a for a in args]
    before = sorted(p.name for p in root.iterdir())
    out = barkgpt(["sweep", "bark", *args], root, timeout=120)
    assert_clear(out, *words)
    assert sorted(p.name for p in root.iterdir()) == before  # no study, no MLflow store, no sweep folder


def test_list_keys_names_what_a_sweep_can_vary(tmp_path):
    out = barkgpt(["sweep", "bark", "--list-keys"], make_project(tmp_path))
    assert out.returncode == 0
    keys = dict(line.split(" = ", 1) for line in out.stdout.splitlines())
    assert keys["bark.train.learning_rate"] == "0.01" and "seed" in keys and "serve.port" not in keys


def test_a_pruned_trial_that_keeps_training_after_ctrl_c_is_stopped(tmp_path):
    """The escalation after a prune: a trial whose training ignores Ctrl-C (its own handler here)
    and keeps logging steps gets a second one, then SIGKILL."""
    import time
    from types import SimpleNamespace

    from barkgpt.sweep.trial import _run_experiment

    started = time.monotonic()

    class StepsSoFar:  # the trial's val_bpb history as MLflow would return it: 10 steps a second
        def history(self, run_id, key):
            return [(10 * (i + 1), 1.0) for i in range(int((time.monotonic() - started) * 10))]

    class PruneAtOnce:
        reported: list = []

        def report(self, value, step):
            self.reported.append(step)

        def should_prune(self):
            return True

    deaf = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(120)"
    sweep = SimpleNamespace(root=tmp_path, tracker=StepsSoFar())
    seen: dict = {}
    proc, pruned = _run_experiment(sweep, PruneAtOnce(), [sys.executable, "-c", deaf],
                                   {"MLFLOW_RUN_ID": "r"}, tmp_path / "trial.log", seen)
    assert pruned and proc.returncode == -9  # killed, long before its 120 s
    assert time.monotonic() - started < 30
    assert max(seen) == max(PruneAtOnce.reported)  # the step it was pruned at, not the later ones
