"""params.yaml is written in the form DVC writes, so `dvc exp run -S` (and a flow's overrides)
change the one line they set, not the whole file's formatting."""
from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

BIN = Path(sys.executable).parent


def changed_lines(before: str, after: str) -> list[str]:
    return [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def test_params_yaml_is_what_dvc_writes(tmp_path):
    """DVC's own round trip (dvc.utils.serialize.modify_yaml, what `dvc exp run -S` uses) leaves
    the committed file byte for byte as it is."""
    from dvc.utils.serialize import modify_yaml

    copy = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", copy)
    with modify_yaml(str(copy)):
        pass
    assert changed_lines((ROOT / "params.yaml").read_text(), copy.read_text()) == [], \
        "params.yaml is not in DVC's form: rewrite it through dvc.utils.serialize.modify_yaml"


def test_flow_overrides_write_one_line_per_key(tmp_path):
    from tasks.common import write_overrides

    copy = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", copy)
    assert write_overrides(copy, {"bark": {"train": {"max_steps": 150}}}) == ["bark.train.max_steps"]
    diff = changed_lines((ROOT / "params.yaml").read_text(), copy.read_text())
    assert len(diff) == 2 and diff[1].split("#")[0].replace(" ", "") == "+max_steps:150", diff


def test_dvc_exp_run_set_param_is_a_one_line_diff(tmp_path):
    """The real thing: `dvc exp run -S bark.train.max_steps=150` in a git + DVC project (run for its
    first stage only, which that key does not reach: the edit is what is tested, not the training)."""
    from tests.test_orchestration import copy_project

    project = copy_project(tmp_path / "project")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "BARKGPT_WARM": "0", "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run([str(BIN / "dvc"), "exp", "run", "-S", "bark.train.max_steps=150", "bark-data"],
                         cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    numstat = subprocess.run(["git", "diff", "--numstat", "params.yaml"], cwd=project, capture_output=True,
                             text=True, check=True).stdout.split()
    assert numstat[:2] == ["1", "1"], subprocess.run(["git", "diff", "params.yaml"], cwd=project,
                                                     capture_output=True, text=True).stdout
    assert "max_steps: 150" in (project / "params.yaml").read_text()
