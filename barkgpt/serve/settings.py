"""Server settings: the `serve:` section of params.yaml (what to serve), then the environment.

Environment variables say where and which service (12-factor, and how AWS Lambda passes
configuration), read by pydantic-settings with the BARKGPT_ prefix: BARKGPT_PARAMS (params file),
BARKGPT_ROOT (project root), BARKGPT_MODEL, BARKGPT_BACKEND, BARKGPT_SERVE_HOST,
BARKGPT_SERVE_PORT, BARKGPT_CORS_ORIGINS (comma-separated) and BARKGPT_API_KEY (the optional
bearer key; it never lives in params.yaml).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict

from barkgpt.errors import BarkError
from barkgpt.params import ServeParams, load_shared


class ServeEnv(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BARKGPT_", env_ignore_empty=True, extra="ignore")

    params: Path | None = None
    root: Path | None = None
    serve_host: str | None = None
    serve_port: int | None = None
    model: str | None = None
    backend: Literal["llama", "torch"] | None = None
    cors_origins: Annotated[list[str] | None, NoDecode] = None
    api_key: SecretStr | None = None

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return [o.strip() for o in value.split(",") if o.strip()] if isinstance(value, str) else value

    def serve_overrides(self) -> dict:
        values = {"host": self.serve_host, "port": self.serve_port, "model": self.model, "backend": self.backend,
                  "cors_origins": self.cors_origins}
        return {k: v for k, v in values.items() if v is not None}


class _GivenEnv(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (the Lambda handler passes the
    function's environment) instead of os.environ; the same hook its .env-file source overrides."""

    def __init__(self, settings_cls, env: Mapping[str, str]):
        self._given = env
        super().__init__(settings_cls)

    def _load_env_vars(self):
        return {k.lower(): v for k, v in self._given.items() if v}


def read_env(env: Mapping[str, str] | None = None) -> ServeEnv:
    """The BARKGPT_* variables of os.environ, or of `env` alone when given."""

    class GivenEnv(ServeEnv):
        @classmethod
        def settings_customise_sources(cls, settings_cls, **_):
            return (_GivenEnv(settings_cls, env),)

    try:
        return ServeEnv() if env is None else GivenEnv()
    except ValidationError as err:
        bad = "; ".join(f"BARKGPT_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in err.errors())
        raise BarkError(f"serve environment is invalid ({bad}); fix or unset the variable") from None


@dataclass(frozen=True)
class Settings:
    serve: ServeParams
    root: Path = Path(".")
    api_key: str | None = field(default=None, repr=False)


def load_settings(params_path: str | Path | None = None, root: str | Path | None = None,
                  env: Mapping[str, str] | None = None, **overrides) -> Settings:
    """params.yaml's serve section (defaults if there is no params file), the environment (os.environ
    unless `env` is given), then `overrides` (the CLI's options)."""
    e = read_env(env)
    root = Path(root or e.root or ".")
    params_path = Path(params_path or e.params or root / "params.yaml")
    params = load_shared(params_path) if params_path.exists() else None
    values = (params.serve if params else ServeParams()).model_dump()
    if values["quant"] is None:  # serve what the pipeline ships
        values["quant"] = params.export.deploy_quantization if params else "q8_0"
    values.update(e.serve_overrides())
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        serve = ServeParams(**values)
    except ValueError as err:
        raise BarkError(f"serve settings are invalid (params.yaml serve: or BARKGPT_* env): {err}") from None
    return Settings(serve=serve, root=root, api_key=e.api_key.get_secret_value() if e.api_key else None)
