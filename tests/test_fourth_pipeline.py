"""A fourth pipeline, declared here as a pipeline module would be: its own declaration and hooks,
and its own params section. No library file changes for it: the stages, the gate, the registry's
input example and dvc.yaml ask the pipeline object, never its name."""
from __future__ import annotations

import dataclasses
import shutil

import pytest
import yaml

from barkgpt.layout import Layout
from barkgpt.params import LocaltextPipeline, Params
from barkgpt.pipelines import REGISTRY, run_stage
from barkgpt.pipelines.dvcfile import render
from barkgpt.pipelines.webtext import text_pipeline
from tests.conftest import ROOT


class FourthParams(Params):
    """The project's params plus the fourth pipeline's section (what its params.yaml section adds)."""

    fourth: LocaltextPipeline = LocaltextPipeline()


def greedy_prompts(tok, val_lines, n_ctx):
    return [tok.encode("The pipeline")]


FOURTH = dataclasses.replace(
    text_pipeline("fourth", "a fourth pipeline: the project's docs, its own prompts", local_source=True),
    greedy_prompts=greedy_prompts, input_example=lambda section: "The pipeline")
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
    return FourthParams.model_validate(raw), tmp_path


def test_a_fourth_pipeline_needs_no_library_edit(fourth):
    params, root = fourth
    for stage in ("ingest", "validate", "tokenizer", "tokenize", "validate-tokens", "train"):
        run_stage(params, "fourth", stage, root, **({"progress": False} if stage == "train" else {}))
    metrics = run_stage(params, "fourth", "evaluate", root)
    assert metrics["pipeline"] == "fourth" and metrics["val_bpb"] > 0
    assert metrics["gate_passed"] and [c["name"] for c in metrics["gate"]["checks"]] == ["val_bpb"]
    lay = Layout("fourth", root)
    assert lay.checkpoint.exists() and lay.summary.exists()
    # DVC's door: its own dvc.yaml, every stage with code dependencies derived from what it runs
    stages = yaml.safe_load(render(FOURTH))["stages"]
    assert stages["fourth-train"]["cmd"] == "barkgpt train fourth --quiet"
    assert "barkgpt/train.py" in stages["fourth-train"]["deps"]
    assert "fourth.model" in stages["fourth-train"]["params"]
