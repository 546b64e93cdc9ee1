"""MLflow tracking and registry: one MLflow run per trained model, whichever door ran the stages.

The train stage opens the run (params, tags, per-step metrics, checkpoint) and records its id in
`models/<pipeline>/mlflow_run.json`, next to the checkpoint; the evaluate stage, often a separate
process (DVC runs one per stage), reopens that run to add the final metrics and samples, registers
the model `<prefix>-<pipeline>` and moves the champion alias only when the gates pass.

Where runs go: `tracking.uri` in params.yaml (default: SQLite `mlflow.db` in the project, artifacts
in `mlruns/`), or the `MLFLOW_TRACKING_URI` environment variable (a tracking server).
"""
from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from barkgpt.errors import BarkError
from barkgpt.fileio import read_json, sha256_file, write_json
from barkgpt.params import Params, TrackingParams, flatten



# --- where and whether to track -----------------------------------------------------------------

def resolve_uri(cfg: TrackingParams, root: Path) -> str:
    """MLFLOW_TRACKING_URI wins; a relative sqlite/file path in params.yaml resolves in the project."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(Path(root) / uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:  # a plain folder: MLflow's file store
        return str((Path(root) / uri).resolve())
    return uri


def check_server(uri: str, timeout: float) -> None:
    """Fail in seconds, before training, when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status == 200:
                return
            problem = f"answered HTTP {resp.status}"
    except urllib.error.HTTPError as err:
        problem = f"answered HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        problem = f"did not answer within {timeout:g}s ({getattr(err, 'reason', err)})"
    raise BarkError(
        f"MLflow tracking server {uri} {problem}; start it (mlflow server ...), fix MLFLOW_TRACKING_URI, "
        "or unset it to use the embedded sqlite store (or set tracking.enabled: false in params.yaml)"
    )


def _client(params: Params, root: Path):
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep stage logs readable
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline: no usage data leaves the machine
    import mlflow  # heavy import (~1.5 s): only stages that track pay for it

    uri = resolve_uri(params.tracking, root)
    check_server(uri, params.tracking.server_timeout_s)
    user_setting = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # for the fluent calls (log_model, register_model)
    # MLflow also exports the URI to the environment; undo that, or the next stage call in this
    # process (another project root, a test) would silently log into this project's store.
    if user_setting is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_setting
    return mlflow, mlflow.MlflowClient(uri)


def _experiment_id(client, cfg: TrackingParams, root: Path, uri: str) -> str:
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    # The embedded store keeps artifacts in the project; a server chooses its own artifact root.
    location = None
    if not uri.startswith(("http://", "https://")):
        location = (Path(root) / cfg.artifact_dir).resolve().as_uri()
    return client.create_experiment(cfg.experiment, artifact_location=location)


# --- tags ---------------------------------------------------------------------------------------

def git_commit(root: Path) -> str:
    for folder in (Path(root), Path(__file__).resolve().parent):
        try:
            out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True,
                                 text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0:
            return out.stdout.strip()
    return "unknown"


def data_tags(paths) -> dict[str, str]:
    """The DVC hash of the token shards (from dvc.lock) and our own content hash of them."""
    tags = {}
    shards = sorted(paths.tokens.glob("*")) if paths.tokens.exists() else []
    if shards:
        import hashlib

        digest = hashlib.sha256()
        for f in shards:
            digest.update(f.name.encode() + sha256_file(f).encode())
        tags["data.tokens_sha256"] = digest.hexdigest()
    lock = paths.root / "dvc.lock"
    if lock.exists():
        try:
            stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        except yaml.YAMLError:
            stages = {}
        rel = str(paths.tokens.relative_to(paths.root))
        for stage in stages.values():
            for out in stage.get("outs", []):
                if out.get("path") == rel and out.get("md5"):
                    tags["dvc.data_md5"] = out["md5"]
    return tags


# --- the run ------------------------------------------------------------------------------------

