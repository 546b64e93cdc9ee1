"""The stage task: DVC decides whether a stage is stale, the stage runs, DVC records it.

One task for every stage of every pipeline. `dvc status` judges the stage (its code, inputs,
params and outputs as dvc.yaml declares them); a stale stage runs here, in this process, through
the same function its `barkgpt <stage> <pipeline>` command calls (so its logs and errors reach
Prefect), and `dvc commit` records it in dvc.lock. A second run does nothing, through any door,
and `dvc status` is clean after a flow. Results are small JSON summaries, never pickles, and are
not persisted: DVC, not Prefect's result cache, is the record of what ran.
"""
from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
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


# Retries only for transient I/O (a BarkError, e.g. a failed gate or bad data, fails at once).
@task(name="stage", cache_policy=NO_CACHE, persist_result=False, retries=2,
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
        try:
            result = spec.run(to_params(params), pipe, lay, **options)
        finally:
            publish(stage, pipe, lay)  # also (above all) when a check or a gate failed
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

def publish(stage: str, pipe, lay: Layout) -> None:
    if stage == "validate" and lay.validation_report.exists():
        publish_validation(json.loads(lay.validation_report.read_text()), pipe.name)
    elif stage == "validate-tokens" and lay.token_validation_report.exists():
        publish_validation(json.loads(lay.token_validation_report.read_text()), f"{pipe.name}-tokens")
    elif stage == "evaluate" and lay.metrics.exists():
        publish_evaluation(json.loads(lay.metrics.read_text()), lay, pipe.name)
    elif stage == "parity" and lay.parity_report.exists():
        publish_parity(json.loads(lay.parity_report.read_text()), pipe.name)


def publish_validation(report: dict, key: str) -> None:
    rows = [f"| {s['suite']} | {c['expectation']} | {c['column']} | {'pass' if c['success'] else '**FAIL**'} | "
            f"{c['unexpected_count']} | {', '.join(map(str, c['unexpected_rows'][:10]))} |"
            for s in report["suites"] for c in s["checks"]]
    status = "passed" if report["success"] else "FAILED"
    create_markdown_artifact(
        key=f"{key}-validation",
        markdown="\n".join([f"# Data validation ({key}): {status}",
                            f"{report['expectations'] - report['failed']} of {report['expectations']} "
                            "expectations passed.", "",
                            "| suite | expectation | column | result | unexpected | rows |",
                            "|---|---|---|---|---|---|", *rows]),
        description=f"Great Expectations result for the {key} data",
    )


def publish_evaluation(metrics: dict, lay: Layout, name: str) -> None:
    table = [{"metric": k, "value": v} for k, v in metrics.items() if isinstance(v, (int, float, bool))]
    table += [{"metric": f"ood: {k}", "value": v} for k, v in metrics.get("ood_contract_rate", {}).items()]
    create_table_artifact(key=f"{name}-metrics", table=table, description=f"{name} evaluation metrics")
    samples = json.loads(lay.samples.read_text()) if lay.samples.exists() else {}
    lines = [f"# Sample generations ({name})", ""]
    if "completions" in samples:
        lines += [f"Prompt: `{samples.get('prompt', '')}`", ""] + [f"- `{c}`" for c in samples["completions"][:10]]
        for prompt, outs in samples.get("ood", {}).items():
            lines += ["", f"Out-of-distribution prompt `{prompt}`:"] + [f"- `{c}`" for c in outs]
    else:
        lines += [f"- `{prompt}` → `{text}`" for prompt, text in samples.items()]
    create_markdown_artifact(key=f"{name}-samples", markdown="\n".join(lines),
                             description=f"{name} completions sampled by the evaluation")


def publish_parity(report: dict, name: str) -> None:
    rows = [{"file": q, "status": e.get("status"), "metric": e.get("metric"), "value": e.get("value"),
             "delta_vs_pytorch": e.get("delta"), "size_ratio_vs_f32": e.get("size_ratio_vs_f32"),
             "reason": e.get("reason")}
            for q, e in report.get("quantizations", {}).items()]
    passed = (report.get("gate") or {}).get("deploy_passed")
    create_table_artifact(key=f"{name}-parity", table=rows,
                          description=f"{name}: llama.cpp quantizations vs PyTorch (deploy gate passed: {passed})")


@task(name="report", cache_policy=NO_CACHE, persist_result=False)
def publish_report(params: dict, pipeline: str, root: str = ".") -> str:
    """The run report (what `barkgpt report` writes): reports/<pipeline>/report.md, attached to the
    model's MLflow run and shown as this flow run's Markdown artifact. A view of what is on disk,
    not a DVC output, so it runs every time."""
    from barkgpt.report import report_markdown

    markdown = report_markdown(to_params(params), pipeline, Path(root))
    create_markdown_artifact(key=f"{pipeline}-report", markdown=markdown,
                             description=f"{pipeline}: hardware, data, training, evaluation, exports, timings")
    return str(Layout(pipeline, Path(root)).reports / "report.md")
