"""MLflow runs: one run per trained model, whichever door ran the stages.

The train stage opens the run (a name that says what ran, the pipeline's own params, tags, the
token shards as dataset inputs, per-step metrics, system metrics, checkpoint) and records its id in
`models/<pipeline>/mlflow_run.json`, next to the checkpoint; the evaluate stage, often a separate
process (DVC runs one per stage), reopens that run to add the final metrics and samples, and
`barkgpt.tracking.registry` registers the model.

Where runs go: `tracking.uri` in params.yaml (default: SQLite `mlflow.db` in the project, artifacts
in `mlruns/`), or the `MLFLOW_TRACKING_URI` environment variable (a tracking server).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path


from barkgpt.errors import BarkError
from barkgpt.fileio import fsync_dir, read_json, sha256_file, write_json
from barkgpt.params import SharedParams, TrackingParams, flatten
from barkgpt.tracking.hashes import dvc_data_md5, git_commit, tokens_sha256

# The experiment is a training one (MLflow 3.0-3.x UIs that read this tag open it on its runs;
# newer ones follow the URL's workflowType: see ui_url).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
SYSTEM_METRICS_INTERVAL_S = 5.0  # CPU, memory, disk, network: one psutil sample every 5 s


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


def client_for(params: SharedParams, root: Path):
    """(mlflow module, MlflowClient) for this project's store."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep stage logs readable
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline: no usage data leaves the machine
    import mlflow  # heavy import (~1.5 s): only stages that track pay for it

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop chatter
    quiet_disk_full(logging.getLogger("mlflow.store.db.utils"))
    uri = resolve_uri(params.tracking, root)
    check_server(uri, params.tracking.server_timeout_s)
    open_store(uri, (Path(root) / params.tracking.artifact_dir).resolve())
    user_setting = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # for the fluent calls (log_model, register_model)
    # MLflow also exports the URI to the environment; undo that, or the next stage call in this
    # process (another project root, a test) would silently log into this project's store.
    if user_setting is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_setting
    return mlflow, mlflow.MlflowClient(uri)


class _DiskFullTold(logging.Filter):
    """Drops MLflow's log of a store write that failed for want of space (the SQL error with its
    traceback): the error itself reaches the door, which says "disk full" once, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        from barkgpt.fileio import SQLITE_FULL

        return SQLITE_FULL not in record.getMessage() and not (
            record.exc_info and record.exc_info[1] is not None and SQLITE_FULL in str(record.exc_info[1]))


def quiet_disk_full(logger: logging.Logger) -> None:
    if not any(isinstance(f, _DiskFullTold) for f in logger.filters):
        logger.addFilter(_DiskFullTold())


def open_store(uri: str, artifact_root: Path) -> None:
    """Make the embedded SQLite store ready before any client touches it: created whole if it is
    missing, and opened now, so that a broken one fails here with its fix, not with a traceback
    from deep inside MLflow. Other stores (a tracking server, a file store) are left to MLflow."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///"):].split("?")[0])  # without a query such as ?timeout=30
    if not db.exists():
        create_sqlite_store(db, artifact_root)
    check_sqlite_store(uri, db)


