"""What a pipeline is: a name, its params section, and its stages in order.

A stage is a plain function `(params, pipeline, layout, **options) -> dict` plus what DVC needs
to judge it: its input files, its params, its outputs. The code it depends on is derived from the
import graph (barkgpt/pipelines/code_deps.py), never listed. The CLI, dvc.yaml
and the Prefect flow are all derived from these declarations (barkgpt/pipelines/dvcfile.py writes
dvc.yaml; a test fails when the committed file disagrees).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from barkgpt.errors import BarkError
from barkgpt.layout import Layout

Files = Callable[[Layout], list[Path]]


def no_files(lay: Layout) -> list[Path]:
    return []


@dataclass(frozen=True)
class Option:
    """A command-line option of a stage, e.g. train's --resume."""

    flags: tuple[str, ...]
    dest: str
    help: str
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str  # the sub-command (`barkgpt <name> <pipeline>`) and the DVC stage `<pipeline>-<name>`
    run: Callable[..., dict]  # (params, pipeline, layout, **options) -> summary of what it wrote
    help: str
    deps: Files = no_files  # input files (another stage's outputs)
    params: tuple[str, ...] = ()  # dotted params keys; "{p}" stands for the pipeline's section
    outs: Files = no_files  # outputs DVC caches and pushes
    persist: bool = False  # keep `outs` while the stage runs (DVC deletes them first otherwise)
    reports: Files = no_files  # outputs kept in git-ignored reports/, not cached (HTML pages, samples)
    metrics: Files = no_files  # small JSON files `dvc metrics show` reads
    plots: Callable[[Layout], dict[Path, dict]] = lambda lay: {}
    options: tuple[Option, ...] = ()
    dvc_flags: tuple[str, ...] = ()  # options the DVC door always passes (e.g. --quiet)
    describe: Callable[[dict], str] | None = None  # what it wrote, for a person (the CLI prints it); else JSON


@dataclass(frozen=True)
class Pipeline:
    name: str
    description: str
    stages: tuple[Stage, ...]
    params_class: type  # its params section's class (`<name>:` in params.yaml), declared in its module
    section: Callable[[Any], Any]  # Params -> this pipeline's params section
    metric: str  # what evaluation reports and promotion ranks by
    higher_is_better: bool
    evaluate: Callable[..., tuple[dict, dict]]  # (params, pipeline, layout) -> (metrics, samples)
    suites: Callable[..., list]  # (params, layout) -> Great Expectations suites over the text splits
    token_suites: Callable[..., list]  # (params, layout) -> suites over the token shards
    greedy_prompts: Callable[..., list]  # (tokenizer, val lines, n_ctx) -> token ids parity completes greedily
    input_example: Callable[[Any], str]  # (section) -> the prompt MLflow's model version shows as its example
    modelfile: Callable[[Any], list[str]]  # (section) -> an Ollama Modelfile's template and parameters
    # (metric key, short name): the few numbers `dvc metrics show` lists, so a row stays readable
    # (metric, name) pairs for reports/<p>/summary.json, what `dvc metrics show` and `dvc exp show`
    # print: the headline only, so a sweep's table (two params, Created, the experiment) fits 120
    # columns; metrics.json and the MLflow run keep every metric.
    summary: tuple[tuple[str, str], ...] = ()
    tokens: Callable[..., Any] | None = None  # (params, layout) -> tokenizer, for the tokenize stage
    eos_per_line: bool = True  # the tokenizer appends EOS to each line (bark lines spell their own)
    gate_test: Callable[[Any], dict | None] = lambda gates: None  # (gates) -> the statistical test behind the gate

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise BarkError(f"pipeline {self.name!r} has no stage {name!r}; its stages: "
                        f"{[s.name for s in self.stages]}")

    def has(self, name: str) -> bool:
        return any(s.name == name for s in self.stages)

    def params(self, params) -> Any:
        return self.section(params)

    @property
    def default(self) -> bool:
        """In the root dvc.yaml (what a plain `dvc repro` runs); the others in pipelines/<name>/."""
        return Layout(self.name).is_default

    @property
    def dvc_file(self) -> str:
        """Where its DVC stages live, relative to the project root (the layout says)."""
        return Layout(self.name).dvc_file.as_posix()

    def dvc_stage(self, stage: str) -> str:
        return f"{self.name}-{stage}"

    def hooks(self) -> dict[str, list]:
        """What this pipeline lends its stages, by field name (its evaluation, tokenizer, suites,
        params section): the functions and classes a stage reaches by asking the pipeline object."""
        from barkgpt.pipelines.code_deps import callables_of

        return {f.name: callables_of(getattr(self, f.name)) for f in fields(self) if f.name != "stages"}

    def stage_code(self, stage: Stage) -> list[str]:
        """The project files whose change makes `stage`'s outputs stale: the closure of the stage
        function in the import graph, with the pipeline hooks it uses (code_deps.py)."""
        from barkgpt.pipelines.code_deps import stage_code

        hooks = self.hooks()
        # the params section's class counts always: a default changed in code changes what a stage does
        return stage_code(stage.run, hooks, always=hooks.pop("section"), data=hooks.pop("params_class"))
