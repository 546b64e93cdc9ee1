"""Typed configuration: params.yaml validated into pydantic objects at start-up.

Every stage takes a `Params` (or one of its sections). An invalid value fails here, before any
work starts, with the dotted key, what was given and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from barkgpt.errors import BarkError

BARKS = ("woof", "arf", "ruff", "grrr")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BarkDataParams(Strict):
    train_conversations: int = Field(4000, gt=0)
    val_conversations: int = Field(400, gt=0)
    max_barks: int = Field(4, ge=1, le=16, description="barks per assistant turn: 1..max_barks")
    max_turns: int = Field(3, ge=1, le=8, description="turns in a multi-turn conversation")
    multi_turn_share: float = Field(0.3, ge=0.0, le=1.0)
    bark_mix: dict[str, float] = Field(
        default_factory=lambda: {"woof": 0.4, "arf": 0.3, "ruff": 0.2, "grrr": 0.1}
    )

    @model_validator(mode="after")
    def _check_mix(self):
        unknown = sorted(set(self.bark_mix) - set(BARKS))
        if unknown:
            raise ValueError(f"bark_mix has unknown barks {unknown}; allowed: {list(BARKS)}")
        if any(w < 0 for w in self.bark_mix.values()) or sum(self.bark_mix.values()) <= 0:
            raise ValueError("bark_mix weights must be >= 0 with a positive sum")
        return self


class ModelParams(Strict):
    n_layer: int = Field(2, ge=1)
    n_head: int = Field(2, ge=1)
    n_kv_head: int | None = Field(None, ge=1, description="grouped-query heads; None = n_head")
    n_embd: int = Field(64, ge=32)
    block_size: int = Field(64, ge=8, description="context length in tokens")
    ffn_hidden: int | None = Field(None, ge=32, description="SwiGLU width; None = ~8/3 n_embd")
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _check_shapes(self):
        if self.n_embd % 32:
            raise ValueError(f"n_embd must be a multiple of 32 (quantization blocks); got {self.n_embd}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head ({self.n_head}) must divide n_embd ({self.n_embd})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("head size n_embd/n_head must be even (rotary positions rotate pairs)")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.ffn_hidden is not None and self.ffn_hidden % 32:
            raise ValueError(f"ffn_hidden must be a multiple of 32; got {self.ffn_hidden}")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 32 * -(-(8 * self.n_embd // 3) // 32)  # 8/3 width, rounded up to 32 as Llama does


class TrainParams(Strict):
    max_steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    dtype: Literal["float32", "bfloat16"] = "float32"
    compile: bool = False
    threads: int | None = Field(None, ge=1, description="torch threads; None = all cores")
    seed: int = 1337
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(8, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    max_seconds: float | None = Field(None, gt=0, description="wall-clock budget; None = none")
    max_tokens: int | None = Field(None, gt=0, description="token budget; None = none")


class BarkEvalParams(Strict):
    contract_samples: int = Field(200, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    max_new_tokens: int = Field(24, ge=1)
    val_batches: int = Field(20, ge=1)
    seed: int = 0
    ood_prompts: list[str] = Field(
        default_factory=lambda: [
            "User: woof Assistant:",
            "User: speak speak Assistant:",
            "Assistant:",
            "User: grrr arf Assistant:",
        ]
    )


class BarkGates(Strict):
    min_contract_accuracy: float = Field(0.99, ge=0, le=1)


class BarkValidateParams(Strict):
    """Great Expectations suite settings for the bark data (barkgpt/validation.py)."""

    mix_tolerance: float = Field(0.05, gt=0, le=1, description="max |observed - configured| bark share")


class BarkPipeline(Strict):
    data: BarkDataParams = BarkDataParams()
    validation: BarkValidateParams = BarkValidateParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    eval: BarkEvalParams = BarkEvalParams()
    gates: BarkGates = BarkGates()


class TrackingParams(Strict):
    """MLflow tracking and registry (barkgpt/tracking.py). MLFLOW_TRACKING_URI overrides `uri`."""

    enabled: bool = True
    uri: str = Field("sqlite:///mlflow.db", description="relative sqlite/file paths resolve in the project root")
    artifact_dir: str = Field("mlruns", description="artifact folder for the embedded store (project-relative)")
    experiment: str = "barkgpt"
    model_prefix: str = Field("barkgpt", description="registered model name is <prefix>-<pipeline>")
    champion_alias: str = "champion"
    server_timeout_s: float = Field(5.0, gt=0, description="a tracking server must answer within this")


class Params(Strict):
    seed: int = 1337
    bark: BarkPipeline = BarkPipeline()
    tracking: TrackingParams = TrackingParams()


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"{source} is invalid:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key; check its spelling against params.yaml's documented keys")
        else:
            given = e.get("input")
            shown = "" if isinstance(given, dict) else f" (got {given!r})"
            lines.append(f"  {key}: {e['msg']}{shown}")
    return "\n".join(lines)


def parse_params(raw: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise BarkError(_format_error(err, source)) from None


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    """Read and validate params.yaml; `overrides` is a nested dict merged on top (flow parameters)."""
    path = Path(path)
    if not path.exists():
        raise BarkError(f"{path}: not found; run from the project root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise BarkError(f"{path}: not valid YAML: {err}") from None
    if overrides:
        raw = deep_merge(raw, overrides)
    return parse_params(raw, str(path))


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def flatten(params: BaseModel, prefix: str = "") -> dict[str, object]:
    """Dotted keys for MLflow and reports: {'bark.model.n_embd': 64, ...}."""
    flat: dict[str, object] = {}
    for key, value in params.model_dump().items():
        _flatten_into(flat, f"{prefix}{key}", value)
    return flat


def _flatten_into(flat: dict, key: str, value) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten_into(flat, f"{key}.{k}", v)
    else:
        flat[key] = value
