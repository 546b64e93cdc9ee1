"""A sweep's search space: params keys and the values to try, checked against params.yaml's schema
before anything runs (no study, no MLflow run, no DVC experiment for a space that cannot run).

Two ways to write one, as Optuna users do:
    --grid bark.train.learning_rate=0.003,0.01 --grid bark.model.n_embd=32,64    (every combination)
    --space space.yaml --trials 12                                               (sampled, TPE)
where space.yaml maps params keys to a range or a list of choices:
    bark.train.learning_rate: {low: 0.001, high: 0.03, log: true}
    bark.train.batch_size: {low: 8, high: 32, step: 8}     # integers when low and high are
    bark.model.n_embd: {choices: [32, 64]}
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from barkgpt.config import parse_params
from barkgpt.errors import BarkError
from barkgpt.params import deep_merge, expand_dotted, flatten

RANGE_KEYS = {"low", "high", "log", "step"}


@dataclass(frozen=True)
class Dimension:
    """One params key: a list of choices, or a range [low, high] (ints when both ends are ints)."""

    key: str
    choices: tuple = ()
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None

    @property
    def is_int(self) -> bool:
        return not self.choices and isinstance(self.low, int) and isinstance(self.high, int)

    def distribution(self):
        import optuna.distributions as d

        if self.choices:
            return d.CategoricalDistribution(list(self.choices))
        if self.is_int:
            return d.IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return d.FloatDistribution(float(self.low), float(self.high), log=self.log,
                                   step=None if self.step is None else float(self.step))

    def ends(self) -> tuple:
        """The values whose validity stands for the whole dimension."""
        return self.choices or (self.low, self.high)

    def describe(self) -> dict:
        if self.choices:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, **({"log": True} if self.log else {}),
                **({"step": self.step} if self.step is not None else {})}


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]
    grid: bool = False  # every combination, in order (Optuna's GridSampler), else sampled

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dimensions]

    def grid_size(self) -> int:
        return math.prod(len(d.choices) for d in self.dimensions)

    def distributions(self) -> dict:
        return {d.key: d.distribution() for d in self.dimensions}

    def grid_values(self) -> dict[str, list]:
        return {d.key: list(d.choices) for d in self.dimensions}

    def describe(self) -> dict:
        return {d.key: d.describe() for d in self.dimensions}


def _scalar(text: str):
    value = yaml.safe_load(text) if text.strip() else None
    if value is None or isinstance(value, (dict, list)):
        raise BarkError(f"--grid value {text!r} is not a single number, string or flag; write KEY=V1,V2,...")
    return value


def parse_grid(items: list[str]) -> SearchSpace:
    """`--grid KEY=V1,V2 ...`: each value read as a YAML scalar (0.003, 64, true, adamw)."""
    dims = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise BarkError(f"--grid expects KEY=V1,V2,..., got {item!r}")
        choices = tuple(_scalar(v) for v in values.split(",") if v.strip())
        if not choices:
            raise BarkError(f"--grid {key}: no values given; write {key}=V1,V2,...")
        dims.append(Dimension(key, choices=choices))
    return _unique(SearchSpace(tuple(dims), grid=True))


def load_space(path: str | Path) -> SearchSpace:
    """A space file: params keys mapped to {low, high[, log, step]} or {choices: [...]}."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BarkError(f"--space {path}: not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise BarkError(f"--space {path}: cannot read it as YAML ({type(err).__name__}: {str(err)[:200]})") from None
    return space_from_mapping(raw, f"--space {path}")


def space_from_mapping(raw, source: str = "the search space", grid: bool = False) -> SearchSpace:
    """{key: {low, high[, log, step]} | {choices: [...]} | [v1, v2]}; `grid`: every combination
    (choices only), as the Prefect flow's `grid` parameter gives it."""
    if not isinstance(raw, dict) or not raw:
        raise BarkError(f"{source}: expected a mapping of params keys to ranges or choices, e.g. "
                        "'bark.train.learning_rate: {low: 0.001, high: 0.03, log: true}'")
    space = _unique(SearchSpace(tuple(_dimension(str(k), v, source) for k, v in raw.items()), grid=grid))
    if grid and any(not d.choices for d in space.dimensions):
        raise BarkError(f"{source}: a grid lists the values of each key (key: [v1, v2]); ranges need a sampled "
                        "sweep (--space with --trials)")
    return space


