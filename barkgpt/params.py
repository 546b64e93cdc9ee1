"""Typed configuration: params.yaml validated into pydantic objects at start-up.

Every stage takes a `Params` (or one of its sections). An invalid value fails here, before any
work starts, with the dotted key, what was given and what is allowed.

This module holds what every pipeline shares (model, training, export, serving, deployment,
tracking, sweeps: `SharedParams`) and the reading and validation of a params file. Each
pipeline's own section is declared in its module (barkgpt/pipelines/<name>.py, its
`params_class`); barkgpt/config.py composes the whole `Params` from the registered pipelines and
loads it. The pipeline modules import this one, so it imports none of them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from barkgpt.errors import BarkError

BARKS = ("woof", "arf", "ruff", "grrr")
# Words of an environment variable name that mark it as a secret (API_KEY, HF_TOKEN, DB_PASSWORD...).
SECRET_WORDS = {"KEY", "APIKEY", "SECRET", "TOKEN", "PASSWORD", "PASSWD", "PWD", "CREDENTIAL", "CREDENTIALS",
                "PRIVATE"}


class Strict(BaseModel):
    # allow_inf_nan=False: `learning_rate: .inf` or `.nan` is refused here, not found as NaN weights later
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelParams(Strict):
    # Upper bounds: far past what trains on a CPU, low enough that a typo (an extra zero or three)
    # is refused here rather than met as an allocation failure deep inside torch.
    n_layer: int = Field(2, ge=1, le=64, description="transformer blocks, 1..64")
    n_head: int = Field(2, ge=1, le=64, description="attention heads, 1..64")
    n_kv_head: int | None = Field(None, ge=1, le=64, description="grouped-query heads; None = n_head")
    n_embd: int = Field(64, ge=32, le=4096, description="width, a multiple of 32, at most 4096")
    block_size: int = Field(64, ge=8, le=8192, description="context length in tokens, 8..8192")
    ffn_hidden: int | None = Field(None, ge=32, le=16384, description="SwiGLU width; None = ~8/3 n_embd")
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1, description="training only (residual branches); not part of the weights")

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
    max_steps: int = Field(300, ge=1, le=100_000_000)
    batch_size: int = Field(32, ge=1, le=4096, description="sequences per micro-batch, at most 4096")
    grad_accum: int = Field(1, ge=1, le=1024, description="micro-batches per optimizer step, at most 1024")
    learning_rate: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="muon: Muon for the blocks' matrices, AdamW (learning_rate) for embeddings and gains")
    muon_lr: float = Field(0.02, gt=0, description="Muon's peak learning rate")
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    muon_weight_decay: float = Field(0.0, ge=0, description="decoupled, times the current Muon rate")
    schedule: Literal["cosine", "wsd"] = Field(
        "cosine", description="after warm-up: cosine to min_lr_ratio, or wsd: constant, then linear decay")
    decay_fraction: float = Field(0.4, gt=0, le=1, description="wsd: the final share of the run that decays")
    dtype: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="bfloat16: autocast, fp32 master weights; auto: whichever trains faster here, "
                               "measured once per machine and model shape (barkgpt/calibrate.py)")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto: cuda, then mps, then cpu; cuda or mps where there is none is an error")
    nproc: int = Field(1, ge=1, le=1024, description="data-parallel processes (DDP under torchrun); "
                                                     "one per GPU on CUDA")
    compile: bool | Literal["auto"] = Field(
        False, description="torch.compile the model (compiled code cached per machine); auto: only when the "
                           "measured speed-up repays the measured compile time within the run's budget")
    threads: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] | None = Field(
        None, description="torch threads per process, at most 256 (more than the cores only slows); "
                                        "None = all cores; auto: the fastest measured")
    seed: int = 1337
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(8, ge=1, le=100_000)
    checkpoint_every: int = Field(100, ge=1)
    max_seconds: float | None = Field(None, gt=0, description="wall-clock budget; None = none")
    max_tokens: int | None = Field(None, gt=0, description="token budget; None = none")


QUANTIZATIONS = ("q8_0", "q4_0", "q4_k_m")
Quantization = Literal["q8_0", "q4_0", "q4_k_m"]


class ExportParams(Strict):
    """GGUF / Hugging Face export, llama.cpp quantization, parity checks and the quality gate."""

    quantizations: list[Quantization] = Field(default_factory=lambda: list(QUANTIZATIONS))
    deploy_quantization: Quantization = Field("q8_0", description="the file deployment ships; its gate must pass")
    f16: bool = Field(True, description="also write an F16 GGUF")
    hf: bool = Field(True, description="also write a Hugging Face LlamaForCausalLM folder")
    logits_tolerance: float = Field(1e-3, gt=0, description="max |logit diff| F32 GGUF vs PyTorch")
    max_bpb_delta: dict[str, float] = Field(
        default_factory=lambda: {"q8_0": 0.005, "q4_0": 0.05, "q4_k_m": 0.05},
        description="webtext: max relative bpb increase vs PyTorch per quantization",
    )
    bpb_tokens: int = Field(8192, ge=64, le=100_000_000, description="webtext validation tokens scored per file")
    greedy_max_new_tokens: int = Field(24, ge=1, le=8192)
    threads: int = Field(1, ge=1, le=256, description="llama.cpp threads for quantizing and parity, at most 256")

    @model_validator(mode="after")
    def _check_deploy(self):
        if self.deploy_quantization not in self.quantizations:
            raise ValueError(f"deploy_quantization {self.deploy_quantization!r} must be one of quantizations "
                             f"{self.quantizations}")
        unknown = sorted(set(self.max_bpb_delta) - set(QUANTIZATIONS))
        if unknown:
            raise ValueError(f"max_bpb_delta has unknown quantizations {unknown}; allowed: {list(QUANTIZATIONS)}")
        return self


class ServeParams(Strict):
    """`barkgpt serve`: where it listens, which model it loads, and the limits in front of it.

    The API key is never written here: it comes from the BARKGPT_API_KEY environment variable.
    """

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    backend: Literal["llama", "torch"] = "llama"
    model: str | None = Field(None, description="GGUF or .pt path; None = the pipeline's deploy model")
    pipeline: str = "bark"
    quant: str | None = Field(None, description="GGUF quantization the llama backend loads; None = export.deploy_quantization")
    model_id: str | None = Field(None, description="name in /v1/models; None = derived from the file")
    chat_format: str | None = Field(None, description="llama.cpp chat format; None = the GGUF's template")
    n_ctx: int = Field(0, ge=0, description="llama.cpp context; 0 = the model's trained context (max 4096)")
    threads: int = Field(1, ge=1, le=256, description="decode threads, at most 256; more help only big models on idle cores")
    workers: int = Field(1, ge=1, le=64, description="server processes sharing the port, each with its own model")
    inline: Literal["auto", "always", "never"] = Field(
        "auto", description="generate on the event loop (auto: for the bark model) or in a model thread")
    queue_size: int = Field(64, ge=1, description="requests waiting for the model; more get 429")
    request_timeout_s: float = Field(30.0, gt=0)
    default_max_tokens: int = Field(32, ge=1)
    max_tokens_limit: int = Field(512, ge=1)
    max_prompt_chars: int = Field(16000, ge=1)
    max_messages: int = Field(64, ge=1)
    max_embedding_inputs: int = Field(2048, ge=1, description="inputs one /v1/embeddings request may send "
                                      "(OpenAI's limit)")
    retry_after_s: int = Field(1, ge=1)
    cors_origins: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8000", "http://localhost:8000"])
    allowed_hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1", "localhost", "[::1]"],
                                     description="Host headers answered (DNS-rebinding guard), besides the "
                                                 "listen address; '*.example.com' patterns, '*' = any")
    request_header_timeout_s: float = Field(10.0, gt=0, description="a request's line and headers must arrive "
                                            "within this, or 408 and the connection closes (slow clients)")
    request_body_timeout_s: float = Field(30.0, gt=0, description="a request's body must arrive within this, or 408")


class TrackingParams(Strict):
    """MLflow tracking and registry (barkgpt/tracking.py). MLFLOW_TRACKING_URI overrides `uri`."""

    enabled: bool = True
    uri: str = Field("sqlite:///mlflow.db", description="relative sqlite/file paths resolve in the project root")
    artifact_dir: str = Field("mlruns", description="artifact folder for the embedded store (project-relative)")
    experiment: str = "barkgpt"
    model_prefix: str = Field("barkgpt", description="registered model name is <prefix>-<pipeline>")
    champion_alias: str = "champion"
    server_timeout_s: float = Field(5.0, gt=0, description="a tracking server must answer within this")


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
    quantization: str | None = Field(
        None, description="GGUF released (exports/<p>/quantized/<p>-<q>.gguf); None = export.deploy_quantization")
    require_gates: bool = Field(True, description="refuse to deploy unless evaluation (and parity) gates passed")
    function_name: str = Field("barkgpt-{pipeline}", description="{pipeline} is replaced by the pipeline name")
    role_arn: str | None = Field(None, description="execution role; None = create/reuse barkgpt-lambda-<pipeline>")
    image_repository: str = Field("barkgpt-lambda", description="ECR repository of the function image")
    image_uri: str | None = Field(None, description="None = <account>.dkr.ecr.<region>.amazonaws.com/<repo>:<code hash>")
    architecture: Literal["x86_64", "arm64"] = "x86_64"
    memory_mb: int = Field(1024, ge=128, le=10240)
    timeout_s: int = Field(30, ge=1, le=900)
    ephemeral_storage_mb: int = Field(1024, ge=512, le=10240, description="/tmp size; holds the model")
    environment: dict[str, str] = Field(default_factory=dict,
                                        description="extra function environment; never secrets (see api_key_secret)")
    api_key_secret: str | None = Field(
        None, min_length=1, description="where the serving API key is: a Secrets Manager secret name or ARN, or "
        "ssm:<parameter name>; the function reads it at cold start (deploy stores $BARKGPT_API_KEY there if set)")
    alias: str = Field("live", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,127}$")
    url_auth_type: Literal["AWS_IAM", "NONE"] = "AWS_IAM"
    multipart_threshold_mb: float = Field(64, gt=0, description="files at least this big upload in parts")
    multipart_chunk_mb: float = Field(16, ge=5, description="part size (S3 minimum 5 MiB)")
    upload_attempts: int = Field(3, ge=1, le=10)
    smoke: Literal["auto", "remote", "in_process"] = Field(
        "auto", description="remote: Lambda Invoke; in_process: run the handler here (local AWS API)")
    smoke_prompt: str = Field("speak", description="user message the smoke test sends to /v1/model/generate")

    @field_validator("environment")
    @classmethod
    def _no_secrets(cls, env: dict[str, str]) -> dict[str, str]:
        # params are copied into every checkpoint, MLflow run and the function configuration.
        secret = sorted(k for k in env if SECRET_WORDS & set(k.upper().replace("-", "_").split("_")))
        if secret:
            raise ValueError(
                f"{secret} look like secrets, and params.yaml is copied into checkpoints, MLflow and the "
                "function configuration; keep the value in AWS Secrets Manager or SSM and set "
                "deploy.api_key_secret to its name (docs/deploy.md, 'API key')")
        return env


class SweepParams(Strict):
    """Sweeps of many trainings (barkgpt sweep; docs/experiments.md). The study's database comes from
    `--storage` or OPTUNA_STORAGE when set (a team's shared PostgreSQL: its password stays out of here)."""

    storage: str = Field("sqlite:///optuna.db", description="Optuna storage URL; a relative sqlite path is the project's")
    sampler: Literal["tpe", "random"] = Field("tpe", description="for --space (a --grid tries every combination)")
    pruner: Literal["median", "none"] = Field(
        "median", description="stop a trial whose validation bpb is worse than the median of earlier trials at that step")
    startup_trials: int = Field(4, ge=0, description="trials before TPE models the space and before pruning starts")
    warmup_steps: int = Field(0, ge=0, description="no pruning before this training step")
    seed: int = Field(1337, description="the sampler's seed: the same sweep proposes the same trials")


class SharedParams(Strict):
    """The sections every pipeline shares. Each pipeline's own section (`bark:`, `webtext:`, ...) is
    declared beside the pipeline (its `params_class`); barkgpt/config.py adds them."""

    seed: int = 1337
    export: ExportParams = ExportParams()
    serve: ServeParams = ServeParams()
    tracking: TrackingParams = TrackingParams()
    deploy: DeployParams = DeployParams()
    sweep: SweepParams = SweepParams()


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


def validate(cls: type[BaseModel], raw: dict, source: str = "params"):
    """`raw` validated into `cls`; BarkError naming each bad key (dotted), what was given and why."""
    try:
        return cls.model_validate(raw or {})
    except ValidationError as err:
        raise BarkError(_format_error(err, source)) from None


def load_shared(path: str | Path = "params.yaml") -> SharedParams:
    """The shared sections of a params file (serve, export, tracking, ...), each pipeline's own
    section left unread: what serving needs, without importing the pipelines. The whole file,
    every pipeline's section validated too, is barkgpt.config.load_params."""
    raw = read_raw(path)
    return validate(SharedParams, {k: v for k, v in raw.items() if k in SharedParams.model_fields}, str(path))


def read_raw(path: str | Path = "params.yaml") -> dict:
    """params.yaml as written, before validation and defaults."""
    path = Path(path)
    if not path.exists():
        raise BarkError(f"{path}: not found; run from the project root or pass --params PATH")
    return read_config_yaml(path)


class ConfigLoader(yaml.SafeLoader):
    """YAML for configuration: no aliases (a 1 KB file of nested aliases expands to gigabytes) and no
    duplicate keys (the later one would silently win; DVC refuses them)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a params file; "
                                              "write the value out", self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_config_yaml(path: Path) -> dict:
    """A params file as a mapping; BarkError naming the problem (not a file, not UTF-8, not YAML,
    empty, not a mapping, a number too long to read)."""
    if path.is_dir():
        raise BarkError(f"{path}: is a folder, not a params file; pass --params FILE")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise BarkError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise BarkError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        raw = yaml.load(text, Loader=ConfigLoader)
    except yaml.YAMLError as err:
        raise BarkError(f"{path}: not valid YAML: {str(err)[:500]}") from None
    except ValueError as err:  # e.g. an integer past Python's 4,300-digit conversion limit
        raise BarkError(f"{path}: a value cannot be read ({str(err)[:200]})") from None
    if raw is None:
        raise BarkError(f"{path}: is empty; every setting would be a built-in default. Restore it (git checkout "
                        f"-- {path.name}) or write the settings to change")
    if not isinstance(raw, dict):
        raise BarkError(f"{path}: must be a mapping of sections (bark:, export:, ...), not a {type(raw).__name__}")
    return raw


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


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


def parse_assignments(items: list[str]) -> dict:
    """`--set` arguments, ['bark.train.max_steps=200', ...], as nested overrides; values are read as
    YAML scalars (200, 0.5, true, [a, b])."""
    flat = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BarkError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            flat[key] = yaml.load(value, Loader=ConfigLoader)
        except (yaml.YAMLError, ValueError) as err:
            first = str(err).strip().splitlines()[0][:160]
            raise BarkError(f"--set {item}: the value is not valid YAML ({first}); quote it, e.g. "
                            f"--set '{key}=\"{value}\"'") from None
    return expand_dotted(flat)


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
