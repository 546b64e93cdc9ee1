"""MLflow model registry: one version per trained model, `champion` on the best gate-passing one.

A version is known by its checkpoint's sha256 (tag `sha256.best.pt`): evaluating the same model
again (other evaluation params, another door, a re-run) updates that version's tags instead of
registering another. Every version carries the sha256 of its files, the data hashes of the
project's current dvc.lock, the evaluation verdict and the pipeline's ranking metrics. The
`champion` alias goes to the best gate-passing version by the pipeline's metric (`ranking`), not
to the newest; when no version passes, there is no champion.
"""
from __future__ import annotations

import math
from pathlib import Path

from barkgpt.fileio import sha256_file
from barkgpt.tracking.hashes import dvc_data_md5, tokens_sha256

CHECKPOINT_TAG = "sha256.best.pt"
REPORT_TAGS = {"metrics": "report.metrics_sha256", "parity": "report.parity_sha256"}  # by report stem
SWEEP_TAG = "sweep.study"  # on a sweep's parent run and its trials' runs (barkgpt/tracking/sweeps.py)


def ranking(metric: str, higher_is_better: bool) -> list[tuple[str, str]]:
    """The pipeline's declared metric (barkgpt/pipelines/), then validation loss to break ties:
    bark's contract accuracy saturates at 1.0 for any good model. [(metric, "max" | "min")]."""
    order = [(metric, "max" if higher_is_better else "min")]
    return order if metric == "val_loss" else order + [("val_loss", "min")]


def model_name(params, name: str) -> str:
    return f"{params.tracking.model_prefix}-{name}"


def model_files(paths) -> dict[str, Path]:
    """The files a registered version is made of (a checkpoint is one file, its sha256 inside)."""
    files = {"best.pt": paths.checkpoint, "tokenizer.json": paths.tokenizer}
    return {k: f for k, f in files.items() if f.exists()}


def version_tags(paths, order: list[tuple[str, str]], metrics: dict, gate_passed: bool) -> dict[str, str]:
    tags = {f"sha256.{k}": sha256_file(f) for k, f in model_files(paths).items()}
    tags.update({f"dvc.md5.{path}": md5 for path, md5 in dvc_data_md5(paths).items()})
    if sha := tokens_sha256(paths):
        tags["data.tokens_sha256"] = sha
    tags["gate_passed"] = str(bool(gate_passed)).lower()
    if paths.metrics.exists():  # the report as written: deploy refuses one edited since (report_tag_agrees)
        tags[REPORT_TAGS["metrics"]] = sha256_file(paths.metrics)
    for metric, _ in order:
        if isinstance(metrics.get(metric), (int, float)):
            tags[f"eval.{metric}"] = repr(float(metrics[metric]))
    return tags


def find_version(client, model: str, checkpoint_sha256: str):
    """The registered version made from this checkpoint, or None."""
    for mv in client.search_model_versions(f"name='{model}'"):
        if (mv.tags or {}).get(CHECKPOINT_TAG) == checkpoint_sha256:
            return mv
    return None


def register(run, metrics: dict, gate_passed: bool, order: list[tuple[str, str]], input_example: str,
             description: str = "") -> dict:
    """Register the run's model once (a known checkpoint only gets fresh tags), then elect the champion."""
    mlflow, client, p, params, name = run.mlflow, run.client, run.paths, run.params, run.name
    if gate_passed:  # a champion candidate must be the model its gate judged, byte for byte
        from barkgpt.gates import verify_judged

        verify_judged(p.metrics, {"checkpoint": p.checkpoint, "tokenizer": p.tokenizer})
    model = model_name(params, name)
    tags = version_tags(p, order, metrics, gate_passed)
    mv = find_version(client, model, tags.get(CHECKPOINT_TAG, "")) if CHECKPOINT_TAG in tags else None
    if mv is None:
        mv = mlflow.register_model(log_model(run, input_example), model, tags=tags)
    else:
        for key, value in tags.items():
            client.set_model_version_tag(model, mv.version, key, value)
    describe(client, run, model, mv.version, metrics, gate_passed, order, description)
    if in_sweep(client, run.run_id):  # a sweep elects once, when all its trials are in (barkgpt/sweep/)
        current = (client.get_registered_model(model).aliases or {}).get(params.tracking.champion_alias)
        champion = None if current is None else int(current)
    else:
        champion = elect_champion(client, model, order, params.tracking.champion_alias)
    return {"run_id": run.run_id, "registered_model": model, "version": int(mv.version),
            "champion": champion == int(mv.version), "champion_version": champion}