def _dimension(key: str, spec, source: str) -> Dimension:
    where = f"{source}: {key}"
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise BarkError(f"{where}: expected {{low: .., high: ..}} or {{choices: [..]}}, got {spec!r}")
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise BarkError(f"{where}: choices cannot be combined with {sorted(set(spec) - {'choices'})}")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise BarkError(f"{where}: choices must be a non-empty list")
        if any(isinstance(c, (dict, list)) or c is None for c in choices):
            raise BarkError(f"{where}: each choice must be a number, string or flag")
        return Dimension(key, choices=tuple(choices))
    unknown = set(spec) - RANGE_KEYS
    if unknown or not {"low", "high"} <= set(spec):
        raise BarkError(f"{where}: a range needs low and high (and optionally log, step); "
                        f"got keys {sorted(spec)}")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for name, v in (("low", low), ("high", high), ("step", step)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise BarkError(f"{where}: {name} must be a finite number, got {v!r}")
    if not isinstance(log, bool):
        raise BarkError(f"{where}: log must be true or false, got {log!r}")
    if low > high:
        raise BarkError(f"{where}: empty range (low {low} > high {high})")
    if log and low <= 0:
        raise BarkError(f"{where}: a log range needs low > 0, got {low}")
    if step is not None and (step <= 0 or log):
        raise BarkError(f"{where}: step must be > 0 and cannot be combined with log")
    return Dimension(key, low=low, high=high, log=log, step=step)


def _unique(space: SearchSpace) -> SearchSpace:
    seen = set()
    for key in space.keys:
        if key in seen:
            raise BarkError(f"{key} is given twice in the search space; give each key once")
        seen.add(key)
    return space


def check_space(space: SearchSpace, raw_params: dict, pipeline: str) -> None:
    """Every key a leaf of the params schema that shapes this pipeline's model, and every value it
    can take (each choice, each end of a range) valid there: refused now, with the key named."""
    if not space.dimensions:
        raise BarkError("the search space is empty; give --grid KEY=V1,V2 or --space FILE")
    params = parse_params(raw_params)
    leaves = flatten(params)
    for dim in space.dimensions:
        if dim.key not in leaves:
            near = difflib.get_close_matches(dim.key, list(leaves), n=3, cutoff=0.8)
            hint = f"; did you mean {', '.join(near)}?" if near else \
                f"; the {pipeline} keys are listed by `barkgpt sweep {pipeline} --list-keys`"
            raise BarkError(f"{dim.key}: unknown params key{hint}")
        if not (dim.key == "seed" or dim.key.startswith((f"{pipeline}.", "export."))):
            raise BarkError(f"{dim.key}: does not shape the {pipeline} model; a sweep varies `seed`, "
                            f"`{pipeline}.*` or `export.*` keys")
        if isinstance(leaves[dim.key], (dict, list)):
            raise BarkError(f"{dim.key}: is a list or mapping; sweep one of its scalar keys instead")
        current = leaves[dim.key]
        if not dim.choices and (isinstance(current, bool) or not isinstance(current, (int, float))):
            raise BarkError(f"{dim.key}: is {type(current).__name__} ({current!r}), so a numeric range does not "
                            "fit; give choices instead")
        for value in dim.ends():
            try:
                parse_params(deep_merge(raw_params, expand_dotted({dim.key: value})), "the search space")
            except BarkError as err:
                lines = [ln.strip() for ln in str(err).splitlines()[1:]] or [str(err)]
                raise BarkError(f"{dim.key}={value!r} is not a valid value: {'; '.join(lines)}") from None


def sweepable_keys(raw_params: dict, pipeline: str) -> dict[str, object]:
    """The scalar keys a sweep of this pipeline can vary, with their current values."""
    leaves = flatten(parse_params(raw_params))
    return {k: v for k, v in leaves.items()
            if (k == "seed" or k.startswith((f"{pipeline}.", "export."))) and not isinstance(v, (dict, list))}
