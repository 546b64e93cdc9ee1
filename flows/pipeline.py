"""One flow for every pipeline: its stages in declared order, each judged by DVC (tasks/stages.py),
then deploy (S3 + Lambda) when the gates passed. Prefect knows it as `<pipeline>-pipeline`
(bark-pipeline, webtext-pipeline, localtext-pipeline), one flow object per declared pipeline.

Parameters default to params.yaml. `overrides` changes any of them, nested or dotted, for this run
only: the run is a DVC experiment named after the flow run (tasks/experiment.py), params.yaml and
the outputs are put back after it, and `dvc exp apply <name>` keeps it. A gated experiment still
deploys (e.g. `deploy.artifact` or a GPU pool's `train.device` as a deployment's overrides): the
release records what it judged, and the experiment keeps what made it.
    python -m flows.pipeline bark --set bark.train.max_steps=200
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import flows  # noqa: F401  (PREFECT_HOME and result defaults before prefect loads)
from prefect import allow_failure, flow
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote

from barkgpt.layout import Layout
from barkgpt.params import parse_assignments
from barkgpt.pipelines import REGISTRY, get
from tasks.common import resolve_params
from tasks.deploy import deploy, deploy_blocker
from tasks.experiment import Experiment, experiment_name, restore_interrupted
from tasks.stages import publish_report, restore_interrupted_lock, run_stage


def upstream(pipe, lay) -> dict[str, list[str]]:
    """Each stage's upstream stages: those that write a file it reads (derived from the declared
    deps and outputs, as DVC derives its DAG), so Prefect's task graph is the pipeline's own."""
    def written(stage) -> list[Path]:
        return [*stage.outs(lay), *stage.reports(lay), *stage.metrics(lay)]

    def overlaps(a: Path, b: Path) -> bool:
        return a == b or a in b.parents or b in a.parents

    graph: dict[str, list[str]] = {}
    for i, stage in enumerate(pipe.stages):
        graph[stage.name] = [before.name for before in pipe.stages[:i]
                             if any(overlaps(dep, out) for dep in stage.deps(lay) for out in written(before))]
    return graph


def run_pipeline(pipeline: str, overrides: dict | None, root: str, params_file: str, deploy_model: bool) -> dict:
    restore_interrupted_lock(Path(root))  # before DVC reads it: a killed commit's lock put back, a broken one named
    restore_interrupted(Path(root))  # a killed experiment's params.yaml and outputs put back
    experiment = None
    if overrides:
        experiment = Experiment.begin(Path(root), pipeline, experiment_name(pipeline, flow_run.get_name()),
                                      params_file)
    try:
        return run_stages(pipeline, overrides, root, params_file, deploy_model, experiment)
    finally:
        if experiment:
            experiment.put_back()
            print(f"params.yaml and the {pipeline} outputs are as they were before this run")


def run_stages(pipeline: str, overrides: dict | None, root: str, params_file: str, deploy_model: bool,
               experiment: Experiment | None) -> dict:
    from barkgpt.pipelines.dvcfile import write_dvc_files

    resolved = resolve_params(params_file, overrides, root, pipeline, return_state=True)
    params = resolved.result()  # an invalid value stops the flow here, named
    for path in write_dvc_files(Path(root), [pipeline]):  # a project older than its code: bring it level first
        print(f"wrote {path} from the pipeline declarations")
    pipe = get(pipeline)
    graph = upstream(pipe, Layout(pipeline, Path(root)))
    results, states = {}, {}
    try:
        for stage in pipe.stages:  # a failure (bad data, a failed gate) stops the flow here
            # Arguments quoted: Prefect would otherwise draw an edge from every task whose result
            # holds an equal object (the params, the pipeline's name). The edges are the stages this
            # one reads from (wait_for), or resolve-params for the first.
            after = [states[name] for name in graph[stage.name]] or [resolved]
            states[stage.name] = run_stage.with_options(name=stage.name)(
                quote(params), quote(pipeline), quote(stage.name), quote(root), wait_for=after, return_state=True)
            results[stage.name] = states[stage.name].result()
        evaluation = results.get("evaluate", {})
        print(f"{pipeline}: {pipe.metric} {evaluation.get(pipe.metric)}, gate passed: {evaluation.get('gate_passed')}")
        if experiment:  # saved before anything else can fail: the run's result is kept
            experiment.save()
            print(f"saved as DVC experiment {experiment.name}: `dvc exp show` lists it, "
                  f"`dvc exp apply {experiment.name}` keeps it")
        blocker = deploy_blocker(params, root, pipeline) if deploy_model else "deploy_model=False"
        if blocker:
            print(f"deploy skipped: {blocker}")
        else:
            last = states[pipe.stages[-1].name]
            states["deploy"] = deploy(quote(params), quote(root), quote(pipeline), wait_for=[last], return_state=True)
            results["deploy"] = states["deploy"].result()
    finally:  # the flow run's one summary artifact, also (above all) when a stage failed
        last = list(states.values())[-1:] or [resolved]
        results["report"] = publish_report(quote(params), quote(pipeline), quote(root),
                                           wait_for=[allow_failure(state) for state in last])
    return results


def pipeline_flow(pipeline: str):
    # The flow's result (small JSON summaries of each stage) persisted as JSON, never pickled.
    @flow(name=f"{pipeline}-pipeline", log_prints=True, persist_result=True, result_serializer="json",
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
                        help="a params value for this run only, e.g. bark.train.max_steps=200 (repeatable): "
                             "the run is saved as a DVC experiment, params.yaml is left as it was")
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
