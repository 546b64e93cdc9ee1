"""Sweeps: many trainings of one pipeline, compared, the best gated one kept.

    barkgpt sweep bark --grid bark.train.learning_rate=0.003,0.01 --jobs 2
    barkgpt sweep webtext --space space.yaml --trials 12 --jobs 1

An Optuna study (study.py) proposes each trial's params from the search space (space.py); each
trial is a DVC experiment with its own MLflow run nested under the sweep's (trial.py); `jobs`
trials run at once, each with its share of the cores. When the trials are done, the champion
alias moves once, by the registry's one rule (the best gate-passing version by the pipeline's
metric), and the sweep says which trial that is; a sweep in which no trial passed moves nothing
and fails. The doors: `barkgpt sweep` (the CLI) and the `<pipeline>-sweep` Prefect flow, whose
trials are mapped tasks (flows/sweep.py); several machines sharing one study add trials to it.
"""
from __future__ import annotations

import math
import os
import shutil
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from barkgpt.errors import BarkError
from barkgpt.layout import Layout
from barkgpt.sweep.space import SearchSpace, check_space, load_space, parse_grid, sweepable_keys  # noqa: F401
from barkgpt.sweep.study import STUDY_LOCK
from barkgpt.sweep.trial import TrialResult, run_trial


@dataclass
class Sweep:
    """Everything a trial needs: the pipeline, the project, the study, the MLflow parent run."""

    pipe: object
    params: object
    root: Path
    space: SearchSpace
    study: object  # optuna.Study
    study_name: str
    tracker: object  # barkgpt.tracking.sweeps.SweepTracker
    jobs: int = 1

    def log_path(self, number: int) -> Path:
        path = Layout(self.pipe.name, self.root).sweep_trial_log(self.study_name, number)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


def default_study_name(pipeline: str) -> str:
    return f"{pipeline}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (Linux)
    except AttributeError:  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def cores_for_slot(slot: int, jobs: int) -> list[int] | None:
    """The cores trial slot `slot` of `jobs` runs on: each its own share, so trials side by side do
    not fight over cores (None: one at a time, all of them). The trial's process is pinned to them
    (sched_setaffinity, inherited by DVC and the training it starts), and training uses at most the
    cores its process may use: how fast a trial runs, not what it trains, so no params change and
    `dvc exp show` has no column for it."""
    if jobs <= 1 or not hasattr(os, "sched_setaffinity"):
        return None
    mine = sorted(os.sched_getaffinity(0))
    share = max(1, len(mine) // jobs)
    start = (slot * share) % len(mine)
    return mine[start:start + share]


def check_project(pipe, root: Path) -> None:
    """What a DVC experiment needs: the dvc command, a git repository with a commit, the pipeline's
    dvc.yaml. Checked before the study or any run is created."""
    if shutil.which("dvc") is None:
        raise BarkError("the `dvc` command is not installed; a sweep's trials are DVC experiments "
                        "(pip install 'barkgpt[pipeline]')")
    if not (root / ".dvc").is_dir():
        raise BarkError(f"{root.resolve()} is not a DVC project; run the sweep in the BarkGPT checkout")
    if not (root / pipe.dvc_file).exists():
        raise BarkError(f"{pipe.dvc_file} is missing; write it with `barkgpt dvc-yaml {pipe.name}`, commit it, "
                        "and run the sweep again")
    import subprocess

    head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True)
    if head.returncode != 0:
        raise BarkError(f"{root.resolve()} has no git commit; DVC experiments are based on one: "
                        "git add -A && git commit -m baseline")


def prepare(params, raw_params: dict, pipe, root: Path, space: SearchSpace, trials: int | None, jobs: int,
            storage: str | None, study_name: str | None, prune: bool) -> Sweep:
    """Check everything, then open the study and the parent run: a sweep that cannot run creates
    nothing."""
    from barkgpt.sweep.study import open_storage, open_study, redact, resolve_storage
    from barkgpt.tracking.sweeps import SweepTracker

    if jobs < 1:
        raise BarkError(f"--jobs must be at least 1, got {jobs}")
    if trials is not None and trials < 1:
        raise BarkError(f"--trials must be at least 1, got {trials}")
    if not space.grid and trials is None:
        raise BarkError("--space needs --trials N (how many trials to sample)")
    check_space(space, raw_params, pipe.name)
    check_project(pipe, root)
    if not params.tracking.enabled:
        raise BarkError("a sweep compares its trials in MLflow; set tracking.enabled: true in params.yaml")
    cfg = params.sweep
    url = resolve_storage(cfg.storage, root, storage)
    name = study_name or default_study_name(pipe.name)
    study = open_study(open_storage(url), name, space, cfg, pipe.name, prune)
    settings = {"pipeline": pipe.name, "space": space.describe(), "grid": space.grid,
                "trials": trials if trials is not None else space.grid_size(), "jobs": jobs,
                "storage": redact(url), "sampler": "grid" if space.grid else cfg.sampler,
                "pruner": cfg.pruner if prune else "none", "seed": cfg.seed}
    tracker = SweepTracker(params, pipe.name, root, name, settings)
    return Sweep(pipe, params, root, space, study, name, tracker, jobs)


def run_one(sweep: Sweep, cpus: list[int] | None = None) -> TrialResult:
    """Ask the study for a trial, run it as a DVC experiment (on `cpus` if given), tell the study how
    it ended."""
    import optuna

    with STUDY_LOCK:
        trial = sweep.study.ask(sweep.space.distributions())
    try:
        result = run_trial(sweep, trial, cpus)
    except BaseException:
        with STUDY_LOCK:
            sweep.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    with STUDY_LOCK:
        trial.set_user_attr("overrides", result.params)
        trial.set_user_attr("experiment", result.experiment)
        trial.set_user_attr("mlflow_run_id", result.run_id)
        trial.set_user_attr("gate_passed", result.gate_passed)
        if result.state == "complete":
            sweep.study.tell(trial, result.value)
        elif result.state == "pruned":
            sweep.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            trial.set_user_attr("error", result.error)
            sweep.study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return result


