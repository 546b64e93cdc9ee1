"""Stage code dependencies derived from the import graph: an edit to any function a stage reaches
makes DVC call that stage stale; an edit to serving, deployment or the chat client re-runs nothing."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from barkgpt.pipelines import REGISTRY
from tests.conftest import ROOT, copy_worktree

BIN = Path(sys.executable).parent
# What the issue names for the export stage: the stage function's module, the pipeline's own module,
# the export code it calls, and the params (every default in code counts).
EXPORT_MUST_REACH = {"barkgpt/stages.py", "barkgpt/pipelines/bark.py", "barkgpt/export/pipeline.py",
                     "barkgpt/params.py"}
# Outside every stage: the chat client, the server, the deployment.
OUTSIDE = ("barkgpt/chat/client.py", "barkgpt/serve/app.py", "barkgpt/deploy/aws.py")


def code_of(pipeline: str, stage: str) -> list[str]:
    pipe = REGISTRY[pipeline]
    return pipe.stage_code(pipe.stage(stage))


def test_closures_are_what_each_stage_runs_and_no_more():
    assert EXPORT_MUST_REACH <= set(code_of("bark", "export"))
    assert "barkgpt/evaluate.py" in code_of("bark", "evaluate")  # imported lazily, inside bark's evaluate
    train = code_of("bark", "train")
    assert {"barkgpt/train.py", "barkgpt/model.py", "barkgpt/optim.py"} <= set(train)
    assert not [f for f in train if f.startswith(("barkgpt/export/", "barkgpt/serve/", "barkgpt/deploy/"))], train
    # the data stage does not depend on the evaluation its pipeline lends later stages
    assert "barkgpt/evaluate.py" not in code_of("bark", "data")
    for pipe in REGISTRY.values():
        for stage in pipe.stages:
            assert not set(OUTSIDE) & set(pipe.stage_code(stage)), (pipe.name, stage.name)


def edit_one_function(path: Path) -> None:
    """Add a statement at the end of the module's first function (or class): a real change to its code."""
    source = path.read_text()
    tree = ast.parse(source)
    func = next(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))
    last = func.body[-1]
    lines = source.splitlines(keepends=True)
    lines.insert(last.end_lineno, " " * last.col_offset + "_edited = None  # noqa\n")
    path.write_text("".join(lines))
    compile(path.read_text(), str(path), "exec")


def dvc(project: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"dvc {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out.stdout


def test_editing_any_module_a_stage_reaches_makes_dvc_call_it_stale(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to copy")
    project = copy_worktree(tmp_path / "copy")
    # The trained bark pipeline from the remote that ships with the repository, recorded against
    # this code: DVC sees nothing stale.
    dvc(project, "pull", "dvc.yaml")
    dvc(project, "commit", "-f", "dvc.yaml")
    assert json.loads(dvc(project, "status", "dvc.yaml", "--json")) == {}
    originals = {}
    closure = sorted(EXPORT_MUST_REACH | set(code_of("bark", "export")))
    for rel in closure:
        originals[rel] = (project / rel).read_text()
        edit_one_function(project / rel)
    status = json.loads(dvc(project, "status", "dvc.yaml:bark-export", "--json"))
    changed = {k for entry in status.get("bark-export", []) if isinstance(entry, dict)
               for k in entry.get("changed deps", {})}
    assert changed == set(closure), f"not seen by DVC: {sorted(set(closure) - changed)}"
    for rel, text in originals.items():
        (project / rel).write_text(text)
    # Serving, deployment and the chat client are no stage's code: nothing is stale, training included.
    for rel in OUTSIDE:
        edit_one_function(project / rel)
    assert json.loads(dvc(project, "status", "dvc.yaml", "--json")) == {}
