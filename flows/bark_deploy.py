"""The `bark-deploy` flow: re-deploy a registered MLflow model version (by number, or the alias,
default `champion`) to S3 + Lambda, with the same deploy step the pipeline flow ends with.

    python -m flows.bark_deploy --version 3
    prefect deployment run 'bark-deploy/bark-deploy' -p model_version=3
"""
from __future__ import annotations

import argparse
import json
import sys

import flows  # noqa: F401  (PREFECT_HOME default before prefect loads)
from prefect import flow

from tasks.common import resolve_params
from tasks.deploy import redeploy


@flow(name="bark-deploy", log_prints=True, persist_result=True, result_serializer="json")
def bark_deploy(model_version: int | None = None, alias: str | None = None, root: str = ".",
                params_file: str = "params.yaml", overrides: dict | None = None) -> dict:
    params = resolve_params(params_file, overrides, root)
    result = redeploy(params, root, "bark", version=model_version, alias=alias)
    print(f"{result['registered']['registered_model']} v{result['registered']['version']} -> "
          f"{result['function']}:{result['version']} ({result['alias']}); {result['url']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Re-deploy a registered bark model version.")
    parser.add_argument("--version", type=int, default=None, help="model version (default: the alias)")
    parser.add_argument("--alias", default=None, help="registry alias (default: tracking.champion_alias)")
    parser.add_argument("--root", default=".")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    from barkgpt.errors import BarkError

    try:
        result = bark_deploy(model_version=args.version, alias=args.alias, root=args.root, params_file=args.params)
    except BarkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
