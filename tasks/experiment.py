"""A flow run's overrides make a DVC experiment, not an edit of params.yaml.

`dvc exp run -S key=value` at a terminal is a user's own act. A flow run started from Prefect's
UI or API, by anyone, would otherwise leave the worker's params.yaml edited behind its user's
back, and every later run would silently train on those values. So a flow run with overrides does
what `dvc exp run --temp` does: the values are written for the run (DVC must judge and record
what really runs), the finished run is saved as a named DVC experiment (`dvc exp save`: params,
lock, metrics, and the outputs into DVC's cache), and then params.yaml, the lock file and every
output are put back as they were. `dvc exp show` lists the experiment; `dvc exp apply <name>`
keeps it. A failed run is not saved; the workspace is put back all the same.

The files put back are copied aside first (in .dvc/tmp/, DVC's scratch), so a flow run killed
half-way is put back by the next flow run (`restore_interrupted`).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from barkgpt.errors import BarkError
from barkgpt.fileio import atomic_path
from barkgpt.layout import Layout
from barkgpt.pipelines import get


def scratch(root: Path) -> Path:
    return root / ".dvc" / "tmp" / "flow-experiment"


def experiment_name(pipeline: str, flow_run_name: str | None) -> str:
    """`<pipeline>-<flow run name>`, git-ref safe: the experiment and the flow run share a name."""
    text = f"{pipeline}-{flow_run_name or 'flow'}"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-")


@dataclass
class Experiment:
    root: Path
    pipeline: str
    name: str

    @classmethod
    def begin(cls, root: Path, pipeline: str, name: str, params_file: str = "params.yaml") -> "Experiment":
        """Copy aside what the run will change: params.yaml, the pipeline's lock file and its
        uncached outputs (reports, metrics). Cached outputs come back from DVC's cache."""
        if not (root / ".git").exists():
            raise BarkError(f"a flow run with overrides is a DVC experiment, and {root.resolve()} is not a git "
                            "repository; set the values in params.yaml instead, or `git init && git add -A && "
                            "git commit -m init` first")
        lay = Layout(pipeline, root)
        keep = [root / params_file, lay.dvc_lock, lay.report_page] + [
            p for s in get(pipeline).stages for p in (*s.reports(lay), *s.metrics(lay))]
        folder = scratch(root)
        shutil.rmtree(folder, ignore_errors=True)
        saved = {}
        for i, path in enumerate(dict.fromkeys(keep)):
            copy = folder / str(i)
            if path.is_dir():
                shutil.copytree(path, copy)
            elif path.exists():
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, copy)
            saved[str(path.relative_to(root))] = str(i) if path.exists() else None
        # cached outputs come back from DVC's cache; those that did not exist are removed again
        absent = [str(p.relative_to(root)) for s in get(pipeline).stages for p in s.outs(lay) if not p.exists()]
        with atomic_path(folder / "manifest.json") as tmp:  # written last: the copies are whole
            tmp.write_text(json.dumps({"pipeline": pipeline, "name": name, "files": saved, "absent": absent}))
        return cls(root, pipeline, name)

    def save(self) -> str:
        """`dvc exp save <dvc.yaml> --name <name> --force --include-untracked ...`: the pipeline as the
        run left it, an experiment (its lock and uncached outputs included where git does not track
        them yet; the other pipelines' stages are not this run's and are left out)."""
        from dvc.repo import Repo

        lay = Layout(self.pipeline, self.root)
        files = [lay.dvc_lock] + [p for s in get(self.pipeline).stages for p in (*s.reports(lay), *s.metrics(lay))]
        untracked = [str(p.relative_to(self.root)) for p in dict.fromkeys(files) if p.is_file()]
        with Repo(str(self.root)) as repo:
            rev = repo.experiments.save(targets=[str(lay.dvc_file.relative_to(self.root))], name=self.name,
                                        force=True, include_untracked=untracked)
        return rev or ""

    def put_back(self) -> None:
        put_back(self.root)


def put_back(root: Path) -> bool:
    """Put params.yaml, the lock file and the outputs back as they were before the experiment
    (files from the copies, cached outputs checked out by DVC). False when there is nothing to do."""
    folder = scratch(root)
    manifest = folder / "manifest.json"
    if not manifest.exists():
        shutil.rmtree(folder, ignore_errors=True)  # a begin() cut short: nothing was changed yet
        return False
    record = json.loads(manifest.read_text())
    for rel, copy in record["files"].items():
        path = root / rel
        if copy is None:  # it did not exist before the run
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        elif (folder / copy).is_dir():
            shutil.rmtree(path, ignore_errors=True)
            shutil.copytree(folder / copy, path)
        else:
            with atomic_path(path) as tmp:
                shutil.copy2(folder / copy, tmp)
    for rel in record.get("absent", []):
        path = root / rel
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    lay = Layout(record["pipeline"], root)
    if lay.dvc_lock.exists():  # the cached outputs the restored lock names, from DVC's cache
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            try:
                repo.checkout(targets=[str(lay.dvc_file.relative_to(root))], force=True, allow_missing=True)
            except Exception as err:  # noqa: BLE001 - DVC's own errors; the lock is true, dvc status will say
                print(f"dvc checkout after the experiment: {err}; `dvc status` says what differs")
    shutil.rmtree(folder, ignore_errors=True)
    return True


def restore_interrupted(root: Path) -> None:
    """A flow run with overrides that was killed left its values in params.yaml: put them back."""
    if put_back(root):
        print("a flow run with overrides was interrupted: params.yaml, the lock file and the outputs are put "
              "back as they were before it (its experiment was not saved)")
