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

A run whose status says "running" may have died without a word (kill -9, a lost machine): its
status file cannot tell. The process it names can, so `barkgpt runs` checks that process: gone (or
a later process that reuses its pid) means the run is interrupted, and `--resume` would continue it.
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
from barkgpt.fileio import copy_atomic, fsync_dir, human_size, read_json, write_json  # noqa: F401 (cli)
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
            log(f"resuming interrupted run {interrupted.id} from step {_step(interrupted.last)} ({interrupted.path})")
            remove_temp_files(interrupted.path)
            write_json(interrupted.info, {**interrupted.status(), "resumed": _now(), **_this_process()})
            return interrupted
    folder = RunFolder(paths.run_folder(f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}").path)
    folder.path.mkdir(parents=True)
    if resume:
        log(f"no interrupted run to resume: training {_fresh_start(paths)} in a new run, {folder.id}")
    if resume and paths.last_checkpoint.exists():
        # Train the promoted model further: its state, its best model so far and its MLflow run.
        for src, dst in ((paths.last_checkpoint, folder.last), (paths.checkpoint, folder.best),
                         (paths.run_record, folder.run_record)):
            if src.exists():
                copy_atomic(src, dst)
    # run.json last: a folder without it was never a started run and is never resumed.
    write_json(folder.info, {"status": "running", "started": _now(), **_this_process()})
    return folder


def _this_process() -> dict:
    """Who trains a run now: what `barkgpt runs` checks to tell a live run from a dead one."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


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


def _newest_interrupted(runs: list[tuple[RunFolder, dict]], locked: bool = True) -> RunFolder | None:
    """Under the writer lock (`locked`) no "running" run is alive: the lock proves it. Without it,
    the run's own process is asked."""
    found = [(f, s) for f, s in runs if s.get("status") == "running" and f.last.exists() and (locked or not _alive(s))]
    return max(found, key=lambda fs: (fs[1].get("started", ""), fs[0].id), default=(None,))[0]


def _alive(status: dict) -> bool:
    """Whether the process a "running" status names still runs (on another host: assumed so)."""
    pid = status.get("pid")
    if status.get("status") != "running" or not isinstance(pid, int):
        return False
    if status.get("host", socket.gethostname()) != socket.gethostname():
        return True  # its pid means nothing here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    started = _process_start(pid)
    since = status.get("resumed") or status.get("started")
    if started is None or not since:
        return True
    # A process younger than the run is another one that got the dead run's pid.
    return started <= datetime.strptime(since, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp() + 1


def _process_start(pid: int) -> float | None:
    """When a process started (seconds since the epoch), from /proc; None where there is no /proc."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _step(checkpoint: Path) -> int | str:
    try:
        return load_checkpoint(checkpoint)["step"]
    except (BarkError, KeyError):
        return "?"  # train names the problem when it loads it


def _fresh_start(paths: Layout) -> str:
    """What `train --resume` starts from when there is no interrupted run."""
    if paths.last_checkpoint.exists():
        return f"from the promoted model {paths.last_checkpoint} (step {_step(paths.last_checkpoint)})"
    return f"from scratch (there is no {paths.last_checkpoint})"


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
    """Every run folder, oldest first: id, status, when it started, bytes on disk, the pid that
    trains (or trained) it, and whether `--resume` would continue it. Status is "running" only
    while its process lives; "interrupted" when that process is gone; "incomplete" for a folder
    without run.json (it never started)."""
    runs = _runs_with_status(paths)
    resumable = _newest_interrupted(runs, locked=False)
    listed = []
    for f, s in runs:
        status = s.get("status", "incomplete")
        if status == "running" and not _alive(s):
            status = "interrupted"
        listed.append({"id": f.id, "status": status, "started": s.get("started"), "pid": s.get("pid"),
                       "host": s.get("host"), "checkpoint": f.last.exists(), "bytes": _folder_bytes(f.path),
                       "resumable": resumable is not None and resumable.path == f.path})
    return listed


def _folder_bytes(folder: Path) -> int:
    total = 0
    for file in folder.rglob("*"):
        try:
            total += file.stat().st_size if file.is_file() else 0
        except FileNotFoundError:
            pass  # a temp file renamed by a training that runs now
    return total


def format_runs(paths: Layout) -> str:
    """`barkgpt runs <p>`: a table of the run folders, then what `train --resume` would do."""
    runs = list_runs(paths)
    if not runs:
        return f"no runs in {paths.runs}\n`barkgpt train {paths.pipeline} --resume` starts a new run {_fresh_start(paths)}"
    rows = [("RUN", "STATUS", "STARTED", "SIZE", "")]
    for r in runs:
        if r["status"] == "running":
            note = f"pid {r['pid']}" + (f" on {r['host']}" if r["host"] and r["host"] != socket.gethostname() else "")
        elif r["status"] == "interrupted":
            note = (f"pid {r['pid']} is gone" if r["pid"] else "its process is gone") + (
                "" if r["checkpoint"] else ", before its first checkpoint")
        else:
            note = ""
        if r["resumable"]:
            note += "; `--resume` continues this one"
        rows.append((r["id"], r["status"], (r["started"] or "-")[:19].replace("T", " "), human_size(r["bytes"]), note))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join([*(c.ljust(w) if i != 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row[:4], widths))),
                        row[4]]).rstrip() for row in rows]
    total = human_size(sum(r["bytes"] for r in runs))
    lines.append(f"{len(runs)} run folder(s), {total} in {paths.runs}")
    resumable = next((r for r in runs if r["resumable"]), None)
    command = f"`barkgpt train {paths.pipeline} --resume`"
    running = [r for r in runs if r["status"] == "running"]
    if running:
        lines.append(f"{command} would stop at once: run {running[-1]['id']} is training (one writer at a time)")
    elif resumable:
        lines.append(f"{command} continues run {resumable['id']} from step {_step(paths.run_folder(resumable['id']).last)}")
    else:
        lines.append(f"{command} starts a new run {_fresh_start(paths)}")
    return "\n".join(lines)


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
