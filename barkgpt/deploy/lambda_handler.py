"""AWS Lambda entry point: the FastAPI serving app behind Mangum.

Cold start (first invocation in a container): read the manifest named by BARKGPT_MANIFEST_URI,
check its sha256 against BARKGPT_MANIFEST_SHA256, download every file it lists into
BARKGPT_MODEL_DIR (default /tmp/barkgpt), verify each sha256, read the API key from the secret
named by BARKGPT_API_KEY_SECRET (if any), and build the app once. Warm invocations reuse the
loaded app. It fails closed: no manifest hash, a checksum mismatch or a manifest file name that
leaves the model folder makes the container refuse every request with 503 and the reason, rather
than serve bytes nobody released.

Image CMD: barkgpt.deploy.lambda_handler.handler
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from barkgpt.deploy.api_key import ENV_API_KEY, ENV_API_KEY_SECRET, read_api_key
from barkgpt.deploy.release import ChecksumMismatch, ReleaseRefused, download_verified, parse_s3_uri, plain_name

ENV_MANIFEST = "BARKGPT_MANIFEST_URI"
ENV_MANIFEST_SHA = "BARKGPT_MANIFEST_SHA256"
ENV_MODEL_DIR = "BARKGPT_MODEL_DIR"

AppFactory = Callable[[dict, dict, dict], object]  # (files {role: Path}, manifest, env) -> started ASGI app


def serving_app(files: dict[str, Path], manifest: dict, env: Mapping[str, str]):
    """The project's FastAPI server (barkgpt.serve) over the released model, started once.

    Serving settings are barkgpt.serve's defaults plus its BARKGPT_* variables from the function
    environment (e.g. BARKGPT_CORS_ORIGINS), and the API key read from its secret; the model is the
    released file.
    """
    from barkgpt.serve.app import create_app
    from barkgpt.serve.settings import load_settings

    settings = load_settings(root=files["model"].parent, env=dict(env), model=str(files["model"]),
                             backend=manifest["backend"], pipeline=manifest["pipeline"],
                             allowed_hosts=["*"],  # AWS routes by its own names: nothing local to rebind
                             # The start-up runs on a loop of its own and each invocation on the thread's loop:
                             # a generation task tied to the start-up loop would die with it, so a thread runs them.
                             inline="never")
    app = create_app(settings)
    start_lifespan(app)
    return app


def _on_helper_thread(coro_fn) -> None:
    """Run an async callable to completion on a fresh thread and loop; re-raise its error here.

    Not asyncio.run: on exit it finalizes every async generator the loop started, which would
    close the app's lifespan generator before its shutdown half could ever run."""
    failure: list[BaseException] = []

    def run():
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(coro_fn())
        except BaseException as err:
            failure.append(err)
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="barkgpt-lifespan")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def start_lifespan(app) -> None:
    """Run the app's start-up (model load, worker thread) once for the container's life.

    Mangum's own lifespan support would start and stop the app around every invocation. The
    start-up runs on a helper thread with its own event loop, so it also works when the caller
    already runs a loop (an in-process smoke test inside an async flow)."""
    ctx = app.router.lifespan_context(app)
    _on_helper_thread(ctx.__aenter__)
    app.state.lambda_lifespan = ctx  # the context stays open until the container ends


def stop_lifespan(app) -> None:
    """The app's shutdown (worker thread stops); for in-process use, where the process lives on."""
    ctx = getattr(getattr(app, "state", None), "lambda_lifespan", None)
    if ctx is not None:
        app.state.lambda_lifespan = None
        _on_helper_thread(lambda: ctx.__aexit__(None, None, None))


def refusal(status: int, kind: str, message: str) -> dict:
    """A Lambda proxy response every event format (function URL, API Gateway v1/v2) accepts."""
    return {"statusCode": status, "headers": {"content-type": "application/json"}, "isBase64Encoded": False,
            "body": json.dumps({"error": {"type": kind, "message": message}})}


