"""dvc.lock, read before anything trusts it (the library never imports DVC: this is YAML)."""
from __future__ import annotations

from pathlib import Path

import yaml

from barkgpt.errors import BarkError


def read_lock(path: Path) -> dict | None:
    """A dvc.lock (the path: the pipeline's layout says which), parsed (None when there is none), or
    one BarkError naming the fix when it is empty or corrupt: DVC rewrites it in place, so a process
    killed while DVC writes it leaves it empty or cut short, and every command that trusts it must
    stop before it does. The one reader of lock files."""
    path = Path(path)
    if path.is_dir():  # a project root: its default pipeline's lock
        path = path / "dvc.lock"
    if not path.exists():
        return None
    fix = (f"restore it from git (git checkout -- {path.name}), or rebuild it with dvc repro (which re-runs "
           "the stages it can no longer vouch for)")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise BarkError(f"{path} cannot be read ({err.strerror}); {fix}") from None
    if not raw.strip():
        raise BarkError(f"{path} is empty (a process was killed while DVC wrote it?); {fix}")
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0][:120]
        raise BarkError(f"{path} is corrupt: not YAML text ({first}); {fix}") from None
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, dict) or not all(isinstance(s, dict) for s in stages.values()):
        raise BarkError(f"{path} is corrupt: not DVC's mapping of stages; {fix}")
    return data
