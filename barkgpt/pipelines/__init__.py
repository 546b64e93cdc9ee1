"""The pipelines, declared once each. The CLI, dvc.yaml and the Prefect flow derive from these.

Adding a pipeline: a module here declaring `PIPELINE` (its stages, the typed hooks of
base.Pipeline and its params class, declared in the same module), its section in params.yaml, and
one line in REGISTRY. barkgpt/config.py composes the top-level params from the registry (the
shared sections are barkgpt/params.py's).
Then `barkgpt dvc-yaml` writes its DVC stages, their code dependencies derived (code_deps.py).
"""
from __future__ import annotations

from pathlib import Path

from barkgpt.errors import BarkError
from barkgpt.layout import Layout
from barkgpt.pipelines import bark, localtext, webtext
from barkgpt.pipelines.base import Pipeline, Stage

REGISTRY: dict[str, Pipeline] = {p.name: p for p in (bark.PIPELINE, webtext.PIPELINE, localtext.PIPELINE)}


def get(name: str) -> Pipeline:
    if name not in REGISTRY:
        raise BarkError(f"unknown pipeline {name!r}; choose one of {list(REGISTRY)}")
    return REGISTRY[name]


def run_stage(params, pipeline: str, stage: str, root: str | Path = ".", **options) -> dict:
    """Run one stage of one pipeline in this process (what every door ends up calling)."""
    pipe = get(pipeline)
    return pipe.stage(stage).run(params, pipe, Layout(pipeline, Path(root)), **options)


__all__ = ["REGISTRY", "Pipeline", "Stage", "get", "run_stage"]
