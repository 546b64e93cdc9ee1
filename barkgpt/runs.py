"""Training runs: one writer at a time, each run in its own folder, promotion only of a finite result.

    runs/<p>/writer.lock   flock'ed by the process training the pipeline (its pid, command, start)
    runs/<p>/<run id>/     run.json (status), last.pt, best.pt, train_log.csv, mlflow_run.json

A training writes only into its run folder. The pipeline's current model (models/<p>/best.pt, what
evaluation, export and serving read) changes only when the run ends with finite losses and finite
weights: `promote` then switches each file into place with one atomic rename. A run that diverges,
crashes or is killed leaves models/<p>/ and reports/<p>/ exactly as they were.

Why the MLflow run record goes first and comes back last: while it is absent, evaluate opens a
fresh run, so at no moment does the record name a run that did not train the current best.pt.

`--resume` continues the newest interrupted run (status "running": the lock proves nobody runs it);
with none, it starts a new run from the promoted models/<p>/last.pt (to train further).
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shlex
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

from barkgpt.checkpoint import load_checkpoint
from barkgpt.errors import BarkError
from barkgpt.fileio import copy_atomic, fsync_dir, read_json, write_json
from barkgpt.layout import Layout, RunLayout


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- one writer per pipeline -----------------------------------------------------------------------

@contextmanager
def writer_lock(paths: Layout, purpose: str):
    """Hold the pipeline's writer lock for the block; BarkError naming the holder if it is taken.

    flock, not a pid file: the kernel releases the lock when its holder exits or is killed, so a
    crashed run never leaves a stale lock behind. The holder's details are written into the file
    only for the error message of whoever comes second."""
    lock = paths.writer_lock
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BarkError(_held_by(lock, paths.pipeline, purpose)) from None
        holder = {"pid": os.getpid(), "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
                  "purpose": purpose, "since": _now(), "host": socket.gethostname()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _held_by(lock: Path, pipeline: str, purpose: str) -> str:
    h: dict = {}
    deadline = time.monotonic() + 2.0  # the holder writes its details just after taking the lock
    while not h.get("pid") and time.monotonic() < deadline:
        try:
            h = json.loads(lock.read_text() or "{}")
        except (OSError, ValueError):
            h = {}
        if not h.get("pid"):
            time.sleep(0.05)
    if h.get("pid"):
        who = (f"pid {h['pid']} on {h.get('host')} ({h.get('command')}), {h.get('purpose')} "
               f"since {h.get('since')}; wait for it to finish or stop it (kill {h['pid']})")
    else:
        who = "a process that is just starting; wait for it to finish"
    return (f"cannot {purpose}: another process is writing the {pipeline} pipeline in this project "
            f"folder: {who} (lock file {lock})")


# --- run folders -------------------------------------------------------------------------------------

class RunFolder(RunLayout):
    """A run folder (paths from barkgpt.layout) and its status file."""

    def status(self) -> dict:
        try:
            return read_json(self.info)
        except (OSError, ValueError):
            return {}

    def set_status(self, status: str, **details) -> None:
        write_json(self.info, {**self.status(), "status": status, f"{status}_at": _now(), **details})


def open_run(paths: Layout, resume: bool = False, log=print) -> RunFolder:
    """The run folder this training writes into (call it holding the writer lock)."""
    if resume:
        interrupted = latest_interrupted(paths)
        if interrupted is not None:
            log(f"resuming interrupted run {interrupted.id} ({interrupted.path})")
            remove_temp_files(interrupted.path)
            return interrupted
    folder = RunFolder(paths.run_folder(f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}").path)
    folder.path.mkdir(parents=True)
    if resume and paths.last_checkpoint.exists():
        # Train the promoted model further: its state, its best model so far and its MLflow run.
        for src, dst in ((paths.last_checkpoint, folder.last), (paths.checkpoint, folder.best),
                         (paths.run_record, folder.run_record)):
            if src.exists():
                copy_atomic(src, dst)
    # run.json last: a folder without it was never a started run and is never resumed.
    write_json(folder.info, {"status": "running", "started": _now(), "pid": os.getpid()})
    return folder


# From `barkgpt train --nproc N` to its torchrun workers: the run folder it opened under its lock.
ENV_RUN_FOLDER = "BARKGPT_RUN_FOLDER"


def shared_run_folder(paths: Layout, resume: bool, dist, device, launched: str | None = None) -> RunFolder:
    """This training's run folder, the same on every process: the launcher's, or one rank 0 opens
    (every rank reads the checkpoint it resumes from; only rank 0 writes)."""
    if launched:
        return RunFolder(Path(launched))
    if not dist.enabled:
        return open_run(paths, resume)
    import torch.distributed as td

    buf = torch.zeros(4096, dtype=torch.uint8, device=device)  # bytes, not broadcast_object_list: no pickle
    if dist.is_main:
        raw = str(open_run(paths, resume).path.resolve()).encode()
        buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    td.broadcast(buf, 0)
    return RunFolder(Path(bytes(buf.cpu().tolist()).rstrip(b"\0").decode()))


def remove_temp_files(folder: Path) -> None:
    """Temp files of atomic writes that a killed process never renamed (barkgpt.fileio.atomic_path)."""
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def latest_interrupted(paths: Layout) -> RunFolder | None:
    """The newest run that neither finished nor failed, with a checkpoint to continue from."""
    return _newest_interrupted(_runs_with_status(paths))


def _runs_with_status(paths: Layout) -> list[tuple[RunFolder, dict]]:
    """Every run folder with its status file, read once, oldest first."""
    if not paths.runs.is_dir():
        return []
    folders = (RunFolder(p) for p in sorted(paths.runs.iterdir()) if p.is_dir())
    return [(f, f.status()) for f in folders]


def _newest_interrupted(runs: list[tuple[RunFolder, dict]]) -> RunFolder | None:
    found = [(f, s) for f, s in runs if s.get("status") == "running" and f.last.exists()]
    return max(found, key=lambda fs: (fs[1].get("started", ""), fs[0].id), default=(None,))[0]


# --- the verdict and the switch -----------------------------------------------------------------------

class TrainingDiverged(BarkError):
    """A loss or weight became NaN or infinite: the run stops and nothing of it is promoted."""


def check_finite(summary: dict) -> None:
    for key in ("train_loss", "val_loss", "best_val_loss"):
        value = summary.get(key)
        if value is not None and not math.isfinite(value):
            raise TrainingDiverged(f"training ended with {key} = {value}; lower the learning rate, "
                                   "add warmup_steps or grad_clip")


def check_finite_weights(path: Path) -> None:
    state = load_checkpoint(path)
    bad = [name for name, t in state["model"].items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise TrainingDiverged(f"{path}: weights {bad[:3]} are not finite; lower the learning rate, "
                               "add warmup_steps or grad_clip")


def discard(paths: Layout, folder: RunFolder, err: BarkError) -> BarkError:
    """Mark a diverged run (never resumed) and say that the current model did not change."""
    folder.set_status("diverged", reason=str(err))
    return TrainingDiverged(f"{err}; nothing was promoted: {paths.checkpoint} and {paths.run_record.name} are "
                            f"unchanged (the run's files stay in {folder.path})")


def promote(paths: Layout, folder: RunFolder, summary: dict) -> None:
    """Make the finished run the pipeline's current model, one atomic rename per file."""
    best = folder.best if folder.best.exists() else folder.last  # no validation split: the last step
    check_finite(summary)
    for ckpt in {best, folder.last}:
        check_finite_weights(ckpt)
    paths.models.mkdir(parents=True, exist_ok=True)
    remove_temp_files(paths.models)  # left by a promotion killed mid-copy; never part of the output
    paths.run_record.unlink(missing_ok=True)
    fsync_dir(paths.models)
    copy_atomic(best, paths.checkpoint)
    copy_atomic(folder.last, paths.last_checkpoint)
    for legacy in (paths.checkpoint, paths.last_checkpoint):  # checksum files of two-file checkpoints
        Path(f"{legacy}.json").unlink(missing_ok=True)
    if folder.run_record.exists():
        copy_atomic(folder.run_record, paths.run_record)
    if folder.train_log.exists():
        copy_atomic(folder.train_log, paths.train_log)
    write_json(paths.train_summary, summary)
    folder.set_status("promoted")
    for ckpt in (folder.best, folder.last):  # their copies are models/<p>/ now
        ckpt.unlink(missing_ok=True)


# --- keeping runs/ small ---------------------------------------------------------------------------

def list_runs(paths: Layout) -> list[dict]:
    """Every run folder, oldest first: id, status, when it started, bytes on disk, and whether
    `--resume` would continue it. A folder without run.json never started (status "incomplete")."""
    runs = _runs_with_status(paths)
    resumable = _newest_interrupted(runs)
    return [{"id": f.id, "status": s.get("status", "incomplete"), "started": s.get("started"),
             "bytes": sum(x.stat().st_size for x in f.path.rglob("*") if x.is_file()),
             "resumable": resumable is not None and resumable.path == f.path} for f, s in runs]


def prune_runs(paths: Layout) -> list[dict]:
    """Remove every run folder but the one `--resume` would continue; the removed runs, as listed.

    Promoted runs hold only their log (models/<p>/ and MLflow keep the rest), diverged and older
    interrupted runs hold checkpoints nothing reads again. Under the writer lock, so no training
    is writing into a folder while it goes."""
    import shutil

    with writer_lock(paths, "prune runs"):
        removed = [r for r in list_runs(paths) if not r["resumable"]]
        for r in removed:
            shutil.rmtree(paths.runs / r["id"])
    return removed
