"""One flow for every pipeline: its stages in declared order, each judged by DVC (tasks/stages.py),
then deploy (S3 + Lambda) when the gates passed. Prefect knows it as `<pipeline>-pipeline`
(bark-pipeline, webtext-pipeline, localtext-pipeline), one flow object per declared pipeline.

Parameters default to params.yaml; `overrides` changes any of them, nested or dotted, and is
written into params.yaml (as `dvc exp run -S` does) so DVC judges what actually runs:
    python -m flows.pipeline bark --set bark.train.max_steps=200
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import flows  # noqa: F401  (PREFECT_HOME and result defaults before prefect loads)
from prefect import flow

from barkgpt.params import parse_assignments
from barkgpt.pipelines import REGISTRY, get
from tasks.common import resolve_params
from tasks.deploy import deploy, deploy_blocker
from tasks.stages import publish_report, restore_interrupted_lock, run_stage


def run_pipeline(pipeline: str, overrides: dict | None, root: str, params_file: str, deploy_model: bool) -> dict:
    from barkgpt.pipelines.dvcfile import write_dvc_files

    restore_interrupted_lock(Path(root))  # before DVC reads it: a killed commit's lock put back, a broken one named
    params = resolve_params(params_file, overrides, root, pipeline)
    for path in write_dvc_files(Path(root), [pipeline]):  # a pipeline's stages join DVC on its first run
        print(f"wrote {path} from the pipeline declarations")
    results = {}
    for stage in get(pipeline).stages:  # a failure (bad data, a failed gate) stops the flow here
        results[stage.name] = run_stage.with_options(name=stage.name)(params, pipeline, stage.name, root)
    results["report"] = publish_report(params, pipeline, root)
    evaluation = results.get("evaluate", {})
    print(f"{pipeline}: {get(pipeline).metric} {evaluation.get(get(pipeline).metric)}, "
          f"gate passed: {evaluation.get('gate_passed')}")
    blocker = deploy_blocker(params, root, pipeline) if deploy_model else "deploy_model=False"
    if blocker:
        print(f"deploy skipped: {blocker}")
    else:
        results["deploy"] = deploy(params, root, pipeline)
    return results


def pipeline_flow(pipeline: str):
    @flow(name=f"{pipeline}-pipeline", log_prints=True, persist_result=False,
          description=get(pipeline).description)
    def run(overrides: dict | None = None, root: str = ".", params_file: str = "params.yaml",
            deploy_model: bool = True) -> dict:
        return run_pipeline(pipeline, overrides, root, params_file, deploy_model)

    return run


FLOWS = {name: pipeline_flow(name) for name in REGISTRY}
# Module attributes, so prefect.yaml can name them: flows/pipeline.py:bark_pipeline, ...
globals().update({f"{name}_pipeline": f for name, f in FLOWS.items()})


def main(argv: list[str] | None = None) -> int:
    """Run a pipeline's flow in this process (Prefect's local API); exit 2 on a BarkError."""
    from barkgpt.errors import BarkError

    parser = argparse.ArgumentParser(description="Run a pipeline's flow in this process.")
    parser.add_argument("pipeline", choices=list(FLOWS), help="which pipeline")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set a params.yaml value for this run and after, e.g. bark.train.max_steps=200 "
                             "(repeatable; written into params.yaml, like dvc exp run -S)")
    parser.add_argument("--root", default=".", help="the project folder (default: here)")
    parser.add_argument("--params", default="params.yaml", help="params file inside the root")
    parser.add_argument("--no-deploy", action="store_true", help="stop after the parity gate")
    args = parser.parse_args(argv)
    try:
        result = FLOWS[args.pipeline](overrides=parse_assignments(args.set), root=args.root, params_file=args.params,
                                      deploy_model=not args.no_deploy)
    except BarkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.get("evaluate", {}), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
