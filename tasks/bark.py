"""Stage tasks of the bark pipeline (and of any pipeline sharing its stages, by `name`).

Each is a thin wrapper: parse params, call barkgpt.stages, publish what a person wants to see in
the Prefect UI as artifacts. To add a stage: write one `@stage_task("<stage>")` function like
these (the stage must be in dvc.yaml as `<pipeline>-<stage>`) and call it from the flow.
"""
from __future__ import annotations

import json

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from barkgpt import stages
from barkgpt.errors import BarkError
from barkgpt.params import deep_merge, load_params
from tasks.common import run_tags, stage_task, to_params


def expand_dotted(overrides: dict) -> dict:
    """{'bark.train.max_steps': 50} -> {'bark': {'train': {'max_steps': 50}}}; nested dicts pass through."""
    out: dict = {}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            value = expand_dotted(value)
        for part in reversed(str(key).split(".")[1:]):
            value = {part: value}
        out = deep_merge(out, {str(key).split(".")[0]: value})
    return out


@task(name="resolve-params")
def resolve_params(params_file: str = "params.yaml", overrides: dict | None = None) -> dict:
    """params.yaml merged with the run's overrides, validated: an invalid key fails here, named."""
    return load_params(params_file, expand_dotted(overrides or {})).model_dump()


@stage_task("data")
def bark_data(params: dict, root: str = ".", name: str = "bark") -> dict:
    return stages.bark_data(to_params(params), root)


@stage_task("validate", retries=0)
def validate(params: dict, root: str = ".", name: str = "bark") -> dict:
    try:
        report = stages.validate(to_params(params), name, root)
    except BarkError as err:
        path = stages.paths_for(name, root).validation_report
        if path.exists():
            publish_validation(json.loads(path.read_text()), name)
        raise err
    publish_validation(report, name)
    return {k: v for k, v in report.items() if k != "suites"}


def publish_validation(report: dict, name: str) -> None:
    rows = [f"| {s['suite']} | {c['expectation']} | {c['column']} | {'pass' if c['success'] else '**FAIL**'} | "
            f"{c['unexpected_count']} | {', '.join(map(str, c['unexpected_rows'][:10]))} |"
            for s in report["suites"] for c in s["checks"]]
    status = "passed" if report["success"] else "FAILED"
    create_markdown_artifact(
        key=f"{name}-validation",
        markdown="\n".join([f"# Data validation ({name}): {status}",
                            f"{report['expectations'] - report['failed']} of {report['expectations']} "
                            "expectations passed.", "",
                            "| suite | expectation | column | result | unexpected | rows |",
                            "|---|---|---|---|---|---|", *rows]),
        description=f"Great Expectations result for the {name} data",
    )


@stage_task("tokenize")
def tokenize(params: dict, root: str = ".", name: str = "bark") -> dict:
    return stages.tokenize(to_params(params), name, root)


@stage_task("train", retries=0)  # a failed training run is not transient; do not burn CPU twice
def train(params: dict, root: str = ".", name: str = "bark") -> dict:
    return stages.train(to_params(params), name, root, progress=False, tags=run_tags())


@stage_task("evaluate")
def evaluate(params: dict, root: str = ".", name: str = "bark") -> dict:
    metrics = stages.evaluate(to_params(params), name, root, tags=run_tags())
    publish_evaluation(metrics, stages.paths_for(name, root), name)
    return metrics


def publish_evaluation(metrics: dict, paths, name: str) -> None:
    table = [{"metric": k, "value": v} for k, v in metrics.items() if isinstance(v, (int, float, bool))]
    table += [{"metric": f"ood: {k}", "value": v} for k, v in metrics.get("ood_contract_rate", {}).items()]
    reg = metrics.get("mlflow") or {}
    if reg:
        table.append({"metric": "mlflow model", "value": f"{reg['registered_model']} v{reg['version']}"
                      f"{' @champion' if reg['champion'] else ''} (run {reg['run_id']})"})
    create_table_artifact(key=f"{name}-metrics", table=table, description=f"{name} evaluation metrics")
    samples = json.loads(paths.samples.read_text()) if paths.samples.exists() else {}
    lines = [f"# Sample generations ({name})", f"Prompt: `{samples.get('prompt', '')}`", ""]
    lines += [f"- `{c}`" for c in samples.get("completions", [])[:10]]
    for prompt, outs in samples.get("ood", {}).items():
        lines += ["", f"Out-of-distribution prompt `{prompt}`:"] + [f"- `{c}`" for c in outs]
    create_markdown_artifact(key=f"{name}-samples", markdown="\n".join(lines),
                             description=f"{name} completions sampled by the evaluation")


@stage_task("export")
def export(params: dict, root: str = ".", name: str = "bark") -> dict:
    return stages.export(to_params(params), name, root)


@stage_task("quantize")
def quantize(params: dict, root: str = ".", name: str = "bark") -> dict:
    return stages.quantize(to_params(params), name, root)


@stage_task("parity", retries=0)  # a failed gate is a verdict, not a transient error
def parity(params: dict, root: str = ".", name: str = "bark") -> dict:
    try:
        result = stages.parity(to_params(params), name, root)
    finally:  # publish the table also when the gate fails: that is when a person needs it most
        path = stages.paths_for(name, root).parity_report
        if path.exists():
            publish_parity(json.loads(path.read_text()), name)
    return result


def publish_parity(report: dict, name: str) -> None:
    rows = [{"file": q, "status": e.get("status"), "metric": e.get("metric"), "value": e.get("value"),
             "delta_vs_f32": e.get("delta"), "size_ratio_vs_f32": e.get("size_ratio_vs_f32")}
            for q, e in report.get("quantizations", {}).items()]
    create_table_artifact(key=f"{name}-parity", table=rows,
                          description=f"{name}: llama.cpp quantizations vs F32 (gate: {report.get('gate')})")