class LambdaApp:
    """One container's state: the released files, the app, and how long the cold start took."""

    def __init__(self, env: Mapping[str, str], s3=None, app_factory: AppFactory | None = None,
                 clients: Callable[[str], object] | None = None):
        self.env = dict(env)
        self._s3 = s3
        self._clients = clients  # service -> boto3 client (default: boto3, the function role's credentials)
        self.app_factory = app_factory or serving_app
        self.app = None           # the ASGI app once loaded
        self.asgi = None          # the Mangum handler around it
        self.refused: str | None = None
        self.manifest: dict | None = None
        self.files: dict[str, Path] = {}
        self.timings: dict[str, float] = {}
        self.invocations = 0

    def s3(self):
        if self._s3 is None:
            self._s3 = self.client("s3")
        return self._s3

    def client(self, service: str):
        if self._clients is not None:
            return self._clients(service)
        import boto3  # in Lambda: the function role's credentials; AWS_ENDPOINT_URL honoured

        return boto3.client(service)

    def load(self) -> None:
        """Cold start: manifest -> verified files in the model dir -> app."""
        from mangum import Mangum

        started = time.perf_counter()
        uri, expected = self.env.get(ENV_MANIFEST), self.env.get(ENV_MANIFEST_SHA)
        if not uri:
            raise ReleaseRefused(f"{ENV_MANIFEST} is not set; deploy the function with `barkgpt deploy`")
        if not expected:  # without it, whoever can write the bucket decides what this function serves
            raise ReleaseRefused(f"{ENV_MANIFEST_SHA} is not set, so the release cannot be verified; "
                                 "deploy the function with `barkgpt deploy` (it sets both variables)")
        bucket, key = parse_s3_uri(uri)
        body = self.s3().get_object(Bucket=bucket, Key=key)["Body"].read()
        if hashlib.sha256(body).hexdigest() != expected:
            raise ChecksumMismatch(f"{uri}: manifest sha256 differs from the deployed {ENV_MANIFEST_SHA}; "
                                   "the release was modified after deploy; re-run the deploy")
        manifest = json.loads(body)
        if not plain_name(manifest.get("release_id")):
            raise ReleaseRefused(f"{uri}: release id {manifest.get('release_id')!r} is not a plain folder name")
        t_manifest = time.perf_counter()
        folder = Path(self.env.get(ENV_MODEL_DIR, "/tmp/barkgpt")) / manifest["release_id"]
        folder.mkdir(parents=True, exist_ok=True)
        files = {role: download_verified(self.s3(), manifest["bucket"], entry, folder)
                 for role, entry in manifest["files"].items()}
        t_download = time.perf_counter()
        app_env = dict(self.env)
        if self.env.get(ENV_API_KEY_SECRET):  # the key lives in this process only, never in the env
            app_env[ENV_API_KEY] = read_api_key(self.env[ENV_API_KEY_SECRET], self.client)
        app = self.app_factory(files, manifest, app_env)
        # lifespan off: Mangum would otherwise run startup/shutdown on every invocation.
        self.app, self.asgi = app, Mangum(app, lifespan="off")
        t_load = time.perf_counter()
        self.manifest, self.files = manifest, files
        self.timings = {"manifest_s": t_manifest - started, "download_verify_s": t_download - t_manifest,
                        "load_s": t_load - t_download, "cold_start_s": t_load - started}
        print(json.dumps({"barkgpt": "cold_start", "release_id": manifest["release_id"], **self.timings}),
              file=sys.stderr)

    def close(self) -> None:
        """Shut the app down (a Lambda container never does; an in-process smoke test must)."""
        if self.app is not None:
            stop_lifespan(self.app)

    def __call__(self, event: dict, context=None) -> dict:
        self.invocations += 1
        if self.refused:
            return refusal(503, "model_refused", self.refused)
        if self.asgi is None:
            try:
                self.load()
            except ReleaseRefused as err:
                # Permanent for this container: the released bytes are not what was promised.
                self.refused = f"refusing to serve: {err}"
                print(json.dumps({"barkgpt": "refused", "reason": self.refused}), file=sys.stderr)
                return refusal(503, "model_refused", self.refused)
        if not isinstance(event, dict):
            return refusal(400, "bad_event", f"the event is not a JSON object (got {type(event).__name__})")
        try:
            return call_in_loop(self.asgi, event, context or LocalContext())
        except Exception as err:  # the app's own errors are answered inside (500); these are the adapter's
            return refusal(400, "bad_event", f"not a function URL or API Gateway HTTP event "
                                             f"({type(err).__name__}: {str(err)[:120]})")


def call_in_loop(asgi, event: dict, context) -> dict:
    """Mangum drives the ASGI app with the thread's event loop (as in Lambda's main thread). Give
    the thread one if it has none; from inside a running loop, use a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        try:
            loop = asyncio.get_event_loop()
            if loop.is_closed():
                raise RuntimeError("closed")
        except RuntimeError:
            asyncio.set_event_loop(asyncio.new_event_loop())
        return asgi(event, context)
    box: dict = {}

    def run():
        asyncio.set_event_loop(asyncio.new_event_loop())
        try:
            box["out"] = asgi(event, context)
        except BaseException as err:
            box["err"] = err

    thread = threading.Thread(target=run, name="barkgpt-invoke")
    thread.start()
    thread.join()
    if "err" in box:
        raise box["err"]
    return box["out"]


class LocalContext:
    """The few Lambda context attributes Mangum and logs read, for in-process invocation."""

    function_name = "barkgpt-local"
    function_version = "$LATEST"
    aws_request_id = "local"
    memory_limit_in_mb = 0

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


_container: LambdaApp | None = None


def handler(event: dict, context=None) -> dict:
    """The Lambda handler: one LambdaApp per container, created on the first (cold) invocation."""
    global _container
    if _container is None:
        _container = LambdaApp(os.environ)
    return _container(event, context)