def in_sweep(client, run_id: str) -> bool:
    """A sweep's trial: its run is nested under the sweep's parent run (barkgpt/tracking/sweeps.py)."""
    tags = client.get_run(run_id).data.tags or {}
    return SWEEP_TAG in tags and tags.get("sweep.role") != "parent"


def describe(client, run, model: str, version, metrics: dict, gate_passed: bool,
             order: list[tuple[str, str]], description: str = "") -> None:
    """Descriptions the registry page shows: what the model is (`description`: the pipeline's own)
    and how its champion is chosen; what each version is (the run name says what trained it), its
    metrics and gate verdict."""
    alias = run.params.tracking.champion_alias
    ranked = ", then ".join(f"{'highest' if d == 'max' else 'lowest'} {m}" for m, d in order)
    client.update_registered_model(model, description=(
        f"BarkGPT {description or run.name}. One version per trained model (a re-evaluation updates its tags). "
        f"The `{alias}` alias is on the best version whose gates passed ({ranked}); none passes, no alias. "
        f"Load it with `mlflow.pyfunc.load_model('models:/{model}@{alias}')`."))
    shown = [f"{m} {metrics[m]:.4g}" for m, _ in order if isinstance(metrics.get(m), (int, float))]
    client.update_model_version(model, str(version), description=(
        f"{client.get_run(run.run_id).info.run_name}. {', '.join(shown)}; gate {'passed' if gate_passed else 'FAILED'}. "
        f"Files: best.pt and tokenizer.json (sha256 in the tags)."))


def log_model(run, prompt: str) -> str:
    """Log the MLflow model (from code: barkgpt/mlflow_model.py; nothing pickled) with an input
    example, and return its URI."""
    from importlib import metadata

    from barkgpt import mlflow_model

    mlflow, p, params, name = run.mlflow, run.paths, run.params, run.name
    eval_cfg = getattr(params, name).eval
    artifacts = {"checkpoint": str(p.checkpoint), "tokenizer": str(p.tokenizer)}
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    with mlflow.start_run(run_id=run.run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=mlflow_model.__file__, artifacts=artifacts,
            model_config={"temperature": eval_cfg.temperature, "top_k": eval_cfg.top_k,
                          "top_p": eval_cfg.top_p, "max_new_tokens": eval_cfg.max_new_tokens, "sample_seed": 0},
            # given, not inferred: inferring would load the model and generate once more here
            signature=ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")])),
            input_example=[prompt],
            # the torch this model was trained with (the project pins it: constraints.txt)
            pip_requirements=["barkgpt", f"torch=={metadata.version('torch')}", "numpy", "pydantic", "pyyaml"],
        )
    return info.model_uri


def _rank_key(mv, order: list[tuple[str, str]], run_metrics) -> tuple | None:
    """Sort key (smaller is better) from the version's eval.* tags (or its run's metrics for versions
    registered before those tags existed); None when the pipeline's metric is unknown."""
    key = []
    for metric, direction in order:
        raw = (mv.tags or {}).get(f"eval.{metric}")
        value = float(raw) if raw is not None else run_metrics(mv.run_id).get(f"eval.{metric}")
        if value is None or not math.isfinite(value):
            if not key:
                return None
            value = math.inf if direction == "min" else -math.inf
        key.append(-value if direction == "max" else value)
    return (*key, -int(mv.version))  # a tie goes to the newer version


