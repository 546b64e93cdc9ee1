"""A sweep in MLflow: one parent run (the search space, the trials' table and plot, the best trial)
and one child run per trial, nested under it (`mlflow.parentRunId`), so the MLflow UI shows the
sweep as one expandable row and its trials side by side in the compare view.

Trials evaluate and register their models like any training; the champion alias moves once, when
the sweep ends (registry.register defers the election for runs tagged as sweep trials).
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from barkgpt.config import Params
from barkgpt.tracking.registry import SWEEP_TAG as STUDY_TAG
from barkgpt.tracking.runs import client_for, commit_id, experiment_id

PARENT_TAG = "mlflow.parentRunId"


class SweepTracker:
    def __init__(self, params: Params, pipeline: str, root: Path, study: str, settings: dict):
        self.mlflow, self.client = client_for(params, root)
        self.uri = self.mlflow.get_tracking_uri()
        self.pipeline, self.study, self.root = pipeline, study, Path(root)
        self.experiment_id = experiment_id(self.client, params.tracking, root, self.uri)
        self.parent_id = self._parent(settings)

    def _parent(self, settings: dict) -> str:
        """The sweep's parent run; a machine joining a shared study finds the one already there."""
        found = self.client.search_runs(
            [self.experiment_id], f"tags.`{STUDY_TAG}` = '{self.study}' and tags.`sweep.role` = 'parent'",
            max_results=1)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=f"sweep {self.study}", tags={
            "pipeline": self.pipeline, STUDY_TAG: self.study, "sweep.role": "parent",
            "git.commit": commit_id(self.root),
            "mlflow.note.content": f"Sweep `{self.study}` of the {self.pipeline} pipeline: each child run is one "
                                   "trial, a DVC experiment of the same name (`dvc exp show`). "
                                   "Artifacts: `sweep/trials.csv`, `sweep/trials.png`."})
        self.client.log_batch(run.info.run_id, params=[Param(f"sweep.{k}", str(v)[:6000])
                                                       for k, v in settings.items()], synchronous=True)
        return run.info.run_id

    def start_trial(self, number: int, experiment: str, values: dict) -> str:
        shown = ", ".join(f"{k.rsplit('.', 1)[-1]}={v:g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                          for k, v in values.items())
        run = self.client.create_run(self.experiment_id, run_name=f"trial {number}: {shown}", tags={
            PARENT_TAG: self.parent_id, STUDY_TAG: self.study, "sweep.trial": str(number),
            "dvc.experiment": experiment, "pipeline": self.pipeline, "sweep.state": "running"})
        return run.info.run_id

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        try:
            return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]
        except Exception:  # a busy SQLite store: the next poll reads it
            return []

    def evaluation(self, run_id: str) -> dict:
        """The evaluate stage's metrics on the trial's run (`eval.<name>`), and its gate verdict."""
        run = self.client.get_run(run_id)
        metrics = {k[len("eval."):]: v for k, v in run.data.metrics.items() if k.startswith("eval.")}
        metrics["gate_passed"] = run.data.tags.get("gate_passed") == "true"
        return metrics

    def end_trial(self, run_id: str, result) -> None:
        self.client.set_tag(run_id, "sweep.state", result.state)
        if result.error:
            self.client.set_tag(run_id, "sweep.error", result.error[:500])
        if result.state == "pruned":  # stopped on purpose (the stage itself recorded its Ctrl-C as FAILED)
            self.client.set_terminated(run_id, status="KILLED")
        elif result.state == "failed" and self.client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
            self.client.set_terminated(run_id, status="FAILED")

    def finish(self, results: list, best, champion: dict, folder: Path) -> None:
        """The comparison table and plot as the parent's artifacts; the best trial as its metrics."""
        folder.mkdir(parents=True, exist_ok=True)
        table = write_table(results, folder / "trials.csv")
        plot = plot_trials(results, folder / "trials.png")
        for path in (table, plot, folder / "summary.json"):
            if path and path.exists():
                self.client.log_artifact(self.parent_id, str(path), "sweep")
        metrics = {"sweep.trials": len(results),
                   "sweep.pruned": sum(r.state == "pruned" for r in results),
                   "sweep.failed": sum(r.state == "failed" for r in results),
                   "sweep.passed_gate": sum(r.gate_passed for r in results)}
        if best is not None:
            metrics["best.trial"] = best.number
            metrics |= {f"best.{k}": float(v) for k, v in best.metrics.items() if isinstance(v, (int, float))}
            self.client.set_tag(self.parent_id, "sweep.best_experiment", best.experiment)
            self.client.set_tag(self.parent_id, "sweep.best_run", best.run_id)
        for key, value in metrics.items():
            self.client.log_metric(self.parent_id, key, float(value), int(time.time() * 1000))
        if champion.get("version") is not None:
            self.client.set_tag(self.parent_id, "sweep.champion_version", str(champion["version"]))
        self.client.set_terminated(self.parent_id, status="FINISHED" if best is not None else "FAILED")

    def fail(self) -> None:
        self.client.set_terminated(self.parent_id, status="FAILED")


def write_table(results: list, path: Path) -> Path:
    keys = sorted({k for r in results for k in r.params})
    metric_keys = sorted({k for r in results for k, v in r.metrics.items() if isinstance(v, (int, float))
                          and not isinstance(v, bool)})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "state", "experiment", *keys, "val_bpb", "gate_passed", *metric_keys, "seconds",
                    "run_id", "error"])
        for r in sorted(results, key=lambda r: r.number):
            w.writerow([r.number, r.state, r.experiment, *[r.params.get(k, "") for k in keys],
                        "" if r.value is None else f"{r.value:.6g}", str(r.gate_passed).lower(),
                        *[r.metrics.get(k, "") for k in metric_keys], f"{r.seconds:.1f}", r.run_id, r.error])
    return path


def plot_trials(results: list, path: Path) -> Path | None:
    """Validation bpb per trial, in order: pruned and failed trials marked, gate passers filled."""
    done = [r for r in results if r.value is not None]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for passed, marker, label in ((True, "o", "passed the gate"), (False, "x", "failed the gate")):
        pts = [(r.number, r.value) for r in done if r.gate_passed == passed]
        if pts:
            ax.plot(*zip(*pts), marker, linestyle="none", label=label)
    ax.set_xlabel("trial")
    ax.set_ylabel("validation bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_json(path: Path, summary: dict) -> None:
    from barkgpt.fileio import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, json.loads(json.dumps(summary, default=str)))
