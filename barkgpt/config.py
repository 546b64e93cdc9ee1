"""params.yaml as a whole: the shared sections (barkgpt/params.py) plus one section per registered
pipeline, named as the pipeline and typed by the params class its module declares beside it.

`Params` is composed from the registry (barkgpt/pipelines), never listed: a new pipeline adds its
section by being registered, with no edit here or in params.py. It lives above the pipelines
(they import params.py for the shared classes), so the import graph stays acyclic.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, create_model

from barkgpt.params import SharedParams, deep_merge, read_raw, validate
from barkgpt.pipelines import REGISTRY

_COMPOSED: dict[tuple, type[SharedParams]] = {}


def params_class() -> type[SharedParams]:
    """The shared sections plus each registered pipeline's (`bark:`, `webtext:`, ...), built once
    per set of registered pipelines."""
    key = tuple((name, pipe.params_class) for name, pipe in REGISTRY.items())
    if key not in _COMPOSED:
        _COMPOSED[key] = create_model("Params", __base__=SharedParams, __module__=__name__,
                                      **{name: (cls, Field(default_factory=cls)) for name, cls in key})
    return _COMPOSED[key]


Params = params_class()


def parse_params(raw: dict, source: str = "params") -> SharedParams:
    """A params mapping validated into the composed Params; BarkError naming each bad key."""
    return validate(params_class(), raw, source)


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> SharedParams:
    """Read and validate params.yaml; `overrides` is a nested dict merged on top (flow parameters)."""
    raw = read_raw(path)
    if overrides:
        raw = deep_merge(raw, overrides)
    return parse_params(raw, str(path))