def create_sqlite_store(db: Path, artifact_root: Path) -> None:
    """Create and migrate an MLflow SQLite store beside `db`, then link it into place.

    MLflow migrates a new database in dozens of steps over a few seconds, on the first training
    run. A Ctrl-C in the middle used to leave a half-migrated mlflow.db that every later run
    failed on ("duplicate column name"). Linked, not renamed over: a store that another process
    created meanwhile wins, with whatever it has logged already."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")  # SQLite creates it, with the umask's mode
    tmp.unlink(missing_ok=True)  # a killed process's, whose pid this one has now
    try:
        SqlAlchemyStore(f"sqlite:///{tmp}", artifact_root.as_uri()).engine.dispose()
        try:
            os.link(tmp, db)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(db.parent)  # SQLite synced the file itself; the new name needs its folder synced


def check_sqlite_store(uri: str, db: Path) -> None:
    import mlflow

    db_log = logging.getLogger("mlflow.store.db.utils")  # it logs the whole SQL error before raising
    level = db_log.level
    db_log.setLevel(logging.CRITICAL)
    try:  # opening the store is what fails (MLflow creates the tables it finds missing)
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # sqlite3/SQLAlchemy errors, MLflow's "out-of-date database schema"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BarkError(
            f"MLflow store {db} cannot be opened ({reason}). One cause is a store that an older BarkGPT "
            f"left half-created when its first run was interrupted: move it aside (mv {db} {db}.broken) and "
            f"run again to start a new, empty store. A store of an older MLflow needs `mlflow db upgrade "
            f"sqlite:///{db}` instead"
        ) from None
    finally:
        db_log.setLevel(level)


def experiment_id(client, cfg: TrackingParams, root: Path, uri: str) -> str:
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        if (exp.tags or {}).get(EXPERIMENT_KIND[0]) is None:
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    # The embedded store keeps artifacts in the project; a server chooses its own artifact root.
    location = None
    if not uri.startswith(("http://", "https://")):
        location = (Path(root) / cfg.artifact_dir).resolve().as_uri()
    return client.create_experiment(cfg.experiment, artifact_location=location, tags=dict([EXPERIMENT_KIND]))


# --- what a run records -------------------------------------------------------------------------

def pipeline_params(params: SharedParams, name: str) -> dict[str, object]:
    """The params that shaped this pipeline's model and its files: the seed, the pipeline's own
    section and the export settings. Not serve, deploy or tracking: they do not change the model."""
    return {k: v for k, v in flatten(params).items() if k == "seed" or k.startswith((f"{name}.", "export."))}


def run_name(params: SharedParams, name: str) -> str:
    """What ran, at a glance in the runs list: `bark 2x64 (ctx 64), 300 steps, lr 0.003, seed 1337`."""
    cfg = getattr(params, name)
    m, t = cfg.model, cfg.train
    budget = [f"{t.max_steps} steps"] if t.max_steps else []
    if t.max_seconds:
        budget = [f"{t.max_seconds:g} s"] + ([f"<= {t.max_steps} steps"] if t.max_steps < 100000 else [])
    if t.max_tokens:
        budget.append(f"{t.max_tokens:,} tokens")
    return f"{name} {m.n_layer}x{m.n_embd} (ctx {m.block_size}), {', '.join(budget)}, lr {t.learning_rate:g}, " \
           f"seed {t.seed}"


def commit_id(root: Path) -> str:
    return (git_commit(root) or {"commit": "unknown"})["commit"]


def standard_tags(root: Path, tags: dict) -> dict[str, str]:
    """MLflow's own tags, so the UI's "Source", "Version" and "Created by" columns are filled: the
    entry point (the door that ran the stage), the git commit, the user. The fluent API adds these
    from the calling script; runs created through the client get them here."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = "unknown"
    prefect = "prefect.flow_run_name" in tags or "prefect.flow_run_id" in tags
    return {"mlflow.source.name": tags.get("mlflow.source.name") or source_name(),
            "mlflow.source.type": "JOB" if prefect else "LOCAL",
            "mlflow.source.git.commit": commit_id(root), "mlflow.user": user}


def source_name() -> str:
    """The command that ran, as a person would type it: `barkgpt train bark`, `dvc repro`, ..."""
    import sys

    argv = sys.argv or ["python"]
    program = Path(argv[0]).name
    if program == "__main__.py":  # python -m barkgpt ...
        program = f"python -m {Path(argv[0]).parent.name}"
    elif program in ("-c", ""):
        program = "python"
    return " ".join([program, *argv[1:3]])[:200]


def run_note(tags: dict) -> str | None:
    """The run's description (mlflow.note.content, Markdown): a link to the Prefect flow run that
    trained it, when a Prefect door did and its UI is known."""
    url, name = tags.get("prefect.flow_run_url"), tags.get("prefect.flow_run_name")
    if not (url or name):
        return None
    label = f"Prefect flow run `{name}`" if name else "Prefect flow run"
    target = f"[{label}]({url})" if url else f"{label} (id `{tags.get('prefect.flow_run_id', '?')}`; run in-process, " \
                                              "no Prefect UI to link to)"
    return f"Trained by {target}."


def data_tags(paths) -> dict[str, str]:
    """The DVC hash of the token shards (from dvc.lock) and our own content hash of them."""
    tags = {}
    if sha := tokens_sha256(paths):
        tags["data.tokens_sha256"] = sha
    rel = str(paths.tokens.relative_to(paths.root))
    if md5 := dvc_data_md5(paths).get(rel):
        tags["dvc.data_md5"] = md5
    return tags


