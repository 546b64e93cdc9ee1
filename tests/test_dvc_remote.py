"""The default DVC remote (a local folder, .dvc-remote/, kept in git): push from one clone, pull into a fresh one;
and it holds only what the committed dvc.lock needs, so retraining does not pile up objects in it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import json

import yaml

from tests.conftest import ROOT

BIN = Path(sys.executable).parent


def sh(cmd: list[str], cwd: Path, env: dict) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, f"{cmd}: {out.stdout[-2000:]}{out.stderr[-2000:]}"
    return out.stdout


def test_fresh_clone_dvc_pull_restores_the_data(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for item in ("barkgpt", ".dvc/config", ".dvcignore", ".gitignore", "dvc.yaml"):
        dest = src / item
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree(ROOT / item, dest, ignore=shutil.ignore_patterns("__pycache__"))
         if (ROOT / item).is_dir() else shutil.copy(ROOT / item, dest))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["bark"]["data"].update(train_conversations=300, val_conversations=60)
    (src / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(src),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GX_ANALYTICS_ENABLED": "False"}
    sh(["git", "init", "-q"], src, env)
    sh([str(BIN / "dvc"), "repro", "bark-validate"], src, env)
    assert "local" in sh([str(BIN / "dvc"), "remote", "list"], src, env)
    sh([str(BIN / "dvc"), "push"], src, env)
    assert any((src / ".dvc-remote").rglob("*")), "dvc push wrote nothing to .dvc-remote/"
    sh(["git", "add", "-A"], src, env)
    sh(["git", "commit", "-qm", "data"], src, env)
    tracked = sh(["git", "ls-files"], src, env).split()
    # the data is in git only as DVC's content-addressed objects in the remote that ships with the repo
    assert "data/bark/train.txt" not in tracked and any(t.startswith(".dvc-remote/") for t in tracked)

    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(src), str(clone)], tmp_path, env)
    assert not (clone / "data/bark/train.txt").exists()
    # (targets: this small test ran only the data stages; in a full project plain `dvc pull` does all)
    sh([str(BIN / "dvc"), "pull", "bark-data"], clone, env)
    for f in ("data/bark/train.txt", "data/bark/val.txt"):
        assert (clone / f).read_bytes() == (src / f).read_bytes()
    status = sh([str(BIN / "dvc"), "status", "bark-data"], clone, env)
    assert "changed" not in status


def lock_objects(root: Path) -> tuple[set[Path], set[Path]]:
    """(objects dvc.lock's cached outputs need, every object dvc.lock names) under .dvc-remote/."""
    store = root / ".dvc-remote" / "files" / "md5"
    declared = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    uncached = {next(iter(o)) for st in declared.values() for kind in ("outs", "metrics", "plots")
                for o in st.get(kind, []) if isinstance(o, dict) and next(iter(o.values())).get("cache") is False}
    needed, named = set(), set()
    for stage in yaml.safe_load((root / "dvc.lock").read_text())["stages"].values():
        for out in stage.get("outs", []):
            obj = store / out["md5"][:2] / out["md5"][2:]
            named.add(obj)
            if out["path"] in uncached:
                continue  # in git itself, never pushed
            needed.add(obj)
            if out["md5"].endswith(".dir"):
                needed |= {store / e["md5"][:2] / e["md5"][2:] for e in json.loads(obj.read_text())}
    return needed, named | needed


def test_in_repo_remote_holds_exactly_what_dvc_lock_needs():
    """Bounded: every object in .dvc-remote/ is one the committed dvc.lock needs (a fresh clone's
    `dvc pull` gets all of them), and none is left from an older model. After `dvc push`, prune
    with `dvc gc --workspace --cloud --remote local --force`."""
    needed, named = lock_objects(ROOT)
    have = {p for p in (ROOT / ".dvc-remote").rglob("*") if p.is_file()}
    missing = sorted(str(p.relative_to(ROOT)) for p in needed - have)
    stale = sorted(str(p.relative_to(ROOT)) for p in have - named)
    assert not missing, f"dvc.lock needs objects the in-repo remote lacks (run dvc push): {missing}"
    assert not stale, ("objects no output of dvc.lock uses (prune: dvc gc --workspace --cloud --remote local "
                       f"--force): {stale}")
    assert sum(p.stat().st_size for p in have) < 16 << 20  # one bark pipeline's data and models
