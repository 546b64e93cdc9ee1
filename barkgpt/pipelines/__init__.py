"""The pipelines, declared once each. The CLI, dvc.yaml and the Prefect flow derive from these.

Adding a pipeline: a module here declaring `PIPELINE` (its stages and the typed hooks of
base.Pipeline), its params section (barkgpt/params.py and params.yaml), and one line in REGISTRY.
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
