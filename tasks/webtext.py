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