def log_dataset_inputs(client, run_id: str, paths, name: str) -> None:
    """The token shards as the run's dataset inputs (MLflow's Datasets column): name, source, digest."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for split, context in (("train", "training"), ("val", "validation")):
        manifest = paths.token_manifest(split)  # names the split's shard files, in order
        if not manifest.exists():
            continue
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local file, either way
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(manifest.resolve().as_uri())
        digest = hashlib.sha256(sha256_file(manifest).encode())
        for shard in paths.token_shard_files(split):
            digest.update(sha256_file(shard).encode())
        digest = digest.hexdigest()[:16]
        dataset = MetaDataset(source, name=f"{name}-{split}-tokens", digest=digest)
        inputs.append(DatasetInput(dataset._to_mlflow_entity(),
                                   tags=[InputTag("mlflow.data.context", context)]))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


# --- the run ------------------------------------------------------------------------------------

class TrackingLost(BarkError):
    """The tracking server stopped taking a training's metrics (it, or its database, went away)."""

    def __init__(self, uri: str, step: int, err: Exception):
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        self.uri, self.step = uri, step
        super().__init__(f"MLflow tracking server {uri} failed at step {step} ({reason}); is the server and its "
                         "database up? The training stopped with its run folder kept: once the server answers, "
                         "`barkgpt train <pipeline> --resume` continues it in the same MLflow run")


