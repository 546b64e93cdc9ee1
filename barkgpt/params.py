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


class BarkPipeline(Strict):
    data: BarkDataParams = BarkDataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    eval: BarkEvalParams = BarkEvalParams()
    gates: BarkGates = BarkGates()


class DeployParams(Strict):
    """S3 release + Lambda function (barkgpt/deploy). Where AWS is comes from the environment
    (credentials, AWS_REGION, AWS_ENDPOINT_URL); with none, a local AWS API server is started."""

    target: Literal["auto", "local", "aws"] = Field(
        "auto", description="auto: real AWS when any AWS configuration exists, else a local moto server")
    region: str = Field("us-east-1", description="region when the environment names none")
    bucket: str = Field("barkgpt-artifacts", min_length=3, max_length=63)
    prefix: str = Field("releases", description="key prefix; releases go to <prefix>/<pipeline>/<release id>/")
    artifact: Literal["gguf", "checkpoint"] = Field(
        "gguf", description="gguf: the deploy quantization through llama.cpp; checkpoint: PyTorch best.pt")
    quantization: str = Field("q8_0", description="which GGUF file is released (models/<p>/gguf/<p>-<q>.gguf)")
    require_gates: bool = Field(True, description="refuse to deploy unless evaluation (and parity) gates passed")
    function_name: str = Field("barkgpt-{pipeline}", description="{pipeline} is replaced by the pipeline name")
    role_arn: str | None = Field(None, description="execution role; None = create/reuse barkgpt-lambda-<pipeline>")
    image_repository: str = Field("barkgpt-lambda", description="ECR repository of the function image")
    image_uri: str | None = Field(None, description="None = <account>.dkr.ecr.<region>.amazonaws.com/<repo>:<code hash>")
    architecture: Literal["x86_64", "arm64"] = "x86_64"
    memory_mb: int = Field(1024, ge=128, le=10240)
    timeout_s: int = Field(30, ge=1, le=900)
    ephemeral_storage_mb: int = Field(1024, ge=512, le=10240, description="/tmp size; holds the model")
    environment: dict[str, str] = Field(default_factory=dict, description="extra function environment")
    alias: str = Field("live", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,127}$")
    url_auth_type: Literal["AWS_IAM", "NONE"] = "AWS_IAM"
    multipart_threshold_mb: float = Field(64, gt=0, description="files at least this big upload in parts")
    multipart_chunk_mb: float = Field(16, ge=5, description="part size (S3 minimum 5 MiB)")
    upload_attempts: int = Field(3, ge=1, le=10)
    smoke: Literal["auto", "remote", "in_process"] = Field(
        "auto", description="remote: Lambda Invoke; in_process: run the handler here (local AWS API)")
    smoke_prompt: str = "User: speak Assistant:"

class ServeParams(Strict):
    """`barkgpt serve`: where it listens, which model it loads, and the limits in front of it.

    The API key is never written here: it comes from the BARKGPT_API_KEY environment variable.
    """

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    backend: Literal["llama", "torch"] = "llama"
    model: str | None = Field(None, description="GGUF or .pt path; None = the pipeline's deploy model")
    pipeline: str = "bark"
    quant: str = Field("Q8_0", description="which GGUF quantization the llama backend loads by default")
    model_id: str | None = Field(None, description="name in /v1/models; None = derived from the file")
    chat_format: str | None = Field(None, description="llama.cpp chat format; None = the GGUF's template")
    n_ctx: int = Field(0, ge=0, description="llama.cpp context; 0 = the model's trained context (max 4096)")
    threads: int = Field(1, ge=1, description="decode threads; more help only big models on idle cores")
    queue_size: int = Field(64, ge=1, description="requests waiting for the model; more get 429")
    request_timeout_s: float = Field(30.0, gt=0)
    default_max_tokens: int = Field(32, ge=1)
    max_tokens_limit: int = Field(512, ge=1)
    max_prompt_chars: int = Field(16000, ge=1)
    max_messages: int = Field(64, ge=1)
    retry_after_s: int = Field(1, ge=1)
    cors_origins: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8000", "http://localhost:8000"])
    llama_extra_buffers: bool = Field(
        False, description="llama.cpp's repacked CPU weight buffers (AMX); off: they crash decode on some CPUs")


class Params(Strict):
    seed: int = 1337
    bark: BarkPipeline = BarkPipeline()
    deploy: DeployParams = DeployParams()
    serve: ServeParams = ServeParams()


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
