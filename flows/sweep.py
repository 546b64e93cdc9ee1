"""One sweep flow per pipeline (`bark-sweep`, `webtext-sweep`, ...): the trials are mapped tasks,
each a DVC experiment with its MLflow run (barkgpt/sweep/); a last task elects the champion.

Every task opens the study by name, so the flow scales past one machine the way Optuna does:
deploy it to a work pool, point OPTUNA_STORAGE (and MLFLOW_TRACKING_URI) at the team's servers,
and run it on several workers with the same `study`: each adds its trials to the one study.

    python -m flows.sweep bark --grid bark.train.learning_rate=0.003,0.01 --jobs 2
    prefect deployment run 'bark-sweep/local' --param study=lr-1 --param grid='{"bark.train.learning_rate": [0.003, 0.01]}'
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

import flows  # noqa: F401  (PREFECT_HOME and result defaults before prefect loads)
from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from barkgpt.pipelines import REGISTRY, get

_slots: dict[str, threading.BoundedSemaphore] = {}  # per study: at most `jobs` trials train at once here
_slots_lock = threading.Lock()


def _open(pipeline: str, root: str, params_file: str, grid: dict | None, space: dict | None, trials: int | None,
          jobs: int, storage: str | None, study: str, prune: bool):
    from barkgpt.config import parse_params
    from barkgpt.params import read_raw
    from barkgpt.sweep import prepare
    from barkgpt.sweep.space import space_from_mapping

    if bool(grid) == bool(space):
        from barkgpt.errors import BarkError

        raise BarkError("give the search space once: `grid` ({key: [values]}) or `space` ({key: {low, high}})")
    searched = space_from_mapping(grid, "grid", grid=True) if grid else space_from_mapping(space, "space")
    raw = read_raw(Path(root) / params_file)
    return prepare(parse_params(raw, params_file), raw, get(pipeline), Path(root), searched, trials, jobs,
                   storage, study, prune)


@task(name="trial", cache_policy=NO_CACHE, persist_result=False)
def trial_task(index: int, pipeline: str, options: dict) -> dict:
    """One trial: the study proposes its params, DVC runs it as an experiment, the study is told."""
    from barkgpt.sweep import has_next, run_one

    sweep = _open(pipeline, **options)
    with _slots_lock:
        slots = _slots.setdefault(sweep.study_name, threading.BoundedSemaphore(options["jobs"]))
    with slots:
        if not has_next(sweep):
            return {"trial": None, "state": "skipped: the grid is done"}
        r = run_one(sweep)
    print(f"trial {r.number} {r.state}: {r.experiment} {r.params} val_bpb {r.value} gate_passed {r.gate_passed}"
          + (f" ({r.error})" if r.error else ""))
    return {"trial": r.number, "state": r.state, "experiment": r.experiment, "val_bpb": r.value,
            "gate_passed": r.gate_passed, "mlflow_run_id": r.run_id, "error": r.error}


@task(name="elect-champion", cache_policy=NO_CACHE, persist_result=False)
def finish_task(pipeline: str, options: dict) -> dict:
    from barkgpt.sweep import finish

    return finish(_open(pipeline, **options))


def publish(summary: dict) -> None:
    """The flow run's one summary artifact: the trials, the best, the champion, how to apply it."""
    rows = [f"| {t['trial']} | {t['state']} | `{t['experiment']}` | "
            + ", ".join(f"{k}={v}" for k, v in t["params"].items())
            + f" | {'' if t['val_bpb'] is None else format(t['val_bpb'], '.4f')} | {t['gate_passed']} |"
            for t in summary["trials"]]
    best = summary["best"]
    lines = [f"# Sweep `{summary['study']}` ({summary['pipeline']})", "",
             "| trial | state | DVC experiment | params | val bpb | gate passed |", "|---|---|---|---|---|---|", *rows,
             ""]
    if best:
        lines += [f"Best trial: **{best['trial']}** (`{best['experiment']}`); champion: "
                  f"{summary['champion']['model']} version {summary['champion']['version']}.", "",
                  f"Apply it: `dvc exp apply {best['experiment']}`, then `dvc repro`."]
    else:
        lines += ["No trial passed the gate; the champion alias was not moved."]
    create_markdown_artifact(key=f"{summary['pipeline']}-sweep", markdown="\n".join(lines),
                             description=f"sweep {summary['study']}: trials, best, champion")


def sweep_flow(pipeline: str):
    @flow(name=f"{pipeline}-sweep", log_prints=True, persist_result=False,
          description=f"Sweep the {pipeline} pipeline's params: Optuna trials as DVC experiments and nested "
                      "MLflow runs; the best gated trial becomes champion")
    def run(grid: dict[str, list] | None = None, space: dict[str, dict] | None = None, trials: int | None = None,
            jobs: int = 1, study: str | None = None, storage: str | None = None, prune: bool = True,
            root: str = ".", params_file: str = "params.yaml") -> dict:
        from barkgpt.errors import BarkError
        from barkgpt.layout import Layout
        from barkgpt.sweep import check_outcome, default_study_name

        options = {"root": root, "params_file": params_file, "grid": grid, "space": space, "trials": trials,
                   "jobs": jobs, "storage": storage, "study": study or default_study_name(pipeline), "prune": prune}
        try:  # a bad space or an unreachable study fails here, before any trial: one message, no traceback
            sweep = _open(pipeline, **options)
        except BarkError as err:
            return Failed(message=str(err))
        count = trials if trials is not None else sweep.space.grid_size()
        futures = trial_task.map(list(range(count)), unmapped(pipeline), unmapped(options))
        futures.wait()
        summary = finish_task(pipeline, options, wait_for=futures)
        publish(summary)
        try:
            check_outcome(summary, Layout(pipeline, Path(root)).sweep_folder(options["study"]))
        except BarkError as err:
            return Failed(message=str(err), data=summary)
        return summary

    return run


FLOWS = {name: sweep_flow(name) for name in REGISTRY}
globals().update({f"{name}_sweep": f for name, f in FLOWS.items()})  # prefect.yaml: flows/sweep.py:bark_sweep


def main(argv: list[str] | None = None) -> int:
    """Run a pipeline's sweep flow in this process (Prefect's local API); exit 2 on a BarkError."""
    from barkgpt.errors import BarkError
    from barkgpt.sweep.space import load_space, parse_grid

    parser = argparse.ArgumentParser(description="Run a pipeline's sweep flow in this process.")
    parser.add_argument("pipeline", choices=list(FLOWS))
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2")
    parser.add_argument("--space", metavar="FILE")
    parser.add_argument("--trials", type=int)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--study")
    parser.add_argument("--storage")
    parser.add_argument("--no-prune", action="store_true")
    parser.add_argument("--root", default=".")
    args = parser.parse_args(argv)
    try:
        grid = parse_grid(args.grid).grid_values() if args.grid else None
        space = load_space(args.space).describe() if args.space else None
        state = FLOWS[args.pipeline](grid=grid, space=space, trials=args.trials, jobs=args.jobs, study=args.study,
                                     storage=args.storage, prune=not args.no_prune, root=args.root, return_state=True)
    except BarkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not state.is_completed():
        print(f"error: {state.message}", file=sys.stderr)
        return 2
    print(json.dumps(state.result()["best"], indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
