"""The stage task: DVC decides whether a stage is stale, the stage runs, DVC records it.

One task for every stage of every pipeline. `dvc status` judges the stage (its code, inputs,
params and outputs as dvc.yaml declares them); a stale stage runs here, in this process, through
the same function its `barkgpt <stage> <pipeline>` command calls (so its logs and errors reach
Prefect), and `dvc commit` records it in dvc.lock. A second run does nothing, through any door,
and `dvc status` is clean after a flow. Results are small JSON summaries, persisted as JSON (never
pickled) and cached for their flow run only: a failed flow run retried reuses the stages that
completed and starts again at the failed one, while across flow runs DVC, not Prefect's cache,
judges what needs to run. The flow run's one artifact is the report (publish_report).
"""
from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, NO_CACHE, RUN_ID, TASK_SOURCE
from prefect.tasks import exponential_backoff

from barkgpt.errors import BarkError
from barkgpt.layout import Layout
from barkgpt.pipelines import get
from tasks.common import run_tags, to_params, transient_only


def dvc_repo(root: str | Path):
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Repo(str(root))
    except NotDvcRepoError:
        raise BarkError(f"{Path(root).resolve()} is not a DVC project (no .dvc/ folder); run the flow in the "
                        "BarkGPT checkout, or `git init && dvc init` there first") from None


def stale(repo, target: str) -> list:
    """What DVC says changed for this one stage (its key reads `file:stage` outside the root)."""
    return [change for changes in repo.status(targets=[target]).values() for change in changes]


# A stage's result is cached for its flow run only (RUN_ID): what a retry of that flow run reuses.
WITHIN_FLOW_RUN = TASK_SOURCE + INPUTS + RUN_ID


# Retries only for transient I/O (a BarkError, e.g. a failed gate or bad data, fails at once).
@task(name="stage", cache_policy=WITHIN_FLOW_RUN, persist_result=True, result_serializer="json", retries=2,
      retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_condition_fn=transient_only)
def run_stage(params: dict, pipeline: str, stage: str, root: str = ".") -> dict:
    pipe = get(pipeline)
    spec = pipe.stage(stage)
    target = f"{pipe.dvc_file}:{pipe.dvc_stage(stage)}"
    lay = Layout(pipeline, Path(root))
    with dvc_repo(root) as repo:
        changes = stale(repo, target)
        if not changes:
            print(f"{pipe.dvc_stage(stage)}: up to date (dvc status); not run")
            return {"stage": stage, "ran": False, **read_metrics(spec, lay)}
        print(f"{pipe.dvc_stage(stage)}: stale ({describe(changes)}); running")
        options = {"tags": run_tags()} if "tags" in inspect.signature(spec.run).parameters else {}
        if "progress" in inspect.signature(spec.run).parameters:
            options["progress"] = False  # a log line per interval instead of a progress bar
        result = spec.run(to_params(params), pipe, lay, **options)
        commit_keeping_previous(repo, target, Path(root))
    return {"stage": stage, "ran": True, **small(result)}


def lock_backup(root: Path) -> Path:
    """dvc.lock as it was before the flow's commit in progress (inside .dvc/tmp/, DVC's scratch)."""
    return root / ".dvc" / "tmp" / "dvc.lock.before-commit"


def commit_keeping_previous(repo, target: str, root: Path) -> None:
    """`dvc commit` the stage, its write made all-or-nothing for whoever comes next.

    DVC rewrites dvc.lock in place (truncate, then dump), so a kill in between leaves it empty.
    The previous lock is copied aside atomically first and removed once DVC's write is done;
    `restore_interrupted_lock` puts it back when a kill left the lock broken. The previous lock
    is true for every other stage, and DVC re-runs the one whose commit was cut."""
    from barkgpt.fileio import atomic_path

    lock, backup = root / "dvc.lock", lock_backup(root)
    if lock.exists():
        backup.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(backup) as tmp:
            shutil.copyfile(lock, tmp)
    repo.commit(target, force=True)
    backup.unlink(missing_ok=True)


def restore_interrupted_lock(root: Path) -> None:
    """Before the flow trusts dvc.lock: put back the copy kept by a commit that did not finish (its
    lock may be empty or cut short; the copy is true for every stage, and DVC re-runs the one whose
    commit was cut), then BarkError when the lock is empty or corrupt (barkgpt.dvclock.read_lock)."""
    import os

    from barkgpt.dvclock import read_lock

    backup = lock_backup(root)
    if backup.exists():
        os.replace(backup, root / "dvc.lock")
        print("dvc.lock: a commit of this flow was interrupted; restored the lock from before it "
              "(dvc status says which stage to re-run)")
    read_lock(root)


def describe(changes: list) -> str:
    parts = []
    for change in changes:
        if isinstance(change, dict):
            for kind, what in change.items():
                parts.append(f"{kind}: {', '.join(what) if isinstance(what, dict) else what}")
        else:
            parts.append(str(change))
    return "; ".join(parts)[:300]


def read_metrics(spec, lay: Layout) -> dict:
    out = {}
    for path in [*spec.metrics(lay), *spec.reports(lay)]:
        if path.suffix == ".json" and path.exists():
            out.update(small(json.loads(path.read_text())))
    return out


def small(result: dict) -> dict:
    """Numbers, strings and flags only: what a flow returns and a person reads in the UI."""
    return {k: v for k, v in (result or {}).items() if isinstance(v, (int, float, str, bool)) or v is None}


# --- what a person wants to see in the Prefect UI --------------------------------------------------

@task(name="report", cache_policy=NO_CACHE, persist_result=True, result_serializer="json")
def publish_report(params: dict, pipeline: str, root: str = ".") -> str:
    """The run report (what `barkgpt report` writes): reports/<pipeline>/report.md, attached to the
    model's MLflow run and shown as this flow run's one Markdown artifact, with a link to the MLflow
    run. A view of what is on disk, not a DVC output, so it runs every time (after a failure too)."""
    from barkgpt.report import report_markdown

    markdown = report_markdown(to_params(params), pipeline, Path(root))  # links to the MLflow run
    create_markdown_artifact(key=f"{pipeline}-report", markdown=markdown,
                             description=f"{pipeline}: data, training, evaluation, exports, deploy, timings")
    return str(Layout(pipeline, Path(root)).report_page)
