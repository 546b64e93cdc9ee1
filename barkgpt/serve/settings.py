"""Server settings: the `serve:` section of params.yaml, then environment overrides.

Environment variables only say where and what to serve (12-factor, and how AWS Lambda passes
configuration): BARKGPT_PARAMS (params file), BARKGPT_ROOT (project root), BARKGPT_MODEL,
BARKGPT_BACKEND, BARKGPT_SERVE_HOST, BARKGPT_SERVE_PORT, BARKGPT_CORS_ORIGINS (comma-separated)
and BARKGPT_API_KEY (the optional bearer key; it never lives in params.yaml).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from barkgpt.errors import BarkError
from barkgpt.params import ServeParams, load_params

ENV_FIELDS = {
    "BARKGPT_SERVE_HOST": "host",
    "BARKGPT_SERVE_PORT": "port",
    "BARKGPT_MODEL": "model",
    "BARKGPT_BACKEND": "backend",
    "BARKGPT_CORS_ORIGINS": "cors_origins",
}


@dataclass(frozen=True)
class Settings:
    serve: ServeParams
    root: Path = Path(".")
    api_key: str | None = None


def load_settings(params_path: str | Path | None = None, root: str | Path | None = None,
                  env: dict | None = None, **overrides) -> Settings:
    """params.yaml's serve section (defaults if there is no params file), env, then `overrides`."""
    env = os.environ if env is None else env
    root = Path(root or env.get("BARKGPT_ROOT") or ".")
    params_path = Path(params_path or env.get("BARKGPT_PARAMS") or root / "params.yaml")
    params = load_params(params_path) if params_path.exists() else None
    values = (params.serve if params else ServeParams()).model_dump()
    if values["quant"] is None:  # serve what the pipeline ships
        values["quant"] = params.export.deploy_quantization if params else "q8_0"
    for var, key in ENV_FIELDS.items():
        if env.get(var):
            raw = env[var]
            values[key] = [o.strip() for o in raw.split(",") if o.strip()] if key == "cors_origins" else raw
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        serve = ServeParams(**values)
    except ValueError as err:
        raise BarkError(f"serve settings are invalid (params.yaml serve: or BARKGPT_* env): {err}") from None
    return Settings(serve=serve, root=root, api_key=env.get("BARKGPT_API_KEY") or None)
