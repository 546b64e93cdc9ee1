"""One trial: a real DVC experiment (`dvc exp run --temp -S key=value ...`) whose training is an
MLflow run nested under the sweep's parent run.

The library never imports DVC: a trial runs DVC's own command, as a user would, so `dvc exp show`,
`dvc exp apply` and `dvc exp push` work on it and `dvc.lock` stays the one record of what ran.
The trial's MLflow run is created here and handed to the training stage through MLFLOW_RUN_ID,
MLflow's own way for a launcher to give a child process its run (`mlflow run` does the same).

Pruning reads what the trainer already logs: the validation bpb at each evaluation, from the
trial's MLflow run (a tracking server when the trial runs on another machine). A hopeless trial
gets Ctrl-C (SIGINT to its process group); training stops cleanly and `dvc exp run` records no
experiment for it.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from barkgpt.sweep.study import STUDY_LOCK

INTERMEDIATE = "val_bpb"  # the per-evaluation metric training logs (barkgpt/train.py), minimized
POLL_S = 1.0
PRUNE_GRACE_S = 60.0  # a pruned trial still running this long after its Ctrl-C is killed


@dataclass
class TrialResult:
    number: int
    state: str  # complete | pruned | failed
    params: dict
    experiment: str
    run_id: str
    value: float | None = None  # the evaluate stage's val_bpb, the study's objective
    metrics: dict = field(default_factory=dict)  # the evaluation's metrics, from the MLflow run
    gate_passed: bool = False
    seconds: float = 0.0
    error: str = ""


def experiment_name(study: str, number: int) -> str:
    """A git-ref-safe, unique DVC experiment name: `<study>-t003`."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in study).strip("-") or "sweep"
    return f"{safe}-t{number:03d}"


