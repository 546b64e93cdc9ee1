"""What every stage task shares: a DVC-shaped cache key, retries for transient I/O, params handling.

A stage task is declared with `@stage_task("tokenize")`: the cache key is the one `dvc repro` would
use for the stage `<pipeline>-tokenize` in dvc.yaml (contents of its deps, values of its params),
so a re-run of the flow skips exactly the stages DVC would skip. Adding a stage to the flows is one
small function here-style plus one line in a flow.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff

from barkgpt.errors import BarkError
from barkgpt.fileio import sha256_file
from barkgpt.params import Params, parse_params

REPO = Path(__file__).resolve().parent.parent
TRANSIENT = (OSError, ConnectionError, TimeoutError)  # disk and network hiccups; worth a retry


@lru_cache(maxsize=8)
def _dvc_stages(dvc_yaml: str, mtime: float) -> dict:
    return (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages", {})


def dvc_stage(root: Path, stage: str) -> dict:
    """The stage's entry in dvc.yaml or pipelines/<pipeline>/dvc.yaml (the project's, else the code
    checkout's). Stages there run in the project root (wdir), so their paths are root-relative too."""
    base = root if (root / "dvc.yaml").exists() else REPO
    files = [base / "dvc.yaml", *sorted(base.glob("pipelines/*/dvc.yaml"))]
    for dvc_yaml in files:
        stages = _dvc_stages(str(dvc_yaml), dvc_yaml.stat().st_mtime)
        if stage in stages:
            return stages[stage]
    raise BarkError(f"stage {stage!r} is in none of {[str(f) for f in files]}; add it so Prefect and DVC agree")


def _paths(entries) -> list[str]:
    out = []
    for e in entries or []:
        out.extend(e.keys() if isinstance(e, dict) else [e])
    return out


def _hash_path(h, path: Path) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(sha256_file(f).encode() if f.exists() else b"missing")


def _dotted(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else None
    return d


@dataclass
class StageInputs(CachePolicy):
    """Cache key = dvc.yaml stage: its deps' contents and its params' values, in this project root.
    `run_stage` refreshes the record when the stage's outputs are gone from disk."""

    stage: str = ""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        root = Path(inputs.get("root", ".")).resolve()
        name = f"{inputs.get('name', 'bark')}-{self.stage}"
        spec = dvc_stage(root, name)
        h = hashlib.sha256(f"{name}|{root}".encode())
        for dep in _paths(spec.get("deps")):
            path = root / dep if (root / dep).exists() else REPO / dep
            h.update(dep.encode())
            _hash_path(h, path)
        for key in _paths(spec.get("params")):
            h.update(f"{key}={_dotted(inputs.get('params') or {}, key)!r}".encode())
        return h.hexdigest()


def outputs_missing(root: str | Path, stage: str) -> list[str]:
    spec = dvc_stage(Path(root).resolve(), stage)
    outs = _paths(spec.get("outs")) + _paths(spec.get("metrics")) + _paths(spec.get("plots"))
    return [o for o in outs if not (Path(root) / o).exists()]


def run_stage(stage_task, params: dict, root: str = ".", name: str = "bark"):
    """Call a stage task. A cached result is only worth returning if the files it describes are
    still there: when any output is missing the task runs and refreshes its cache record."""
    missing = outputs_missing(root, f"{name}-{stage_task.name}")
    return stage_task.with_options(refresh_cache=bool(missing))(params, root, name)


def transient_only(task, task_run, state) -> bool:
    """Retry I/O and network failures; a BarkError (bad input) fails at once, retrying cannot fix it."""
    try:
        err = state.result(raise_on_failure=False)
    except Exception as exc:  # noqa: BLE001 - the state holds the task's own exception
        err = exc
    return isinstance(err, TRANSIENT) and not isinstance(err, BarkError)


def stage_task(stage: str, retries: int = 2, **options):
    """Decorator: a Prefect task for the dvc.yaml stage `<pipeline>-<stage>`."""
    return task(
        name=stage,
        cache_policy=StageInputs(stage=stage),
        persist_result=True,
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=2),
        retry_condition_fn=transient_only,
        **options,
    )


def to_params(params: dict) -> Params:
    return parse_params(params, "flow parameters")


def run_tags() -> dict[str, str]:
    """Prefect ids for the MLflow run (barkgpt itself knows nothing of Prefect)."""
    from prefect.runtime import flow_run, task_run

    tags = {"prefect.flow_run_id": str(flow_run.id or ""), "prefect.flow_run_name": str(flow_run.name or ""),
            "prefect.task_run_id": str(task_run.id or "")}
    return {k: v for k, v in tags.items() if v}
