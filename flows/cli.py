"""The command line both pipeline flows share: `python -m flows.<name> [--set KEY=VALUE ...]`."""
from __future__ import annotations

import argparse
import json
import sys

import yaml


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)  # YAML scalars: 100, 0.5, true, [a, b]
    return out


def run_flow(flow_fn, description: str, example: str, argv: list[str] | None = None) -> int:
    """Run a pipeline flow in this process (Prefect's local API); exit 2 on a BarkError."""
    from barkgpt.errors import BarkError

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a params.yaml value, e.g. {example} (repeatable)")
    parser.add_argument("--root", default=".")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-deploy", action="store_true", help="stop after the parity gate")
    args = parser.parse_args(argv)
    try:
        result = flow_fn(overrides=parse_set(args.set), root=args.root, params_file=args.params,
                         deploy_model=not args.no_deploy)
    except BarkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result["metrics"], indent=2, default=str))
    return 0