def best_version(versions, order: list[tuple[str, str]], run_metrics=lambda run_id: {}) -> int | None:
    ranked = []
    for mv in versions:
        if (mv.tags or {}).get("gate_passed") != "true":
            continue
        key = _rank_key(mv, order, run_metrics)
        if key is not None:
            ranked.append((key, int(mv.version)))
    return min(ranked)[1] if ranked else None


def elect_champion(client, model: str, order: list[tuple[str, str]], alias: str) -> int | None:
    """Point `alias` at the best gate-passing version; remove it when none passes."""
    cache: dict[str, dict] = {}

    def run_metrics(run_id: str) -> dict:
        if run_id not in cache:
            try:
                cache[run_id] = dict(client.get_run(run_id).data.metrics)
            except Exception:  # a run deleted from the store: its version cannot be ranked
                cache[run_id] = {}
        return cache[run_id]

    best = best_version(client.search_model_versions(f"name='{model}'"), order, run_metrics)
    current = (client.get_registered_model(model).aliases or {}).get(alias)
    if best is None:
        if current is not None:
            client.delete_registered_model_alias(model, alias)
    elif str(current) != str(best):
        client.set_registered_model_alias(model, alias, str(best))
    return best


def tag_export(client, run_id: str, paths, report: dict) -> list[str]:
    """Tag the version of the current checkpoint (else the run's versions) with the parity verdict and
    the sha256 of every exported file the parity report judged."""
    checkpoint = model_files(paths).get("best.pt")
    versions = []
    if checkpoint is not None:
        sha = sha256_file(checkpoint)
        versions = [mv for mv in client.search_model_versions(f"run_id='{run_id}'")
                    if (mv.tags or {}).get(CHECKPOINT_TAG) in (sha, None)]
    gate = report.get("gate", {})
    deploy_file = paths.root / gate["deploy_file"] if gate.get("deploy_file") else None
    tags = {"parity.deploy_passed": str(gate.get("deploy_passed")).lower(),
            "gguf.deploy_file": Path(gate.get("deploy_file") or "").name,
            "gguf.deploy_sha256": sha256_file(deploy_file) if deploy_file and deploy_file.exists() else "",
            REPORT_TAGS["parity"]: sha256_file(paths.parity_report) if paths.parity_report.exists() else ""}
    for variant, entry in (report.get("files") or {}).items():
        if entry.get("sha256"):
            tags[f"sha256.{Path(entry.get('path') or variant).name}"] = entry["sha256"]
    for mv in versions:
        for key, value in tags.items():
            client.set_model_version_tag(mv.name, mv.version, key, value)
    return [f"{mv.name}/{mv.version}" for mv in versions]


def report_disagreement(client, model: str, checkpoint_sha256: str, report_path: Path, verdict_passed: bool,
                        stage: str) -> str | None:
    """None when the registry's version of this checkpoint agrees with the report (the same bytes as
    when the stage wrote it, the same gate verdict) or holds no version of it; else what differs."""
    mv = find_version(client, model, checkpoint_sha256)
    if mv is None:
        return None
    tags = mv.tags or {}
    recorded = tags.get(REPORT_TAGS.get(Path(report_path).stem, ""))
    if recorded and recorded != sha256_file(report_path):
        return (f"{report_path} is not the report the {stage} stage wrote for {model} version {mv.version} (its "
                f"sha256 differs from the registry's); re-run the {stage} stage")
    passed = tags.get("gate_passed" if stage == "evaluate" else "parity.deploy_passed")
    if passed in ("true", "false") and (passed == "true") != verdict_passed:
        return (f"{report_path} passes its gate, but the registry tags {model} version {mv.version} "
                f"gate_passed={passed}; re-run the {stage} stage")
    return None
