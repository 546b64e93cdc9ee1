"""The smoke test: real function-URL events (payload 2.0) sent to a newly published version.

On the local AWS API the handler runs in this process (moto cannot run images) with the published
version's environment; on AWS it is a Lambda Invoke of that version. With an API key configured,
the test authenticates, and also checks that a request without the key is refused.
"""
from __future__ import annotations

import json
import tempfile
import time

from barkgpt.deploy.aws import AwsTarget
from barkgpt.deploy.events import function_url_event, response_json
from barkgpt.deploy.lambda_handler import ENV_MODEL_DIR, AppFactory, LambdaApp
from barkgpt.errors import BarkError
from barkgpt.params import DeployParams


class SmokeTestFailed(BarkError):
    """The new version did not answer correctly; the alias was not moved to it."""


def smoke_test(target: AwsTarget, name: str, version: str, cfg: DeployParams, mode: str,
               app_factory: AppFactory | None = None, api_key: str | None = None, log=print) -> dict:
    """Send function-URL events to the new version; raise SmokeTestFailed on a bad answer."""
    lam = target.client("lambda")

    def event(method, path, body=None, headers=None):
        return function_url_event(method, path, body, region=target.region, account_id=target.account_id,
                                  headers=headers)

    generate = ("POST /v1/model/generate", {"prompt": cfg.smoke_prompt})
    auth = {"authorization": f"Bearer {api_key}"} if api_key else None
    checks = [("GET /ready", event("GET", "/ready"), 200)]
    if api_key:
        checks.append((f"{generate[0]} without the API key", event("POST", "/v1/model/generate", generate[1]), 401))
    checks.append((generate[0], event("POST", "/v1/model/generate", generate[1], auth), 200))
    results, container = [], None
    with tempfile.TemporaryDirectory(prefix="barkgpt-smoke-") as tmp:
        if mode == "in_process":
            # The local AWS API cannot run Lambda code: run the same handler here, with the
            # environment of the published version and the AWS APIs of the target.
            env = lam.get_function_configuration(FunctionName=name, Qualifier=version).get(
                "Environment", {}).get("Variables", {})
            container = LambdaApp({**env, ENV_MODEL_DIR: tmp}, s3=target.client("s3"), clients=target.client,
                                  app_factory=app_factory)
        try:
            for label, ev, expected in checks:
                results.append(_smoke_request(container, lam, name, version, label, ev, expected))
        finally:
            if container is not None:
                container.close()  # stop the in-process server's worker thread
        body = results[-1]["body"]
        reply = body.get("message") if isinstance(body, dict) else None
        if not reply or not str(reply).strip():
            raise SmokeTestFailed(f"POST /v1/model/generate on version {version} returned no message: "
                                  f"{str(body)[:300]}")
    log(f"smoke test passed on version {version} ({mode}): {cfg.smoke_prompt!r} -> {reply!r}")
    return {"mode": mode, "version": version, "authenticated": bool(api_key), "requests": results, "reply": reply,
            "cold_start": container.timings if container else None}


def _smoke_request(container, lam, name: str, version: str, label: str, event: dict, expected: int) -> dict:
    started = time.perf_counter()
    try:
        response = container(event) if container else _invoke_remote(lam, name, version, event)
    except SmokeTestFailed:
        raise
    except Exception as err:  # the handler crashed (or refused to start): that is the smoke test's answer
        raise SmokeTestFailed(f"{label} on version {version} raised {type(err).__name__}: {err}") from None
    seconds = time.perf_counter() - started
    status = response.get("statusCode")
    body = _safe_json(response)
    if status != expected:
        raise SmokeTestFailed(f"{label} on version {version} answered {status} (expected {expected}): "
                              f"{str(body)[:300]}")
    return {"request": label, "status": status, "seconds": round(seconds, 4), "body": body}


def _invoke_remote(lam, name: str, version: str, event: dict) -> dict:
    out = lam.invoke(FunctionName=name, Qualifier=version, Payload=json.dumps(event).encode())
    payload = json.loads(out["Payload"].read() or b"null")
    if out.get("FunctionError"):
        raise SmokeTestFailed(f"the function raised {out['FunctionError']}: {str(payload)[:300]}")
    return payload


def _safe_json(response: dict):
    try:
        return response_json(response)
    except (ValueError, TypeError):
        return response.get("body")
