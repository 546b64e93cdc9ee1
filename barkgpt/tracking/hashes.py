"""Content hashes a run and a model version are tagged with: DVC's md5s of the data from dvc.lock,
and our own sha256 over the token shards."""
from __future__ import annotations

import hashlib

import yaml

from barkgpt.fileio import sha256_file


def dvc_data_md5(paths) -> dict[str, str]:
    """The md5 DVC recorded in the project's current dvc.lock for each output under data/<pipeline>/."""
    # the default pipeline's lock is the root's; another pipeline's sits beside its dvc.yaml
    lock = next((f for f in (paths.root / "dvc.lock", paths.root / "pipelines" / paths.pipeline / "dvc.lock")
                 if f.exists()), None)
    if lock is None:
        return {}
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return {}
    prefix = str(paths.data.relative_to(paths.root)) + "/"
    return {o["path"]: o["md5"] for st in stages.values() if isinstance(st, dict) for o in st.get("outs", [])
            if str(o.get("path", "")).startswith(prefix) and o.get("md5")}


def tokens_sha256(paths) -> str | None:
    shards = sorted(paths.tokens.glob("*")) if paths.tokens.exists() else []
    if not shards:
        return None
    digest = hashlib.sha256()
    for f in shards:
        digest.update(f.name.encode() + sha256_file(f).encode())
    return digest.hexdigest()
