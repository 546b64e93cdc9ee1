"""The deploy task: last in the pipeline flows (only when the gates passed), and the `bark-deploy`
flow's step for re-deploying a registered model version. A thin door onto barkgpt.deploy."""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from tasks.common import to_params, transient_only


def deploy_blocker(params: dict, root: str = ".", name: str = "bark") -> str | None:
    """None when the evaluation (and, for a GGUF, the quantization) gates passed; else why not."""
    from barkgpt.deploy.deployer import check_gates
    from barkgpt.errors import BarkError

    try:
        check_gates(to_params(params), name, Path(root))
    except BarkError as err:
        return str(err)
    return None


# Not cached: a deploy is an effect on the world (and the local AWS API forgets it), not a file.
# Retried once for network trouble; a failed smoke test (a BarkError) fails at once, alias not moved.
@task(name="deploy", cache_policy=NO_CACHE, persist_result=True, result_serializer="json", retries=1,
      retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_condition_fn=transient_only)
def deploy(params: dict, root: str = ".", name: str = "bark") -> dict:
    from barkgpt.deploy.deployer import deploy_pipeline

    report = deploy_pipeline(to_params(params), name, Path(root))
    return summarize(report)  # the flow's report shows it: one summary artifact per flow run


@task(name="redeploy-model-version", cache_policy=NO_CACHE, persist_result=True, result_serializer="json", retries=1,
      retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_condition_fn=transient_only)
def redeploy(params: dict, root: str = ".", name: str = "bark", version: int | None = None,
             alias: str | None = None) -> dict:
    from barkgpt.deploy.registry import redeploy_model_version

    report = redeploy_model_version(to_params(params), name, root, version=version, alias=alias)
    publish_deploy(report, name)
    return {**summarize(report), "registered": report["registered"]}


def summarize(report: dict) -> dict:
    fn, rel = report["function"], report["release"]
    return {"target": report["target"], "release_id": rel["id"], "manifest_uri": rel["manifest_uri"],
            "function": fn["name"], "version": fn["version"], "previous_version": fn["previous_version"],
            "alias": fn["alias"], "changed": fn["changed"], "url": fn["url"],
            "smoke_reply": (report.get("smoke") or {}).get("reply"), "registry_matches": report.get("registry_matches")}


def publish_deploy(report: dict, name: str) -> None:
    fn, rel, smoke = report["function"], report["release"], report.get("smoke") or {}
    cold = smoke.get("cold_start") or {}
    rows = [("target", report["target"]), ("release", f"{rel['id']} ({rel['status']})"),
            ("manifest", rel["manifest_uri"]), ("function", fn["arn"]),
            ("alias", f"{fn['alias']} -> version {fn['version']} (was {fn['previous_version']})"),
            ("changed", ", ".join(fn["changed"]) or "nothing"), ("url", f"{fn['url']} ({fn['url_auth_type']})"),
            ("smoke reply", repr(smoke.get("reply"))),
            ("cold start", f"{cold.get('cold_start_s', 0) * 1000:.0f} ms" if cold else "-"),
            ("registry hashes match", str(report.get("registry_matches") or "-"))]
    create_markdown_artifact(
        key=f"{name}-deploy", description=f"{name} deployment",
        markdown="\n".join([f"# Deployment ({name})", "", "| | |", "|---|---|",
                            *[f"| {k} | `{v}` |" for k, v in rows]]))
