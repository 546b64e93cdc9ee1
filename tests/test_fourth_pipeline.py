"""A fourth pipeline, declared here as a pipeline module would be: its own declaration and hooks,
and its own params class, beside it. No library file changes for it (barkgpt/params.py composes the
top-level params from the registry): the stages, the gate, the registry's input example and
dvc.yaml ask the pipeline object, never its name."""
from __future__ import annotations

import dataclasses
import shutil

import pytest
import yaml

from pydantic import Field

from barkgpt.config import parse_params
from barkgpt.layout import Layout
from barkgpt.pipelines import REGISTRY, run_stage
from barkgpt.pipelines.dvcfile import render
from barkgpt.pipelines.webtext import WebtextPipeline, text_pipeline
from tests.conftest import ROOT


class FourthParams(WebtextPipeline):
    """The fourth pipeline's params section (`fourth:` in params.yaml), declared beside it."""

    source: str = Field("docs", description="a local text file or folder")
    prompt: str = Field("The pipeline", description="what parity completes greedily and MLflow shows")


def greedy_prompts(tok, val_lines, n_ctx):
    return [tok.encode(FourthParams().prompt)]


FOURTH = dataclasses.replace(
    text_pipeline("fourth", "a fourth pipeline: the project's docs, its own prompts", FourthParams,
                  local_source=True),
    greedy_prompts=greedy_prompts, input_example=lambda section: section.prompt)
SECTION = {"source": None, "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
           "train": {"max_steps": 20, "eval_every": 10, "threads": 1, "checkpoint_every": 10},
           "eval": {"max_new_tokens": 4, "max_batches": 4}, "gates": {"max_val_bpb": 100.0}}


@pytest.fixture
def fourth(monkeypatch, tmp_path):
    monkeypatch.setitem(REGISTRY, "fourth", FOURTH)  # the one line a new module adds to the registry
    shutil.copytree(ROOT / "docs", tmp_path / "corpus")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["fourth"] = {**SECTION, "source": str(tmp_path / "corpus")}
    raw["tracking"]["enabled"] = False
    return parse_params(raw), tmp_path  # the composed params now hold the fourth section


def test_a_fourth_pipeline_needs_no_library_edit(fourth):
    params, root = fourth
    for stage in ("ingest", "validate", "tokenizer", "tokenize", "validate-tokens", "train"):
        run_stage(params, "fourth", stage, root, **({"progress": False} if stage == "train" else {}))
    metrics = run_stage(params, "fourth", "evaluate", root)
    assert metrics["pipeline"] == "fourth" and metrics["val_bpb"] > 0
    assert metrics["gate_passed"] and [c["name"] for c in metrics["gate"]["checks"]] == ["val_bpb"]
    lay = Layout("fourth", root)
    assert lay.checkpoint.exists() and lay.summary.exists()
    assert isinstance(params.fourth, FourthParams) and FOURTH.input_example(params.fourth) == "The pipeline"
    # DVC's door: its own dvc.yaml, every stage with code dependencies derived from what it runs
    stages = yaml.safe_load(render(FOURTH))["stages"]
    assert stages["fourth-train"]["cmd"] == "barkgpt train fourth --quiet"
    assert "barkgpt/train.py" in stages["fourth-train"]["deps"]
    assert "fourth.model" in stages["fourth-train"]["params"]


def test_params_are_composed_from_the_registry(monkeypatch):
    """The top-level params name no pipeline: each registered pipeline adds its own section."""
    from barkgpt.config import params_class

    assert "fourth" not in params_class().model_fields
    monkeypatch.setitem(REGISTRY, "fourth", FOURTH)
    fields = params_class().model_fields
    assert fields["fourth"].annotation is FourthParams
    assert {name: fields[name].annotation for name in ("bark", "webtext", "localtext")} == \
        {name: pipe.params_class for name, pipe in REGISTRY.items() if name != "fourth"}
