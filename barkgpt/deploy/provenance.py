"""Provenance of a release: git commit, DVC data hash, parity summary, the MLflow run and model
version (with the sha256 of its files), recorded in the manifest and checked against the registry."""
from __future__ import annotations

import tempfile
from pathlib import Path


from barkgpt.fileio import read_json, sha256_file
from barkgpt.layout import layout
from barkgpt.tracking import hashes
from barkgpt.tracking.hashes import git_commit  # noqa: F401 (the release records it)


def parity_summary(root: Path, name: str, quant: str) -> dict | None:
    path = layout(name, root).parity_report
    if not path.exists():
        return None
    parity = read_json(path)
    keep = {k: v for k, v in parity.items() if isinstance(v, (int, float, bool, str))}
    keep.update({k: parity[k] for k in ("summary", "gate", "f32_parity") if k in parity})
    quants = parity.get("quantizations")
    if isinstance(quants, dict) and quant in quants:  # per-tensor types stay in parity.json
        keep["deploy_quantization"] = {quant: {k: v for k, v in quants[quant].items() if k != "tensor_types"}}
    return keep


def dvc_data_hash(root: Path, name: str) -> dict | None:
    """The md5s the pipeline's dvc.lock records for data/<name>/ outputs, and one hash over them."""
    return hashes.dvc_data_hash(layout(name, root))


def mlflow_provenance(root: Path, name: str) -> dict | None:
    """The MLflow run that trained the model (models/<name>/mlflow_run.json, written when the
    training was promoted) and the registered model version made from it, with the sha256 of that
    version's files, so the manifest can be checked against the registry. None when not tracked."""
    run_file = layout(name, root).run_record
    if not run_file.exists():
        return None
    info = read_json(run_file)
    out = {"run_id": info.get("run_id"), "tracking_uri": info.get("tracking_uri")}
    try:
        import mlflow
        from mlflow.artifacts import download_artifacts

        client = mlflow.MlflowClient(tracking_uri=info.get("tracking_uri"), registry_uri=info.get("tracking_uri"))
        versions = client.search_model_versions(f"run_id = '{info['run_id']}'")
        if not versions:
            return out
        v = max(versions, key=lambda mv: int(mv.version))
        model = client.get_registered_model(v.name)
        out.update({"registered_model": v.name, "version": int(v.version),
                    "aliases": sorted(a for a, ver in (model.aliases or {}).items() if str(ver) == str(v.version))})
        with tempfile.TemporaryDirectory() as tmp:
            # The version's own location, not "models:/...": that form resolves against the
            # process-wide registry URI, which need not be this project's store.
            local = Path(download_artifacts(artifact_uri=client.get_model_version_download_uri(v.name, v.version),
                                            dst_path=tmp, tracking_uri=info.get("tracking_uri")))
            out["artifact_sha256"] = {p.name: sha256_file(p) for p in sorted(local.rglob("*"))
                                      if p.is_file() and p.parent.name == "artifacts"}
    except Exception as err:  # provenance is a record, not a gate: note what failed and go on
        out["error"] = f"{type(err).__name__}: {err}"[:300]
    return out


def registry_matches(manifest: dict) -> dict[str, bool]:
    """For each released file that is also a file of the MLflow model version: same sha256?"""
    registered = ((manifest.get("provenance") or {}).get("mlflow") or {}).get("artifact_sha256") or {}
    return {f["name"]: registered[f["name"]] == f["sha256"] for f in manifest["files"].values()
            if f["name"] in registered}
