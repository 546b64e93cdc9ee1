"""Pipelines declared once: dvc.yaml derived from the declarations, a third pipeline through every
door (the Prefect flow, `dvc repro` running the CLI, the CLI), DVC the one judge of staleness, and
no pickle from Prefect's result storage ever loaded."""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from barkgpt.pipelines import REGISTRY
from barkgpt.pipelines.dvcfile import check_dvc_files, render
from tests.conftest import ROOT
from tests.test_orchestration import copy_project

BIN = Path(sys.executable).parent
# The localtext pipeline, tiny: a few steps on the project's docs, one quantization, lenient gates.
TINY = {
    "localtext.model.n_embd": 32, "localtext.model.n_head": 2, "localtext.model.block_size": 32,
    "localtext.train.max_steps": 20, "localtext.train.eval_every": 10, "localtext.train.threads": 1,
    "localtext.eval.max_new_tokens": 4, "localtext.eval.max_batches": 4,
    "export.quantizations": ["q8_0"], "export.f16": False, "export.hf": False, "export.bpb_tokens": 256,
    "export.max_bpb_delta": {"q8_0": 1.0}, "tracking.enabled": False,
}


def env_for(project: Path) -> dict:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(project),
            "PREFECT_HOME": str(project / ".prefect"), "GX_ANALYTICS_ENABLED": "False", "TQDM_DISABLE": "1"}