def has_next(sweep: Sweep) -> bool:
    """A grid ends when its queued combinations are taken (by this machine or another); sampling
    goes on as long as asked."""
    if not sweep.space.grid:
        return True
    import optuna

    with STUDY_LOCK:
        return bool(sweep.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


def run_trials(sweep: Sweep, trials: int, jobs: int, on_result=None) -> None:
    """`trials` trials, `jobs` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    remaining = [trials]
    lock = threading.Lock()

    def worker(slot: int):
        while True:
            with lock:
                if remaining[0] <= 0 or not has_next(sweep):
                    return
                remaining[0] -= 1
            result = run_one(sweep, cores_for_slot(slot, jobs))
            if on_result:
                on_result(result)

    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="trial") as pool:
        for future in [pool.submit(worker, slot) for slot in range(min(jobs, trials))]:
            future.result()


def rank_key(result: TrialResult, order: list[tuple[str, str]]) -> tuple:
    """The registry's ranking (the pipeline's metric, then validation loss), smaller is better."""
    key = []
    for metric, direction in order:
        value = result.metrics.get(metric)
        value = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.inf * (
            1 if direction == "min" else -1)
        key.append(-value if direction == "max" else value)
    return (*key, result.number)


def study_results(sweep: Sweep) -> list[TrialResult]:
    """Every finished trial of the study, whichever machine ran it, from Optuna and MLflow."""
    from optuna.trial import TrialState

    states = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
    results = []
    for t in sweep.study.get_trials(deepcopy=False):
        if t.state not in states:
            continue
        run_id = t.user_attrs.get("mlflow_run_id", "")
        metrics = sweep.tracker.evaluation(run_id) if t.state == TrialState.COMPLETE and run_id else {}
        results.append(TrialResult(
            t.number, states[t.state], t.user_attrs.get("overrides", dict(t.params)), t.user_attrs.get("experiment", ""),
            run_id, value=t.value, metrics=metrics, gate_passed=bool(t.user_attrs.get("gate_passed")),
            seconds=t.duration.total_seconds() if t.duration else 0.0, error=t.user_attrs.get("error", "")))
    return results


def finish(sweep: Sweep) -> dict:
    """Elect the champion once, by the registry's rule; write the sweep's table, plot and summary."""
    from barkgpt.tracking import registry
    from barkgpt.tracking.sweeps import summary_json

    pipe, params = sweep.pipe, sweep.params
    order = registry.ranking(pipe.metric, pipe.higher_is_better)
    results = study_results(sweep)
    passed = [r for r in results if r.state == "complete" and r.gate_passed]
    best = min(passed, key=lambda r: rank_key(r, order)) if passed else None
    model = registry.model_name(params, pipe.name)
    client = sweep.tracker.client
    champion: dict = {"model": model, "version": None, "trial": None}
    if best is not None:
        version = registry.elect_champion(client, model, order, params.tracking.champion_alias)
        champion["version"] = version
        if version is not None:
            run_id = client.get_model_version(model, str(version)).run_id
            champion["trial"] = next((r.number for r in results if r.run_id == run_id), None)
    folder = Layout(pipe.name, sweep.root).sweep_folder(sweep.study_name)
    summary = {"study": sweep.study_name, "pipeline": pipe.name, "space": sweep.space.describe(),
               "trials": [{"trial": r.number, "state": r.state, "experiment": r.experiment, "params": r.params,
                           "val_bpb": r.value, "gate_passed": r.gate_passed, "metric": r.metrics.get(pipe.metric),
                           "seconds": round(r.seconds, 1), "mlflow_run_id": r.run_id, "error": r.error}
                          for r in results],
               "best": None if best is None else {"trial": best.number, "experiment": best.experiment,
                                                  "params": best.params, "mlflow_run_id": best.run_id,
                                                  pipe.metric: best.metrics.get(pipe.metric), "val_bpb": best.value},
               "champion": champion, "parent_run_id": sweep.tracker.parent_id}
    summary_json(folder / "summary.json", summary)
    sweep.tracker.finish(results, best, champion, folder)
    return summary


def run_sweep(params, raw_params: dict, pipe, root: Path, space: SearchSpace, trials: int | None = None,
              jobs: int = 1, storage: str | None = None, study_name: str | None = None, prune: bool = True,
              on_result=None) -> dict:
    """The whole sweep in this process; BarkError when no trial passed the gate (nothing moved)."""
    sweep = prepare(params, raw_params, pipe, root, space, trials, jobs, storage, study_name, prune)
    count = trials if trials is not None else space.grid_size()
    if space.grid:
        count = min(count, space.grid_size())
    try:
        run_trials(sweep, count, jobs, on_result)
    except BaseException:
        sweep.tracker.fail()
        raise
    summary = finish(sweep)
    check_outcome(summary, Layout(pipe.name, root).sweep_folder(sweep.study_name))
    return summary


def check_outcome(summary: dict, folder: Path) -> None:
    """A sweep without a gate-passing trial moved nothing: say so, and fail."""
    if summary["best"] is not None:
        return
    states = ", ".join(f"trial {t['trial']} {t['state']}" + ("" if t["state"] != "complete" else
                       f" (gate {'passed' if t['gate_passed'] else 'failed'})") for t in summary["trials"])
    raise BarkError(f"sweep {summary['study']}: no trial passed the {summary['pipeline']} gate ({states or 'no trials'}); "
                    f"the champion alias was not moved. Trial logs and table: {folder}")
