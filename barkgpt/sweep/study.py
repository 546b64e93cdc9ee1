"""The Optuna study behind a sweep: where it is stored, how it samples and prunes.

The storage is any SQLAlchemy URL Optuna accepts: by default SQLite in the project
(`sweep.storage`), or a team's shared database (`--storage`, or OPTUNA_STORAGE: the environment
says where the database is, and keeps its password out of params.yaml). Several machines that open
the same study name on the same storage share its trials, as Optuna's distributed examples do.
"""
from __future__ import annotations

import itertools
import os
import threading
import warnings
from pathlib import Path

from barkgpt.errors import BarkError

STORAGE_ENV = "OPTUNA_STORAGE"

# One study call at a time in this process. `--jobs N` runs trials in N threads of one process;
# two threads asking at once both took the same queued grid trial from the SQLite storage (then
# "Trial#0 has already finished" when the second told it). Across machines the database's row
# locks do this (PostgreSQL); within one process, this lock.
STUDY_LOCK = threading.RLock()


def resolve_storage(setting: str, root: Path, given: str | None = None) -> str:
    """--storage wins, then OPTUNA_STORAGE, then params; a relative SQLite path is the project's."""
    url = given or os.environ.get(STORAGE_ENV) or setting
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return f"sqlite:///{(Path(root) / url[len('sqlite:///'):]).resolve()}"
    return url


def redact(url: str) -> str:
    """The URL without its password, for messages, MLflow and reports."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def open_storage(url: str, timeout_s: float = 10.0):
    """Connect now, so an unreachable or mistyped database fails before anything is created."""
    import optuna
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    kwargs = {}
    if url.startswith(("postgresql", "mysql")):
        kwargs = {"connect_args": {"connect_timeout": int(timeout_s)}}
    if url.startswith("sqlite:///"):
        # trials side by side write to one file: wait for the other's write (SQLite's default 5 s
        # ran out on a busy machine, "database is locked") rather than fail the sweep
        kwargs = {"connect_args": {"timeout": 120}}
        folder = Path(url[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise BarkError(f"study storage {redact(url)}: the folder {folder} does not exist; create it or pass "
                            "another --storage")
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs or None)
    except (ArgumentError, NoSuchModuleError, ValueError) as err:
        raise BarkError(f"study storage {redact(url)!r} is not a database URL Optuna can use ({err}); write it "
                        "as sqlite:///path.db or postgresql://user@host/db (--storage or OPTUNA_STORAGE)") from None
    except Exception as err:  # OperationalError and the like: the database did not answer
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0][:300]
        raise BarkError(f"study storage {redact(url)} cannot be reached ({reason}); start the database, or fix "
                        "--storage / OPTUNA_STORAGE (unset both to use the project's SQLite file)") from None


def make_sampler(space, cfg):
    import optuna

    if cfg.sampler == "random" or space.grid:  # a grid's trials are enqueued (open_study); nothing to sample
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.startup_trials)


def make_pruner(cfg, enabled: bool):
    """Median pruning on the validation bpb the trainer logs at every evaluation: a trial whose bpb
    at step s is worse than the median of earlier trials at s stops there."""
    import optuna

    if not enabled or cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.warmup_steps)


def open_study(storage, name: str, space, cfg, pipeline: str, prune: bool):
    """Create the study, or join it (same name, same storage) when its pipeline and space agree."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own one line per trial instead
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize",
                                sampler=make_sampler(space, cfg), pruner=make_pruner(cfg, prune),
                                load_if_exists=True)
    attrs = study.user_attrs
    if not attrs:
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and what the dashboard shows
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["val_bpb"])
        study.set_user_attr("pipeline", pipeline)
        study.set_user_attr("space", space.describe())
        study.set_user_attr("grid", space.grid)
        if space.grid:  # every combination, in order, queued in the study: any machine that joins takes the next
            for values in itertools.product(*space.grid_values().values()):
                study.enqueue_trial(dict(zip(space.keys, values)))
    elif attrs.get("pipeline") != pipeline or attrs.get("space") != space.describe():
        raise BarkError(f"study {name!r} already exists for pipeline {attrs.get('pipeline')!r} with space "
                        f"{attrs.get('space')}; join it with the same space, or name a new study (--study)")
    return study
