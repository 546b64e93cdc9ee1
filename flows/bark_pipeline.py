"""The `bark-pipeline` flow: data -> validate -> tokenize -> train -> evaluate (MLflow run + registry)
-> export -> quantize -> parity (gate) -> deploy (S3 + Lambda).

Parameters default to params.yaml; `overrides` changes any of them for one run, nested
({"bark": {"train": {"max_steps": 100}}}) or dotted ({"bark.train.max_steps": 100}).
Run in-process on Prefect's local API (no server needed):
    python -m flows.bark_pipeline --set bark.train.max_steps=100
"""
from __future__ import annotations

import sys

import flows  # noqa: F401  (PREFECT_HOME default before prefect loads)
from prefect import flow

from flows.cli import run_flow
from tasks import bark
from tasks.common import run_stage
from tasks.deploy import deploy, deploy_blocker


@flow(name="bark-pipeline", log_prints=True)
def bark_pipeline(overrides: dict | None = None, root: str = ".", params_file: str = "params.yaml",
                  deploy_model: bool = True) -> dict:
    params = bark.resolve_params(params_file, overrides)
    run_stage(bark.bark_data, params, root)
    run_stage(bark.validate, params, root)  # a failure stops the flow here, before training
    run_stage(bark.tokenize, params, root)
    trained = run_stage(bark.train, params, root)
    metrics = run_stage(bark.evaluate, params, root)
    print(f"contract accuracy {metrics['contract_accuracy']:.3f}, gate passed: {metrics['gate_passed']}, "
          f"mlflow: {metrics.get('mlflow')}")
    run_stage(bark.export, params, root)
    run_stage(bark.quantize, params, root)
    parity = run_stage(bark.parity, params, root)  # raises when the deploy quantization fails its gate
    # Last: ship to S3 + Lambda, only when the evaluation (and, for a GGUF, quantization) gates passed.
    deployed, blocker = None, deploy_blocker(params, root, "bark") if deploy_model else "deploy_model=False"
    if blocker:
        print(f"deploy skipped: {blocker}")
    else:
        deployed = deploy(params, root, "bark")
    return {"train": trained, "metrics": metrics, "parity": parity, "deploy": deployed}


def main(argv: list[str] | None = None) -> int:
    return run_flow(bark_pipeline, "Run the bark pipeline flow in this process.", "bark.train.max_steps=100", argv)


if __name__ == "__main__":
    sys.exit(main())
