"""Deploy gates: what must have passed before a model ships. One implementation, in barkgpt.gates:
every report that judged what ships (evaluation; parity for a GGUF) must describe these exact files
(their sha256), have been measured under these params and pass its gate; a stale or failing report
is named with the stage to re-run. Where the model is tracked, the registry must agree: the report
is the one the stage wrote (its sha256 tag) and the version's gate tag says the same."""
from __future__ import annotations

from pathlib import Path

from barkgpt.errors import BarkError
from barkgpt.fileio import read_json, sha256_file
from barkgpt.gates import GateError, check_release, deploy_quantization, judge  # noqa: F401 (deploy_quantization: API)
from barkgpt.layout import layout
from barkgpt.params import SharedParams


def check_gates(params: SharedParams, name: str, root: Path) -> dict:
    if not params.deploy.require_gates:
        return {}
    summary = check_release(params, name, Path(root), params.deploy.artifact)
    check_registry_agrees(params, name, Path(root))
    check_dvc_fresh(params, name, Path(root))
    return summary


def check_registry_agrees(params: SharedParams, name: str, root: Path) -> None:
    """GateError when the MLflow registry's version of the shipped checkpoint disagrees with a gating
    report (edited by hand since the stage wrote it, or a different verdict). Untracked: nothing to check."""
    from barkgpt.tracking.registry import model_name, report_disagreement

    lay = layout(name, root)
    record = read_json(lay.run_record) if lay.run_record.exists() else {}
    if not (params.tracking.enabled or record.get("tracking_uri")):
        return
    from barkgpt.tracking.runs import resolve_uri

    uri = record.get("tracking_uri") or resolve_uri(params.tracking, root)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):].split("?")[0]).exists():
        return  # no store, so no version to disagree with (and deploy creates none)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    reports = [(lay.metrics, "evaluate")]
    if params.deploy.artifact == "gguf":
        reports.append((lay.parity_report, "parity"))
    checkpoint_sha = sha256_file(lay.checkpoint)
    problems = []
    for path, stage in reports:
        verdict = judge(read_json(path), params)
        try:
            problem = report_disagreement(client, model_name(params, name), checkpoint_sha, path, verdict.passed, stage)
        except BarkError:
            raise
        except Exception as err:  # MlflowException: the store cannot be read
            raise BarkError(f"cannot read the MLflow registry to check {path} ({type(err).__name__}: {err}); start "
                            "the tracking server, or set tracking.enabled: false") from None
        if problem:
            problems.append(problem)
    if problems:
        raise GateError("not releasing this model:" + "".join(f"\n  - {p}" for p in problems))


def judged_sha256(params: SharedParams, name: str, root: Path) -> dict[Path, str]:
    """{resolved path: sha256} of every file the shipping model's gating reports judged."""
    lay = layout(name, root)
    reports = [lay.metrics] + ([lay.parity_report] if params.deploy.artifact == "gguf" else [])
    out: dict[Path, str] = {}
    for report in reports:
        for entry in (read_json(report).get("judged") or {}).values():
            path = Path(entry["path"])
            out[(path if path.is_absolute() else Path(root) / path).resolve()] = entry["sha256"]
    return out


def check_dvc_fresh(params: SharedParams, name: str, root: Path) -> None:
    """In a DVC project: GateError unless `dvc status` (DVC's own judgement, run as a command: the
    library never imports DVC) finds the gating stages and everything upstream of them unchanged
    since dvc.lock recorded them. A report produced outside DVC, or under another params file,
    shows up here as a changed output or param."""
    import shutil
    import subprocess
    import sys

    from barkgpt.layout import dvc_file

    root = Path(root)
    if not (root / ".dvc").is_dir() or not (root / "dvc.lock").exists():
        return  # not a DVC project (a staged registry version, a test folder): the reports' hashes bind it
    stages = ["evaluate"] + (["parity"] if params.deploy.artifact == "gguf" else [])
    targets = [f"{dvc_file(name)}:{name}-{s}" for s in stages]  # as barkgpt/pipelines/base.py names them
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")
    if dvc is None:
        raise BarkError("cannot check the pipeline with `dvc status`: the dvc command is not installed; "
                        "install barkgpt[all], or set deploy.require_gates: false to override")
    import json

    done = subprocess.run([dvc, "status", "--json", "--with-deps", *targets], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["no message"])[-1][:300]
        raise BarkError(f"`dvc status` failed ({first}); fix what it names before deploying")
    try:
        changed = json.loads(done.stdout or "{}")
    except ValueError:
        changed = {"?": done.stdout[:200]}
    if changed:
        shown = "; ".join(f"{stage}: {json.dumps(what)[:160]}" for stage, what in list(changed.items())[:5])
        raise GateError(f"not releasing this model: DVC says the pipeline is not what dvc.lock records ({shown}); "
                        "run `dvc repro` (or the flow) so the gates judge what DVC tracks")
