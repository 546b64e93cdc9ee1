"""Shared fixtures: a tiny bark project, trained once per test session through the stage functions."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from barkgpt.config import load_params
from barkgpt.pipelines import run_stage

ROOT = Path(__file__).resolve().parent.parent
# Stage commands run in their own process here, as under the Prefect door; tests/test_warm.py
# covers the warm server (barkgpt/warm.py) that `barkgpt <stage>` uses by default.
os.environ["BARKGPT_WARM"] = "0"
SHARED_TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-valid.txt"


def make_project(folder: Path, overrides: dict | None = None) -> Path:
    """Copy params.yaml (merged with `overrides`) into `folder`, a stand-in project root."""
    from barkgpt.params import deep_merge

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(deep_merge(raw, overrides or {})))
    return folder


@pytest.fixture(scope="session")
def bark_project(tmp_path_factory) -> Path:
    """A project root where the default bark pipeline ran: data, tokens, checkpoint, metrics."""
    root = make_project(tmp_path_factory.mktemp("bark"))
    params = load_params(root / "params.yaml")
    run_stage(params, "bark", "data", root)
    run_stage(params, "bark", "tokenize", root)
    run_stage(params, "bark", "train", root, progress=False)
    run_stage(params, "bark", "evaluate", root)
    return root


@pytest.fixture
def bark_copy(bark_project, tmp_path) -> Path:
    """A private copy of the trained bark project, for tests that modify files."""
    return copy_project(bark_project, tmp_path / "project")


def copy_project(src: Path, dest: Path) -> Path:
    """Copy a project folder so the copy is independent, its MLflow store included.

    MLflow's SQLite store records absolute artifact locations, so a plain copy would go on logging
    artifacts into the original's mlruns/ (a test re-evaluating its copy would rewrite the shared
    project's reports); rewrite them, and the run records that name the store, to the copy's folder."""
    import sqlite3

    shutil.copytree(src, dest)
    db = dest / "mlflow.db"
    if db.exists():
        old, new = f"{src.resolve()}/", f"{dest.resolve()}/"
        with sqlite3.connect(db) as con:
            tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            for table in tables:
                for _, column, kind, *_ in con.execute(f"PRAGMA table_info({table})").fetchall():
                    if kind.upper().startswith(("VARCHAR", "TEXT")):
                        con.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?) "
                                    f"WHERE {column} LIKE ?", (old, new, f"%{old}%"))
        con.close()
        for record in dest.rglob("mlflow_run.json"):
            record.write_text(record.read_text().replace(str(src.resolve()), str(dest.resolve())))
        # MLflow caches each run's artifact location by run id alone, and the copy's runs keep the
        # original's ids: forget the cache, or this process would log the copy's artifacts there.
        import sys

        if "mlflow" in sys.modules:
            from mlflow.tracking._tracking_service import utils as tracking_utils

            tracking_utils._artifact_repos_cache.clear()
    return dest


def copy_worktree(dest: Path) -> Path:
    """The working tree's tracked and unignored files, copied into `dest` as a new git repository:
    a fresh clone that also carries uncommitted edits."""
    import subprocess

    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    git = ["git", "-c", "user.name=tests", "-c", "user.email=tests@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "fresh copy"]):
        subprocess.run(git + args, cwd=dest, check=True, capture_output=True)
    return dest


@pytest.fixture(scope="session")
def wikitext_path() -> Path:
    if not SHARED_TEXT.exists():
        pytest.skip(f"{SHARED_TEXT} is absent: the WikiText-2 sample lives in ../shared/data beside the repo")
    return SHARED_TEXT


# --- serving (issue 6): a bark GGUF and real `barkgpt serve` processes on loopback -------------

import contextlib
import tempfile
import os
import subprocess
import sys
import time
from barkgpt.net import free_port  # noqa: F401 (also imported from here)


@contextlib.contextmanager
def run_server(args: list[str], env: dict | None = None, cwd: Path | None = None, timeout: float = 90.0):
    """Start `python -m barkgpt serve ARGS` on a free loopback port; yield its URL once /ready."""
    import httpx

    port = free_port()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    log = open(Path(tempfile.gettempdir()) / f"barkgpt-serve-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "barkgpt", *args, "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning"], cwd=cwd or ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {Path(log.name).read_text()[-2000:]}")
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in {timeout}s: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def bark_gguf(bark_project, tmp_path_factory) -> Path:
    """The trained bark model as a Q8_0 GGUF (the deploy quantization), built with barkgpt.export."""
    from barkgpt.checkpoint import load_model
    from barkgpt.export.gguf_file import write_gguf
    from barkgpt.export.quantize import quantize

    out = tmp_path_factory.mktemp("gguf")
    model, tok = load_model(bark_project / "models" / "bark" / "best.pt")
    f32 = write_gguf(model, tok, out / "bark-f32.gguf")
    return quantize(f32, out / "bark-q8_0.gguf", "q8_0")


@pytest.fixture(scope="session")
def bark_server(bark_project, bark_gguf):
    """`barkgpt serve` over the bark GGUF through llama.cpp (the default backend)."""
    with run_server(["serve", "--model", str(bark_gguf)], cwd=bark_project) as url:
        yield url