class TrainingRun:
    """An MLflow run seen from the stages (with tracking disabled, the stages hold None instead)."""

    def __init__(self, mlflow, client, run_id: str, params: SharedParams, name: str, paths):
        self.mlflow, self.client, self.run_id = mlflow, client, run_id
        self.params, self.name, self.paths = params, name, paths
        self._system = None

    def log_step(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        try:
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
        except Exception as err:  # MlflowException after MLflow's retries, or the connection itself
            raise TrackingLost(self.mlflow.get_tracking_uri(), step, err) from None

    def watch_system(self) -> None:
        """system/cpu_utilization_percentage, system/system_memory_usage_megabytes, ... while training."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(self.run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                                resume_logging=True, tracking_uri=self.mlflow.get_tracking_uri())
            self._system.start()
        except Exception:  # psutil missing or the like: system metrics are a nicety, never a failure
            self._system = None

    def stop_system(self) -> None:
        monitor, self._system = self._system, None
        if monitor is None:
            return
        try:
            if monitor._logging_step == 0:  # a run shorter than one interval: still one sample
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.finish()
        except Exception:
            pass

    def fail(self) -> None:
        self.stop_system()
        try:  # the server may be what failed: the error that stopped training is the one to show
            self.client.set_terminated(self.run_id, status="FAILED")
        except Exception:
            pass

    def end(self) -> None:
        self.stop_system()
        self.client.set_terminated(self.run_id, status="FINISHED")


def start_training_run(params: SharedParams, name: str, paths, tags: dict | None = None,
                       resume: bool = False, record: Path | None = None) -> TrainingRun | None:
    """Open the run before training (so a dead server fails now, not after the training).

    The run id is written at once to `record` (the training's run folder; promotion copies it
    to paths.run_record), so a resumed training (--resume) continues the same run."""
    run_file = record or paths.run_record
    previous = read_json(run_file).get("run_id") if resume and run_file.exists() else None
    run_file.unlink(missing_ok=True)  # a stale id must never receive another model's metrics
    if not params.tracking.enabled:
        return None
    mlflow, client = client_for(params, paths.root)
    uri = mlflow.get_tracking_uri()
    if previous:
        try:
            client.update_run(previous, status="RUNNING")
            write_json(run_file, {"run_id": previous, "tracking_uri": uri})
            run = TrainingRun(mlflow, client, previous, params, name, paths)
            run.watch_system()
            return run
        except Exception:  # MlflowException: not in this store; start a new run below
            pass
    tags = dict(tags or {})
    all_tags = {"pipeline": name, **standard_tags(paths.root, tags), **data_tags(paths), **tags}
    if note := run_note(tags):
        all_tags["mlflow.note.content"] = note
    run_id = adopted_run(client, uri)
    if run_id:  # a launcher's run (a sweep's trial): it keeps its name and nesting, gains the tags
        for key, value in all_tags.items():
            client.set_tag(run_id, key, value)
        client.update_run(run_id, status="RUNNING")
    else:
        exp_id = experiment_id(client, params.tracking, paths.root, uri)
        run_id = client.create_run(exp_id, run_name=run_name(params, name), tags=all_tags).info.run_id
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in pipeline_params(params, name).items()],
                     synchronous=True)
    try:
        log_dataset_inputs(client, run_id, paths, name)
    except Exception as err:  # a record of the inputs, not a gate: say so on the run and go on
        client.set_tag(run_id, "dataset_inputs_error", f"{type(err).__name__}: {err}"[:500])
    write_json(run_file, {"run_id": run_id, "tracking_uri": uri})
    run = TrainingRun(mlflow, client, run_id, params, name, paths)
    run.watch_system()
    return run


def adopted_run(client, uri: str) -> str | None:
    """The run a launcher created for this training and handed over in MLFLOW_RUN_ID, as `mlflow
    run` does (a sweep's trial, nested under its sweep); None when there is none."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:
        raise BarkError(f"MLFLOW_RUN_ID={run_id} names no run in {uri}; unset it to start a new run") from None
    if run.info.status not in ("RUNNING", "SCHEDULED"):
        raise BarkError(f"MLFLOW_RUN_ID={run_id} names a {run.info.status.lower()} run; a training continues "
                        "only a run its launcher created for it (unset MLFLOW_RUN_ID)")
    return run_id


# The training's summary, as run metrics: only what the per-step curves do not already show (the
# last loss, val_loss, tokens and seconds are the curves' last points; one name per metric).
SUMMARY_METRICS = {"best_val_loss": "best_val_loss", "tokens_per_s": "mean_tokens_per_s",
                   # where the time went: before the budget's clock (measuring, compiling) and in steps
                   "calibration_seconds": "calibration_seconds", "compile_seconds": "compile_seconds",
                   "step_seconds": "training_step_seconds"}


def finish_training(run: TrainingRun | None, summary: dict) -> None:
    if run is None:
        return
    p = run.paths
    run.log_step(summary.get("step", 0), {name: summary[k] for k, name in SUMMARY_METRICS.items()
                                          if isinstance(summary.get(k), (int, float))})
    log_settings(run, summary.get("settings") or {})
    if p.train_log.exists():
        run.client.log_artifact(run.run_id, str(p.train_log), "reports")
        png = loss_curve_png(p.train_log, p.loss_curve)
        if png:
            run.client.log_artifact(run.run_id, str(png), "reports")
    if p.train_summary.exists():
        run.client.log_artifact(run.run_id, str(p.train_summary), "reports")
    run.end()


def log_settings(run: TrainingRun, settings: dict) -> None:
    """The dtype, compile and threads the run trained with (params say `auto` where they were
    measured) as params `train.resolved.*`, and how they were chosen as the tag `train.settings`."""
    from mlflow.entities import Param

    resolved = [Param(f"train.resolved.{k}", str(settings[k])) for k in ("dtype", "compile", "threads") if k in settings]
    try:
        run.client.log_batch(run.run_id, params=resolved, synchronous=True)
    except Exception:  # a resumed run that chose otherwise: params are immutable, so tags say it
        for param in resolved:
            run.client.set_tag(run.run_id, param.key, param.value)
    if settings.get("note"):
        run.client.set_tag(run.run_id, "train.settings", settings["note"][:5000])


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


def reopen_run(params: SharedParams, name: str, paths, tags: dict | None = None) -> TrainingRun | None:
    """The run that trained this checkpoint; a fresh run if it is unknown to this tracking store."""
    if not params.tracking.enabled:
        return None
    mlflow, client = client_for(params, paths.root)
    run_file = paths.run_record
    run_id = read_json(run_file).get("run_id") if run_file.exists() else None
    if run_id:
        try:
            client.get_run(run_id)
        except Exception:  # MlflowException: the checkpoint came from another store (e.g. dvc pull)
            run_id = None
    if run_id is None:
        exp_id = experiment_id(client, params.tracking, paths.root, mlflow.get_tracking_uri())
        base = {"pipeline": name, **standard_tags(paths.root, tags or {}), **data_tags(paths),
                "mlflow.note.content": "Evaluation of a checkpoint whose training run is not in this store "
                                       "(e.g. fetched with `dvc pull`)."}
        run_id = client.create_run(exp_id, run_name=f"{name} evaluation of a checkpoint trained elsewhere",
                                   tags=base).info.run_id
    for k, v in (tags or {}).items():
        client.set_tag(run_id, k, v)
    client.update_run(run_id, status="RUNNING")
    return TrainingRun(mlflow, client, run_id, params, name, paths)


def finish_evaluation(run: TrainingRun | None, metrics: dict, gate_passed: bool,
                      order: list[tuple[str, str]], input_example: str, description: str = "") -> dict:
    """Log final metrics and samples, register the model (one version per trained model) and move
    the champion alias to the best gate-passing version. `order` and `input_example` (a prompt the
    model version shows) are the pipeline's."""
    from barkgpt.tracking import registry

    if run is None:
        return {}
    p = run.paths
    run.log_step(0, evaluation_metrics(metrics))
    for f in (p.metrics, p.samples):
        if f.exists():
            run.client.log_artifact(run.run_id, str(f), "reports")
    run.client.set_tag(run.run_id, "gate_passed", str(gate_passed).lower())
    try:
        info = registry.register(run, metrics, gate_passed, order, input_example, description)
    except BaseException:
        run.fail()
        raise
    run.end()
    return info


# Sizes of what was measured, not measurements: in metrics.json (a run artifact), not charts.
NOT_METRICS = {"contract_samples", "val_bytes", "val_tokens"}


def evaluation_metrics(metrics: dict) -> dict[str, float]:
    """The evaluation's measurements as `eval.*` run metrics, one name each: the gate verdict once
    (`eval.gate_passed`, not again from the gate's details), per-prompt rates as
    `eval.ood_contract_rate.<prompt>`; sample sizes and file hashes stay in metrics.json."""
    flat = {}
    for k, v in metrics.items():
        if k in NOT_METRICS or k in ("gate", "judged"):
            continue
        if isinstance(v, dict):
            flat.update({f"eval.{k}.{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float))})
        elif isinstance(v, (int, float)):
            flat[f"eval.{k}"] = v
    return {k.replace(":", "").replace(" ", "_"): float(v) for k, v in flat.items()}


MLFLOW_UI_DEFAULT = "http://127.0.0.1:5000"  # where `mlflow ui` serves the embedded store


def run_link(params: SharedParams, paths) -> str | None:
    """A Markdown link to the model's MLflow run page (a tracking server's own UI, else where
    `mlflow ui` serves the embedded store); None when untracked or the run is not in this store."""
    record = run_summary(paths)
    if not params.tracking.enabled or not record:
        return None
    mlflow, client = client_for(params, paths.root)
    try:
        run = client.get_run(record["run_id"])
    except Exception:  # MlflowException: the checkpoint came from another store (dvc pull)
        return None
    uri = mlflow.get_tracking_uri()
    server = uri.rstrip("/") if uri.startswith(("http://", "https://")) else MLFLOW_UI_DEFAULT
    page = ui_url(server, run.info.experiment_id, run.info.run_id)
    how = "" if server != MLFLOW_UI_DEFAULT else " (with `mlflow ui --backend-store-uri sqlite:///mlflow.db` running)"
    return f"MLflow run: [{run.info.run_name}]({page}){how}."


def ui_url(server: str, experiment_id: str, run_id: str | None = None) -> str:
    """An MLflow UI page of the experiment's runs (or of one run) in its "Model training" view. MLflow
    3's UI picks its view from the URL's workflowType, else from the browser's last choice, and a
    fresh browser gets the GenAI overview, whatever the experiment's mlflow.experimentKind says."""
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/{page}?workflowType=machine_learning"


def run_summary(paths) -> dict | None:
    f = paths.run_record
    return json.loads(f.read_text()) if f.exists() else None


def log_export(params: SharedParams, name: str, paths, files: list[Path], report: dict) -> dict | None:
    """Attach the GGUF files and the parity report to the run that trained the model, and tag the
    model versions registered from that run with the parity verdict and the deploy file's sha256.
    Skipped (None) when tracking is off or the checkpoint's run is not in this store."""
    from barkgpt.tracking import registry

    if not params.tracking.enabled:
        return None
    run_file = paths.run_record
    if not run_file.exists():
        return None
    _, client = client_for(params, paths.root)
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
    versions = registry.tag_export(client, run_id, paths, report)
    return {"run_id": run_id, "model_versions": versions}
