"""The `webtext-pipeline` flow: ingest -> validate (Great Expectations) -> BPE tokenizer -> tokenize
-> validate tokens -> train -> evaluate (bits per byte, MLflow) -> export -> quantize -> parity (gate)
-> deploy (S3 + Lambda).

Same stage functions as `dvc repro pipelines/webtext/dvc.yaml`. Point it at a local corpus:
    python -m flows.webtext_pipeline --set webtext.source=../shared/data/wikitext-2-valid.txt
"""
from __future__ import annotations

import sys

import flows  # noqa: F401  (PREFECT_HOME default before prefect loads)
from prefect import flow

from flows.cli import run_flow
from tasks import bark, webtext
from tasks.common import run_stage
from tasks.deploy import deploy, deploy_blocker

NAME = "webtext"


@flow(name="webtext-pipeline", log_prints=True)
def webtext_pipeline(overrides: dict | None = None, root: str = ".", params_file: str = "params.yaml",
                     deploy_model: bool = True) -> dict:
    params = bark.resolve_params(params_file, overrides)
    ingested = run_stage(webtext.ingest, params, root, NAME)
    run_stage(bark.validate, params, root, NAME)  # a failed suite stops the flow before training
    run_stage(webtext.tokenizer, params, root, NAME)
    run_stage(bark.tokenize, params, root, NAME)
    run_stage(webtext.validate_tokens, params, root, NAME)
    trained = run_stage(bark.train, params, root, NAME)
    metrics = run_stage(bark.evaluate, params, root, NAME)
    print(f"validation bits per byte {metrics.get('val_bpb')}, gate passed: {metrics.get('gate_passed')}")
    run_stage(bark.export, params, root, NAME)
    run_stage(bark.quantize, params, root, NAME)
    parity = run_stage(bark.parity, params, root, NAME)
    deployed, blocker = None, deploy_blocker(params, root, NAME) if deploy_model else "deploy_model=False"
    if blocker:
        print(f"deploy skipped: {blocker}")
    else:
        deployed = deploy(params, root, NAME)
    return {"ingest": ingested, "train": trained, "metrics": metrics, "parity": parity, "deploy": deployed}


def main(argv: list[str] | None = None) -> int:
    return run_flow(webtext_pipeline, "Run the WebText-2 pipeline flow in this process.",
                    "webtext.train.max_seconds=60", argv)


if __name__ == "__main__":
    sys.exit(main())