def sh(cmd: list[str], project: Path, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=project, env=env_for(project), capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, f"{cmd}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_dvc_yaml_is_what_the_declarations_say():
    assert check_dvc_files(ROOT) == [], "run `barkgpt dvc-yaml` and commit dvc.yaml"
    for pipe in REGISTRY.values():
        stages = yaml.safe_load(render(pipe))["stages"]
        assert list(stages) == [f"{pipe.name}-{s.name}" for s in pipe.stages]
        for stage in pipe.stages:
            assert stages[f"{pipe.name}-{stage.name}"]["cmd"].startswith(f"barkgpt {stage.name} {pipe.name}")


class Payload:
    """Unpickling this creates a marker file: proof that a pickle from the results folder was loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


PLANTED = ("data", "validate", "localtext-ingest", "0" * 64, "results")


def test_a_third_pipeline_through_dvc_the_cli_and_the_prefect_flow(tmp_path):
    project = copy_project(tmp_path / "project")
    # Pickles planted where Prefect keeps results, under names a cache key could have: never loaded.
    storage, marker = project / ".prefect" / "storage", tmp_path / "pwned"
    storage.mkdir(parents=True)
    for name in PLANTED:
        (storage / name).write_bytes(pickle.dumps(Payload(str(marker))))
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}")]
    # 1. The Prefect flow, its settings as overrides: every stage stale, each judged by DVC, run; the
    # run saved as a DVC experiment, and the workspace (params.yaml, lock, outputs) left as it was.
    params_before = (project / "params.yaml").read_bytes()
    first = sh([sys.executable, "-m", "flows.pipeline", "localtext", "--no-deploy", *sets], project)
    log = first.stdout + first.stderr
    for stage in REGISTRY["localtext"].stages:
        assert f"localtext-{stage.name}: stale" in log, log[-3000:]
    assert (project / "params.yaml").read_bytes() == params_before
    assert not (project / "pipelines/localtext/dvc.lock").exists()
    assert not (project / "exports/localtext/quantized/localtext-q8_0.gguf").exists()
    name = re.search(r"saved as DVC experiment (\S+):", log).group(1)
    assert name in sh([str(BIN / "dvc"), "exp", "ls", "--name-only"], project).stdout
    # Kept: the workspace now holds the run. DVC checks out every stage of the project, and the bark
    # pipeline never ran here, so apply names bark's outputs (docs/experiments.md) and exits non-zero.
    applied = sh([str(BIN / "dvc"), "exp", "apply", name], project, check=False)
    failed = applied.stderr.split("Checkout failed for following targets:")[-1].split("Is your cache")[0].split()
    assert applied.returncode == 0 or (failed and all("bark" in f for f in failed)), applied.stderr[-3000:]
    assert (project / "pipelines/localtext/dvc.yaml").exists() and (project / "pipelines/localtext/dvc.lock").exists()
    assert (project / "exports/localtext/quantized/localtext-q8_0.gguf").exists()
    # 2. DVC agrees: nothing is stale, `dvc repro` runs nothing.
    status = sh([str(BIN / "dvc"), "status", "pipelines/localtext/dvc.yaml"], project)
    assert "changed" not in status.stdout, status.stdout
    repro = sh([str(BIN / "dvc"), "repro", "pipelines/localtext/dvc.yaml"], project)
    assert "Running stage" not in repro.stdout, repro.stdout
    # 3. A params change through DVC's own door re-runs exactly the stages it reaches, by the CLI.
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["localtext"]["train"]["max_steps"] == 20  # the experiment's values, applied
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace(
        "max_new_tokens: 4", "max_new_tokens: 5"))
    repro = sh([str(BIN / "dvc"), "repro", "pipelines/localtext/dvc.yaml"], project)
    ran = [line for line in repro.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'pipelines/localtext/dvc.yaml:localtext-evaluate':"], repro.stdout
    # 4. The CLI door on its own: one stage, the same function.
    out = sh(["barkgpt", "evaluate", "localtext"], project)
    assert '"val_bpb"' in out.stdout
    # 5. The flow again: training is up to date; whatever it re-ran, DVC is clean after it.
    again = sh([sys.executable, "-m", "flows.pipeline", "localtext", "--no-deploy"], project)
    assert "localtext-train: up to date (dvc status); not run" in again.stdout + again.stderr
    assert "changed" not in sh([str(BIN / "dvc"), "status", "pipelines/localtext/dvc.yaml"], project).stdout
    assert not marker.exists()  # no planted pickle was loaded
    persisted = [f for f in storage.iterdir() if f.name not in PLANTED]
    assert persisted, "the flow persisted no task results: a failed flow run could not be retried from its failed task"
    for record in persisted:  # every result Prefect wrote is JSON (nothing a load could unpickle)
        data = json.loads(record.read_bytes())
        if isinstance(data, dict) and "metadata" in data:  # a result record: its value serialized as JSON too
            assert data["metadata"]["serializer"]["type"] == "json", record


def test_fresh_clone_pulls_the_bark_pipeline_and_every_door_agrees(tmp_path):
    """A clone gets the trained bark pipeline from the DVC remote that ships in the repository
    (.dvc-remote/); after the Prefect flow, `dvc status` is clean and `dvc repro` runs nothing."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, capture_output=True, timeout=120)
    dvc = str(BIN / "dvc")
    # What the docs ask for every pipeline's plan on a fresh clone (docs/orchestration.md, section 4)
    sh([dvc, "status", "-R", "pipelines"], clone)
    # ... and why: DVC 3.67's dry run hashes a dependency no stage has written yet (treeverse/dvc#9818).
    # When this fails, DVC has fixed it: the docs may show `dvc repro -R pipelines --dry` again.
    dry = sh([dvc, "repro", "-R", "pipelines", "--dry"], clone, check=False)
    assert dry.returncode != 0 and "No such file or directory" in dry.stdout + dry.stderr, dry.stdout[-2000:]
    pull = sh([dvc, "pull", "dvc.yaml"], clone, check=False)  # the other pipelines' outputs are in no remote
    assert pull.returncode == 0, ("dvc pull failed in a fresh clone: after changing the bark pipeline, run "
                                  "`dvc repro && dvc push` and commit dvc.lock, reports/ and .dvc-remote/\n"
                                  + pull.stdout[-2000:] + pull.stderr[-2000:])
    pulled = [f for f in ("data/bark/train.txt", "models/bark/best.pt") if (clone / f).exists()]
    assert pulled == ["data/bark/train.txt", "models/bark/best.pt"], pulled
    sh([dvc, "repro", "--dry"], clone)  # with bark's outputs there, its dry run works
    # A plain pull also asks for the WebText and localtext outputs, which no lock records and no
    # remote holds: it exits 1 after fetching bark's files; --allow-missing exits 0 (docs/orchestration.md)
    plain = sh([dvc, "pull"], clone, check=False)
    assert plain.returncode == 1 and "data/webtext/train.txt" in plain.stdout + plain.stderr, plain.stderr[-2000:]
    sh([dvc, "pull", "--allow-missing"], clone)
    # Bytecode Python writes beside a code dependency is not a change to it (.dvcignore).
    (clone / "barkgpt/lm/__pycache__").mkdir(exist_ok=True)
    (clone / "barkgpt/lm/__pycache__/planted.cpython-311.pyc").write_bytes(b"\0")
    assert "barkgpt/lm" not in sh([dvc, "status", "dvc.yaml"], clone).stdout
    # The flow asks DVC about every stage: what the code changed since dvc.lock was made runs (the
    # rest is up to date); afterwards DVC and the flow agree that nothing is stale.
    flow = sh([sys.executable, "-m", "flows.pipeline", "bark", "--no-deploy"], clone)
    log = flow.stdout + flow.stderr
    for stage in REGISTRY["bark"].stages:
        assert f"bark-{stage.name}: " in log, log[-3000:]
    assert "bark-data: up to date (dvc status); not run" in log
    assert "changed" not in sh([dvc, "status", "dvc.yaml"], clone).stdout  # the other pipelines never ran here
    assert "Running stage" not in sh([dvc, "repro"], clone).stdout