class TrainingRun:
    """An MLflow run seen from the stages (with tracking disabled, the stages hold None instead)."""

    def __init__(self, mlflow, client, run_id: str, params: Params, name: str, paths):
        self.mlflow, self.client, self.run_id = mlflow, client, run_id
        self.params, self.name, self.paths = params, name, paths

    def log_step(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def fail(self) -> None:
        self.client.set_terminated(self.run_id, status="FAILED")

    def end(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")


def start_training_run(params: Params, name: str, paths, tags: dict | None = None,
                       resume: bool = False) -> TrainingRun | None:
    """Open the run before training (so a dead server fails now, not after the training).

    The run id is written next to the checkpoint at once, so a resumed training (--resume)
    continues the same run, and evaluate finds it."""
    run_file = paths.run_record
    previous = read_json(run_file).get("run_id") if resume and run_file.exists() else None
    run_file.unlink(missing_ok=True)  # a stale id must never receive another model's metrics
    if not params.tracking.enabled:
        return None
    mlflow, client = _client(params, paths.root)
    uri = mlflow.get_tracking_uri()
    if previous:
        try:
            client.update_run(previous, status="RUNNING")
            write_json(run_file, {"run_id": previous, "tracking_uri": uri})
            return TrainingRun(mlflow, client, previous, params, name, paths)
        except Exception:  # MlflowException: not in this store; start a new run below
            pass
    exp_id = _experiment_id(client, params.tracking, paths.root, uri)
    all_tags = {"pipeline": name, "git.commit": git_commit(paths.root), **data_tags(paths), **(tags or {})}
    run = client.create_run(exp_id, run_name=f"{name}-train", tags=all_tags)
    from mlflow.entities import Param

    flat = flatten(params)
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()],
                     synchronous=True)
    write_json(run_file, {"run_id": run.info.run_id, "tracking_uri": uri})
    return TrainingRun(mlflow, client, run.info.run_id, params, name, paths)


def finish_training(run: TrainingRun | None, summary: dict) -> None:
    if run is None:
        return
    p = run.paths
    run.log_step(summary.get("step", 0), {f"train.{k}": v for k, v in summary.items()
                                          if isinstance(v, (int, float)) and v is not None})
    if p.train_log.exists():
        run.client.log_artifact(run.run_id, str(p.train_log), "reports")
        png = loss_curve_png(p.train_log, p.loss_curve)
        if png:
            run.client.log_artifact(run.run_id, str(png), "reports")
    if p.train_summary.exists():
        run.client.log_artifact(run.run_id, str(p.train_summary), "reports")
    run.end()


def loss_curve_png(csv_path: Path, out: Path) -> Path | None:
    import csv

    import matplotlib

    matplotlib.use("Agg")  # no display; the PNG is an artifact
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], label="train loss")
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def reopen_run(params: Params, name: str, paths, tags: dict | None = None) -> TrainingRun | None:
    """The run that trained this checkpoint; a fresh run if it is unknown to this tracking store."""
    if not params.tracking.enabled:
        return None
    mlflow, client = _client(params, paths.root)
    run_file = paths.run_record
    run_id = read_json(run_file).get("run_id") if run_file.exists() else None
    if run_id:
        try:
            client.get_run(run_id)
        except Exception:  # MlflowException: the checkpoint came from another store (e.g. dvc pull)
            run_id = None
    if run_id is None:
        exp_id = _experiment_id(client, params.tracking, paths.root, mlflow.get_tracking_uri())
        base = {"pipeline": name, "git.commit": git_commit(paths.root), **data_tags(paths),
                "note": "checkpoint's training run not in this store"}
        run_id = client.create_run(exp_id, run_name=f"{name}-evaluate", tags=base).info.run_id
    for k, v in (tags or {}).items():
        client.set_tag(run_id, k, v)
    client.update_run(run_id, status="RUNNING")
    return TrainingRun(mlflow, client, run_id, params, name, paths)


def finish_evaluation(run: TrainingRun | None, metrics: dict, gate_passed: bool) -> dict:
    """Log final metrics and samples, register the model, move the champion alias if gates pass."""
    if run is None:
        return {}
    p, cfg = run.paths, run.params.tracking
    flat = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            flat.update({f"eval.{k}.{kk}": vv for kk, vv in v.items()})
        elif isinstance(v, (int, float)):
            flat[f"eval.{k}"] = v
    run.log_step(0, {k.replace(":", "").replace(" ", "_"): v for k, v in flat.items()})
    for f in (p.metrics, p.samples):
        if f.exists():
            run.client.log_artifact(run.run_id, str(f), "reports")
    run.client.set_tag(run.run_id, "gate_passed", str(gate_passed).lower())
    try:
        info = log_and_register(run, gate_passed)
    except BaseException:
        run.fail()
        raise
    run.end()
    return info


