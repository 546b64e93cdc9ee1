"""What every task shares: parameters (validated, and written where DVC reads them), retries for
transient I/O only, and the Prefect ids an MLflow run is tagged with."""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from barkgpt.config import load_params, parse_params
from barkgpt.errors import BarkError
from barkgpt.fileio import atomic_path
from barkgpt.params import expand_dotted

TRANSIENT = (OSError, ConnectionError, TimeoutError)  # disk and network hiccups; worth a retry


def dvc_yaml():
    """A YAML round-tripper that writes what DVC writes (dvc/utils/serialize/_yaml.py): ruamel's
    round trip, comments and flow lists kept, null as an empty value, no needless quotes. The
    committed params.yaml is already in this form (tests/test_params_format.py), so a change made
    by `dvc exp run -S`, or by a flow's overrides, is a one-line diff."""
    from collections import OrderedDict

    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.default_flow_style = False
    yaml.Representer.add_representer(OrderedDict, yaml.Representer.represent_dict)
    return yaml


def write_overrides(path: Path, nested: dict) -> list[str]:
    """Set the overridden values in params.yaml itself, comments kept (as `dvc exp run -S` does), so
    DVC judges and records what actually ran. Returns the dotted keys whose value changed."""
    yaml = dvc_yaml()
    data = yaml.load(path.read_text()) or {}
    changed: list[str] = []

    def merge(node, extra: dict, prefix: str) -> None:
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                merge(node[key], value, f"{prefix}{key}.")
            elif node.get(key) != value:
                node[key] = value
                changed.append(f"{prefix}{key}")

    merge(data, nested, "")
    if changed:
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            yaml.dump(data, f)
    return changed


@task(name="resolve-params", cache_policy=NO_CACHE, persist_result=True, result_serializer="json")
def resolve_params(params_file: str = "params.yaml", overrides: dict | None = None, root: str = ".",
                   pipeline: str | None = None) -> dict:
    """params.yaml merged with the run's overrides, validated (an invalid key fails here, named),
    then written into params.yaml for the run, so DVC judges and records what really runs (the
    flow saves such a run as a DVC experiment and puts params.yaml back: tasks/experiment.py).

    Another params file is accepted only where it agrees with params.yaml on every key the
    pipeline's DVC stages track: DVC records params.yaml's values in dvc.lock, so a run under
    other values would be recorded under a lie (and `dvc repro` would then refuse to redo it)."""
    path = Path(root) / params_file
    nested = expand_dotted(overrides or {})
    params = load_params(path, nested)  # raises before anything is written
    dvc_params = Path(root) / "params.yaml"
    if pipeline and path.resolve() != dvc_params.resolve():
        differ = tracked_differences(params, load_params(dvc_params, nested), pipeline)
        if differ:
            raise BarkError(f"{params_file} differs from params.yaml, which DVC records in dvc.lock, in "
                            f"{'; '.join(differ)}; set those values in params.yaml (--set KEY=VALUE writes them "
                            "there), or run without --params")
    changed = write_overrides(path, nested) if nested else []
    if changed:
        print(f"{params_file}: set {', '.join(changed)} (the values this run and DVC use)")
    return params.model_dump()


def tracked_differences(params, dvc_params, pipeline: str) -> list[str]:
    """'key: value vs value' for each params key a stage of `pipeline` declares where the two differ."""
    from barkgpt.pipelines import get

    ours, theirs = params.model_dump(mode="json"), dvc_params.model_dump(mode="json")
    out = []
    for key in dict.fromkeys(k.replace("{p}", pipeline) for s in get(pipeline).stages for k in s.params):
        a, b = ours, theirs
        for part in key.split("."):
            a = a.get(part) if isinstance(a, dict) else None
            b = b.get(part) if isinstance(b, dict) else None
        if a != b:
            out += [f"{key}{sub}: {x!r} (params.yaml: {y!r})" for sub, x, y in _leaf_diffs(a, b)]
    return out


def _leaf_diffs(a, b, prefix: str = ""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from _leaf_diffs(a.get(k), b.get(k), f"{prefix}.{k}")
    elif a != b:
        yield prefix, a, b


def to_params(params: dict):
    return parse_params(params, "flow parameters")


def transient_only(task, task_run, state) -> bool:
    """Retry I/O and network failures; a BarkError (bad input) fails at once, retrying cannot fix it."""
    try:
        err = state.result(raise_on_failure=False)
    except Exception as exc:  # noqa: BLE001 - the state holds the task's own exception
        err = exc
    return isinstance(err, TRANSIENT) and not isinstance(err, BarkError)


def run_tags() -> dict[str, str]:
    """Prefect ids for the MLflow run (barkgpt itself knows nothing of Prefect): the flow run's page
    in the Prefect UI (when there is one) becomes a link in the run's description, and the flow is
    the run's source."""
    from prefect.runtime import flow_run, task_run

    tags = {"prefect.flow_run_id": str(flow_run.id or ""), "prefect.flow_run_name": str(flow_run.name or ""),
            "prefect.task_run_id": str(task_run.id or ""),
            # no URL under the in-process API (Prefect then spells it "None/flow-runs/...")
            "prefect.flow_run_url": url if (url := str(flow_run.ui_url or "")).startswith("http") else "",
            "mlflow.source.name": f"Prefect flow {flow_run.flow_name}" if flow_run.flow_name else ""}
    return {k: v for k, v in tags.items() if v}
