"""Shared fixtures: a tiny bark project, trained once per test session through the stage functions."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from barkgpt import stages
from barkgpt.params import load_params

ROOT = Path(__file__).resolve().parent.parent
SHARED_TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-valid.txt"


def make_project(folder: Path, overrides: dict | None = None) -> Path:
    """Copy params.yaml (merged with `overrides`) into `folder`, a stand-in project root."""
    from barkgpt.params import deep_merge

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(deep_merge(raw, overrides or {})))
    return folder


@pytest.fixture(scope="session")
def bark_project(tmp_path_factory) -> Path:
    """A project root where the default bark pipeline ran: data, tokens, checkpoint, metrics."""
    root = make_project(tmp_path_factory.mktemp("bark"))
    params = load_params(root / "params.yaml")
    stages.bark_data(params, root)
    stages.tokenize(params, "bark", root)
    stages.train(params, "bark", root, progress=False)
    stages.evaluate(params, "bark", root)
    return root


@pytest.fixture
def bark_copy(bark_project, tmp_path) -> Path:
    """A private copy of the trained bark project, for tests that modify files."""
    dest = tmp_path / "project"
    shutil.copytree(bark_project, dest)
    return dest


@pytest.fixture(scope="session")
def wikitext_path() -> Path:
    if not SHARED_TEXT.exists():
        pytest.skip(f"{SHARED_TEXT} is absent: the WikiText-2 sample lives in ../shared/data beside the repo")
    return SHARED_TEXT
