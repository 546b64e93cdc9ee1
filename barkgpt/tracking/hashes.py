"""Content hashes a run and a model version are tagged with: DVC's md5s of the data from dvc.lock,
and our own sha256 over the token shards."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from barkgpt.fileio import sha256_file


def dvc_data_md5(paths) -> dict[str, str]:
    """The md5 DVC recorded for each output under data/<pipeline>/, in the pipeline's own dvc.lock
    (the layout says which: the root's, or pipelines/<p>/dvc.lock). The one reader of dvc.lock."""
    from barkgpt.dvclock import read_lock

    stages = (read_lock(paths.dvc_lock) or {}).get("stages", {})  # a corrupt lock: one error, named
    # paths in a lock are relative to its stages' wdir: every pipeline's runs in the project root
    prefix = paths.data.relative_to(paths.root).as_posix() + "/"
    return {o["path"]: o["md5"] for st in stages.values() if isinstance(st, dict) for o in st.get("outs", [])
            if isinstance(o, dict) and str(o.get("path", "")).startswith(prefix) and o.get("md5")}


def dvc_data_hash(paths) -> dict | None:
    """The md5s of the pipeline's data outputs and one hash over them (what a release records)."""
    outs = dvc_data_md5(paths)
    if not outs:
        return None
    return {"hash": hashlib.md5(json.dumps(sorted(outs.items())).encode()).hexdigest(), "outs": outs}


def tokens_sha256(paths) -> str | None:
    shards = sorted(paths.tokens.glob("*")) if paths.tokens.exists() else []
    if not shards:
        return None
    digest = hashlib.sha256()
    for f in shards:
        digest.update(f.name.encode() + sha256_file(f).encode())
    return digest.hexdigest()


def git_commit(root: Path) -> dict | None:
    """The commit checked out (and whether tracked files differ from it) in the project, else in
    the code's own checkout; None outside git."""
    for folder in (Path(root), Path(__file__).resolve().parent):
        try:
            commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=10)
            if commit.returncode != 0:
                continue
            dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip() != ""
        except (OSError, subprocess.SubprocessError):
            continue
        return {"commit": commit.stdout.strip(), "dirty": dirty}
    return None
