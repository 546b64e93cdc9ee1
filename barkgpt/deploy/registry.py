"""Re-deploy a registered MLflow model version: stage its files as a project root, then deploy.

The registered version (`<tracking.model_prefix>-<pipeline>`, by number or by alias) carries the
checkpoint (one file with its own sha256) and the tokenizer; its run carries the evaluation metrics. They are
laid out as the pipeline would have written them, under <root>/.deploy-staging/<name>-v<N>/, so the
ordinary deploy step (gates, manifest, function) runs unchanged on them.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from barkgpt.config import Params
from barkgpt.errors import BarkError
from barkgpt.fileio import write_json
from barkgpt.layout import layout


def stage_model_version(params: Params, name: str, root: Path | str = ".", version: int | None = None,
                        alias: str | None = None) -> tuple[Path, dict]:
    """Download a registered version into a staging project root; returns (root, what was staged)."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    from barkgpt.tracking import open_store, resolve_uri

    root = Path(root)
    uri = resolve_uri(params.tracking, root)
    open_store(uri, (root / params.tracking.artifact_dir).resolve())
    model = f"{params.tracking.model_prefix}-{name}"
    alias = alias or params.tracking.champion_alias
    client = MlflowClient(uri, registry_uri=uri)
    try:
        mv = client.get_model_version(model, str(version)) if version else client.get_model_version_by_alias(model, alias)
    except Exception as err:
        which = f"version {version}" if version else f"alias @{alias}"
        raise BarkError(f"registered model {model} {which} not found in {uri} ({type(err).__name__}); "
                        "list versions in the MLflow UI, or run the pipeline to register one") from None
    if (mv.tags or {}).get("gate_passed") == "false":
        raise BarkError(f"{model} version {mv.version} did not pass its gates; only gated versions are deployed")
    staged = root / ".deploy-staging" / f"{name}-v{mv.version}"
    shutil.rmtree(staged, ignore_errors=True)
    lay = layout(name, staged)
    models, data, reports = lay.models, lay.data, lay.reports
    for folder in (models, data, reports):
        folder.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        # The version's own location: "models:/..." would resolve against the process-wide registry.
        local = Path(download_artifacts(artifact_uri=client.get_model_version_download_uri(model, mv.version),
                                        dst_path=tmp, tracking_uri=uri))
        found = {p.name: p for p in local.rglob("*") if p.is_file()}
        for file, dest in (("best.pt", models), ("tokenizer.json", data)):
            if file not in found:
                raise BarkError(f"{model} version {mv.version} has no {file} artifact; it cannot be deployed")
            shutil.copy2(found[file], dest / file)
        metrics_dir = Path(download_artifacts(run_id=mv.run_id, artifact_path="reports", dst_path=tmp + "/run",
                                              tracking_uri=uri))
        if (metrics_dir / "metrics.json").exists():
            shutil.copy2(metrics_dir / "metrics.json", reports / "metrics.json")
    write_json(lay.run_record, {"run_id": mv.run_id, "tracking_uri": uri})
    return staged, {"registered_model": model, "version": int(mv.version), "run_id": mv.run_id,
                    "staged_root": str(staged)}


def redeploy_model_version(params: Params, name: str, root: Path | str = ".", version: int | None = None,
                           alias: str | None = None, **options) -> dict:
    """Stage a registered version and deploy it (the PyTorch checkpoint it holds)."""
    from barkgpt.config import parse_params
    from barkgpt.deploy.deployer import deploy_pipeline
    from barkgpt.params import deep_merge

    staged, info = stage_model_version(params, name, root, version, alias)
    checkpoint_params = parse_params(deep_merge(params.model_dump(), {"deploy": {"artifact": "checkpoint"}}))
    report = deploy_pipeline(checkpoint_params, name, staged, **options)
    report["registered"] = info
    write_json(layout(name, root).deploy_report, report)
    return report
