"""The run report: one Markdown page per run, written by `barkgpt report` and logged to MLflow."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from barkgpt.config import load_params
from barkgpt.pipelines import run_stage
from tests.conftest import ROOT, make_project

SMALL = {"bark": {"data": {"train_conversations": 300, "val_conversations": 60},
                  "train": {"max_steps": 60, "threads": 1, "eval_every": 30, "checkpoint_every": 30},
                  "gates": {"contract_samples": 30, "contract_accuracy": 0.001}}}


def test_report_page_has_every_section_and_the_run_gets_it(tmp_path):
    import mlflow

    root = make_project(tmp_path / "project", SMALL)
    params = load_params(root / "params.yaml")
    for stage in ("data", "validate", "tokenize"):
        run_stage(params, "bark", stage, root)
    run_stage(params, "bark", "train", root, progress=False)
    metrics = run_stage(params, "bark", "evaluate", root)
    out = subprocess.run([sys.executable, "-m", "barkgpt", "report", "bark"], cwd=root, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    page = (root / "reports/bark/report.md").read_text()
    for section in ("## Hardware", "## Data", "## Params that shaped the model", "## Training", "## Evaluation",
                    "## Quantization and parity", "## Deploy", "## Timings"):
        assert section in page, section
    assert "| cores |" in page and "107,392" in page  # hardware, and the bark model's parameter count
    assert "![loss curve](loss_curve.png)" in page and "| 60 |" in page  # the curve, and its last step
    assert f"| val_loss | {metrics['val_loss']:.4g} |" in page
    assert "Not exported yet." in page and "Not deployed." in page  # stages not run say so
    assert "](http" not in page.split("## Hardware")[1].split("## Deploy")[0]
    assert "![" not in page.replace("![loss curve](loss_curve.png)", "")  # nothing to fetch: the page works offline
    assert "/#/experiments/" in page.split("## Hardware")[0]  # a link to the run in the MLflow UI
    evaluation = page.split("## Evaluation")[1].split("## Quantization")[0]
    assert "{" not in evaluation and "[" not in evaluation  # readable: no raw dicts or lists
    assert "| contract | pass |" in evaluation and "Samples of `User: speak Assistant:`" in evaluation
    from barkgpt.report import inline_images, report_markdown

    shown = report_markdown(params, "bark", root)  # what the Prefect artifact shows: the curve inlined
    assert "![loss curve](data:image/png;base64,iVBOR" in shown and "](loss_curve.png)" not in shown
    assert inline_images("![x](missing.png)", root) == "![x](missing.png)"
    run_id = json.loads((root / "models/bark/mlflow_run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert "reports/report.md" in {f.path for f in client.list_artifacts(run_id, "reports")}
