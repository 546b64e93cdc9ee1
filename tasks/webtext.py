"""Stage tasks only the WebText-2 pipeline has; the shared ones (tokenize, train, evaluate, export,
quantize, parity) are in tasks/bark.py and take the pipeline `name`."""
from __future__ import annotations

from prefect.artifacts import create_table_artifact

from barkgpt import stages
from tasks.common import stage_task, to_params


@stage_task("ingest")
def ingest(params: dict, root: str = ".", name: str = "webtext") -> dict:
    report = stages.webtext_ingest(to_params(params), root)
    create_table_artifact(key="webtext-ingest", description="WebText-2 ingestion: lines kept and dropped",
                          table=[{"field": k, "value": v} for k, v in report.items() if isinstance(v, (int, float, str))])
    return report


@stage_task("tokenizer")
def tokenizer(params: dict, root: str = ".", name: str = "webtext") -> dict:
    return stages.webtext_tokenizer(to_params(params), root)


@stage_task("validate-tokens", retries=0)  # a failed suite is a verdict, not a transient error
def validate_tokens(params: dict, root: str = ".", name: str = "webtext") -> dict:
    """Great Expectations on the token shards (dvc stage `webtext-validate-tokens`)."""
    import json

    from barkgpt.errors import BarkError
    from tasks.bark import publish_validation

    try:
        report = stages.validate(to_params(params), name, root, tokens=True)
    except BarkError:
        path = stages.paths_for(name, root).token_validation_report
        if path.exists():
            publish_validation(json.loads(path.read_text()), f"{name}-tokens")
        raise
    publish_validation(report, f"{name}-tokens")
    return {k: v for k, v in report.items() if k != "suites"}