def log_and_register(run: TrainingRun, gate_passed: bool) -> dict:
    from barkgpt import mlflow_model

    mlflow, p, cfg = run.mlflow, run.paths, run.params.tracking
    name = f"{cfg.model_prefix}-{run.name}"
    eval_cfg = getattr(run.params, run.name).eval
    artifacts = {"checkpoint": str(p.checkpoint), "checkpoint_sha256": str(p.checkpoint) + ".json",
                 "tokenizer": str(p.tokenizer)}
    with mlflow.start_run(run_id=run.run_id):
        # Model from code: MLflow stores mlflow_model.py, which imports barkgpt; no pickled objects.
        info = mlflow.pyfunc.log_model(
            name="model", python_model=mlflow_model.__file__, artifacts=artifacts,
            model_config={"temperature": eval_cfg.temperature, "top_k": eval_cfg.top_k,
                          "top_p": eval_cfg.top_p, "max_new_tokens": eval_cfg.max_new_tokens, "sample_seed": 0},
            pip_requirements=["barkgpt", "torch==2.13.0", "numpy", "pydantic", "pyyaml"],
        )
    if gate_passed:  # the champion must be the model the gate judged, byte for byte
        from barkgpt.gates import verify_judged

        verify_judged(p.metrics, {"checkpoint": p.checkpoint, "tokenizer": p.tokenizer})
    version = mlflow.register_model(info.model_uri, name, tags={"gate_passed": str(gate_passed).lower()})
    if gate_passed:
        run.client.set_registered_model_alias(name, cfg.champion_alias, version.version)
    return {"run_id": run.run_id, "registered_model": name, "version": int(version.version),
            "champion": gate_passed}


def run_summary(paths) -> dict | None:
    f = paths.run_record
    return json.loads(f.read_text()) if f.exists() else None


def log_export(params: Params, name: str, paths, files: list[Path], report: dict) -> dict | None:
    """Attach the GGUF files and the parity report to the run that trained the model, and tag the
    model versions registered from that run with the parity verdict and the deploy file's sha256.
    Skipped (None) when tracking is off or the checkpoint's run is not in this store."""
    if not params.tracking.enabled:
        return None
    run_file = paths.run_record
    if not run_file.exists():
        return None
    _, client = _client(params, paths.root)
    run_id = read_json(run_file).get("run_id")
    try:
        client.get_run(run_id)
    except Exception:  # MlflowException: e.g. the checkpoint came from another store via dvc pull
        return None
    for f in files:
        client.log_artifact(run_id, str(f), "gguf")
    client.log_artifact(run_id, str(paths.parity_report), "reports")
    if paths.quantization_report.exists():
        client.log_artifact(run_id, str(paths.quantization_report), "reports")
    f32 = report.get("f32_parity", {})
    metrics = {"parity.logits_max_abs_diff": f32.get("logits_max_abs_diff"),
               "parity.tokenization_agreement": f32.get("tokenization_agreement")}
    for quant, entry in report.get("quantizations", {}).items():
        metrics[f"parity.{quant}.{entry.get('metric')}"] = entry.get("value")
        metrics[f"parity.{quant}.size_ratio_vs_f32"] = entry.get("size_ratio_vs_f32")
    for key, value in metrics.items():
        if isinstance(value, (int, float)):
            client.log_metric(run_id, key, float(value))
    gate = report.get("gate", {})
    deploy_file = paths.root / gate["deploy_file"] if gate.get("deploy_file") else None
    tags = {"parity.deploy_passed": str(gate.get("deploy_passed")).lower(),
            "gguf.deploy_file": Path(gate.get("deploy_file") or "").name,
            "gguf.deploy_sha256": sha256_file(deploy_file) if deploy_file and deploy_file.exists() else ""}
    versions = client.search_model_versions(f"run_id='{run_id}'")
    for mv in versions:
        for key, value in tags.items():
            client.set_model_version_tag(mv.name, mv.version, key, value)
    return {"run_id": run_id, "model_versions": [f"{mv.name}/{mv.version}" for mv in versions]}
