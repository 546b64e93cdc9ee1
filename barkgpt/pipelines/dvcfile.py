"""dvc.yaml from the pipeline declarations: the default pipeline in the root dvc.yaml (a plain
`dvc repro`), every other in pipelines/<name>/dvc.yaml (run in the root via wdir).

DVC reads the written files, as usual; `barkgpt dvc-yaml [PIPELINE ...]` rewrites them and
`barkgpt dvc-yaml --check` (and a test) fails when the committed ones disagree.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from barkgpt.fileio import write_text
from barkgpt.layout import Layout
from barkgpt.pipelines import REGISTRY
from barkgpt.pipelines.base import Pipeline, Stage

HEADER = """\
# Generated from the pipeline declarations in barkgpt/pipelines/ by `barkgpt dvc-yaml`: edit those,
# not this file (a test fails when the two disagree). {what}
# Each stage runs `barkgpt <stage> {name}` in the project root; `dvc repro{target}` runs what changed.
"""


def stage_entry(pipe: Pipeline, stage: Stage) -> dict:
    lay = Layout(pipe.name)
    out: dict = {}
    if not pipe.default:
        out["wdir"] = "../.."  # paths below are relative to the project root
    out["cmd"] = " ".join(["barkgpt", stage.name, pipe.name, *stage.dvc_flags])
    deps = [*pipe.stage_code(stage), *map(str, stage.deps(lay))]
    if deps:
        out["deps"] = deps
    params = [p.replace("{p}", pipe.name) for p in stage.params]
    if params:
        out["params"] = params
    outs = [{str(p): {"persist": True}} if stage.persist else str(p) for p in stage.outs(lay)]
    outs += [{str(p): {"cache": False}} for p in stage.reports(lay)]
    if outs:
        out["outs"] = outs
    metrics = [{str(p): {"cache": False}} for p in stage.metrics(lay)]
    if metrics:
        out["metrics"] = metrics
    plots = [{str(p): {"cache": False, **spec}} for p, spec in stage.plots(lay).items()]
    if plots:
        out["plots"] = plots
    return out


def render(pipe: Pipeline) -> str:
    what = ("The default pipeline." if pipe.default else
            "Kept apart from the root dvc.yaml so a plain `dvc repro` runs only the default pipeline.")
    target = "" if pipe.default else f" {pipe.dvc_file}"
    body = {} if pipe.default else {"vars": ["../../params.yaml"]}  # for ${...} in a stage, as in the root
    body["stages"] = {pipe.dvc_stage(s.name): stage_entry(pipe, s) for s in pipe.stages}
    text = yaml.safe_dump(body, sort_keys=False, default_flow_style=False, width=120)
    return HEADER.format(what=what, name=pipe.name, target=target) + text


def selected(names: list[str] | None = None) -> list[Pipeline]:
    """The named pipelines, or every declared one: each has its dvc.yaml in the repository, so every
    documented `dvc` command works on a fresh clone."""
    return [REGISTRY[n] for n in names] if names else list(REGISTRY.values())


def write_dvc_files(root: Path, names: list[str] | None = None) -> list[Path]:
    written = []
    for pipe in selected(names):
        path, text = Path(root) / pipe.dvc_file, render(pipe)
        if not path.exists() or path.read_text() != text:
            write_text(path, text)
            written.append(path)
    return written


def check_dvc_files(root: Path) -> list[str]:
    """The dvc.yaml files that are missing or differ from what the declarations say."""
    return [p.dvc_file for p in selected() if not (Path(root) / p.dvc_file).exists()
            or (Path(root) / p.dvc_file).read_text() != render(p)]

