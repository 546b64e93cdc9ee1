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
from barkgpt.params import Params


def check_gates(params: Params, name: str, root: Path) -> dict:
    if not params.deploy.require_gates:
        return {}
    summary = check_release(params, name, Path(root), params.deploy.artifact)
    check_registry_agrees(params, name, Path(root))
    return summary


def check_registry_agrees(params: Params, name: str, root: Path) -> None:
    """GateError when the MLflow registry's version of the shipped checkpoint disagrees with a gating
    report (edited by hand since the stage wrote it, or a different verdict). Untracked: nothing to check."""
    from barkgpt.tracking.registry import model_name, report_disagreement

    lay = layout(name, root)
    record = read_json(lay.run_record) if lay.run_record.exists() else {}
    if not (params.tracking.enabled or record.get("tracking_uri")):
        return
    if record.get("tracking_uri"):
        import mlflow

        uri = record["tracking_uri"]
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    else:
        from barkgpt.tracking.runs import client_for

        client = client_for(params, root)[1]
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


def judged_sha256(params: Params, name: str, root: Path) -> dict[Path, str]:
    """{resolved path: sha256} of every file the shipping model's gating reports judged."""
    lay = layout(name, root)
    reports = [lay.metrics] + ([lay.parity_report] if params.deploy.artifact == "gguf" else [])
    out: dict[Path, str] = {}
    for report in reports:
        for entry in (read_json(report).get("judged") or {}).values():
            path = Path(entry["path"])
            out[(path if path.is_absolute() else Path(root) / path).resolve()] = entry["sha256"]
    return out