def assignment(key: str, value) -> str:
    """`-S key=value`, the value in YAML so DVC writes the same type back (0.003, 64, true, adamw)."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return f"{key}={text.removesuffix(chr(10) + '...').strip()}"


def dvc_command(pipe, name: str, overrides: dict, force: bool = False) -> list[str]:
    """Run the pipeline through its evaluate stage: the gate that ranks trials. Export, parity and
    deploy follow for the one a user keeps (`dvc exp apply`, then `dvc repro`)."""
    # Trials start side by side: each waits its turn for the repository's lock, briefly held while
    # DVC sets up the experiment's temporary workspace and while it saves the result.
    # Not forced at first: DVC runs only the stages the trial's params reach (the data stages are
    # restored, so their reports, and a trial's columns in `dvc exp show --only-changed`, stay equal).
    argv = ["dvc", "--wait-for-lock", "exp", "run", "--temp", *(["--force"] if force else []), "--name", name]
    for key, value in overrides.items():
        argv += ["-S", assignment(key, value)]
    return argv + [f"{pipe.dvc_file}:{pipe.dvc_stage('evaluate')}"]


def run_trial(sweep, trial, cpus: list[int] | None = None) -> TrialResult:
    """Run `trial` (an optuna.Trial) to its end, its processes on `cpus` (all when None); report
    intermediate bpb and prune on the way."""
    overrides = dict(trial.params)
    name = experiment_name(sweep.study_name, trial.number)
    run_id = sweep.tracker.start_trial(trial.number, name, trial.params)
    log_path = sweep.log_path(trial.number)
    # No warm server: a trial runs in DVC's temporary copy of the project, removed when it ends, and a
    # server started from one trial's copy served the next trials' stages from a folder that was gone
    # (ModuleNotFoundError on a lazy import, seen in a --jobs 2 sweep).
    env = {**os.environ, "MLFLOW_RUN_ID": run_id, "MLFLOW_TRACKING_URI": sweep.tracker.uri, "BARKGPT_WARM": "0"}
    started, seen = time.monotonic(), {}
    proc, pruned = _run_experiment(sweep, trial, dvc_command(sweep.pipe, name, overrides), env, log_path, seen, cpus)
    if proc.returncode == 0 and not pruned and not seen and INTERMEDIATE not in sweep.tracker.evaluation(run_id):
        # Nothing trained: DVC judged the trial's params already run (equal to the baseline's or an
        # earlier trial's) and restored that result. A trial is a training: run it again, forced.
        proc, pruned = _run_experiment(sweep, trial, dvc_command(sweep.pipe, name, overrides, force=True), env,
                                       log_path, seen, cpus, mode="a")
    seconds = time.monotonic() - started
    result = TrialResult(trial.number, "failed", overrides, name, run_id, seconds=seconds)
    if pruned:
        result.state = "pruned"
        result.error = f"pruned at step {max(seen)} ({INTERMEDIATE} {seen[max(seen)]:.4f})"
        sweep.tracker.end_trial(run_id, result)
        return result
    if proc.returncode == 0:
        metrics = sweep.tracker.evaluation(run_id)
        result.metrics, result.gate_passed = metrics, bool(metrics.get("gate_passed"))
        result.value = metrics.get(INTERMEDIATE)
        result.state = "complete" if result.value is not None and math.isfinite(result.value) else "failed"
        if result.state == "failed":
            result.error = f"the evaluation logged no finite {INTERMEDIATE}"
    else:
        result.error = f"`dvc exp run` exited {proc.returncode}: {_last_error(log_path)} (log: {log_path})"
    sweep.tracker.end_trial(run_id, result)
    return result


def _run_experiment(sweep, trial, argv: list[str], env: dict, log_path: Path, seen: dict,
                    cpus: list[int] | None = None, mode: str = "w") -> tuple[subprocess.Popen, bool]:
    """Run one `dvc exp run` to its end, reporting each new intermediate value to Optuna; Ctrl-C it
    when Optuna prunes. Returns the finished process and whether it was pruned."""
    run_id, pruned, ignored = env["MLFLOW_RUN_ID"], False, 0
    with open(log_path, mode) as log:
        proc = subprocess.Popen(argv, cwd=sweep.root, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True,  # its own process group: Ctrl-C reaches all of it
                                preexec_fn=lambda: _trial_process(cpus))
        try:
            while proc.poll() is None:
                time.sleep(POLL_S)
                logged = [(step, value) for step, value in sweep.tracker.history(run_id, INTERMEDIATE)
                          if math.isfinite(value)]
                if pruned:
                    # A training that still logs steps did not stop on the Ctrl-C: Ctrl-C again, as a
                    # user would, then kill; so does a trial not ended within the grace period.
                    still_training = len(logged) > logged_at_prune
                    logged_at_prune, ignored = len(logged), ignored + still_training
                    if ignored >= 2 or time.monotonic() - pruned_time > PRUNE_GRACE_S:
                        _signal_group(proc, signal.SIGKILL)
                    elif still_training:
                        _signal_group(proc, signal.SIGINT)
                    continue
                new = [(step, value) for step, value in logged if step not in seen]
                with STUDY_LOCK:
                    for step, value in new:
                        seen[step] = value
                        trial.report(value, step)
                    pruned = bool(new) and trial.should_prune()
                if pruned:
                    logged_at_prune, pruned_time = len(logged), time.monotonic()
                    _signal_group(proc, signal.SIGINT)
        except BaseException:  # the sweep itself was interrupted: stop the trial with it
            _interrupt(proc)
            raise
    return proc, pruned


def _trial_process(cpus: list[int] | None) -> None:
    """In the trial's process, before DVC starts: Ctrl-C must reach it, since that is how a pruned
    trial is stopped. A sweep started as a background job (`nohup ... &`, a CI runner) inherits
    SIGINT ignored and would pass that on to every trial: pruned trials then trained to their end.
    Then its share of the cores (--jobs)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if cpus:
        os.sched_setaffinity(0, cpus)


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


def _interrupt(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """Ctrl-C to the trial's process group, as a user at a terminal would; a kill only if it hangs."""
    if proc.poll() is not None:
        return
    _signal_group(proc, signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def _last_error(log_path: Path) -> str:
    """The line that says why: the last `error:` line of the log, else its last line."""
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.lower().startswith(("error:", "error "))]
    return (errors or lines or ["no output"])[-1][:300]
