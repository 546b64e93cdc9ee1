"""The FastAPI app: wiring. Request bodies are in `schemas`, routes in `routes`, the generation
plumbing in `generation`, the limits in front (body size, slow clients) in `limits`.

`create_app(settings)` builds the app; the model loads once in the lifespan (also under Mangum on
AWS Lambda). Every error a client can cause is a 4xx with an OpenAI-style JSON body
({"error": {"message", "type", "code"}}); no stack trace ever reaches a client.
"""
from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from barkgpt.serve.backends import load_backend
from barkgpt.serve.limits import RequestLimits
from barkgpt.serve.metrics import CountRequests
from barkgpt.serve.routes import router
from barkgpt.serve.schemas import ApiError, describe, error_response
from barkgpt.serve.settings import Settings, load_settings
from barkgpt.serve.worker import make_worker

log = logging.getLogger("barkgpt.serve")
ANY_ADDRESS = {"0.0.0.0", "::", ""}


def allowed_hosts(serve) -> list[str]:
    """Host headers the server answers: serve.allowed_hosts (loopback names by default) plus the
    address it listens on. A web page whose own name an attacker rebinds to 127.0.0.1 sends that
    name as its Host, and gets 400 instead of the API (DNS rebinding)."""
    listen = f"[{serve.host}]" if ":" in serve.host else serve.host  # IPv6 literals come bracketed
    hosts = list(serve.allowed_hosts)
    return hosts if serve.host in ANY_ADDRESS or listen in hosts else hosts + [listen]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    serve = settings.serve

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.backend = load_backend(serve, settings.root)  # once per process
        app.state.worker = make_worker(app.state.backend, serve)
        app.state.worker.start()
        # Everything alive now (the libraries, the app, the model) lives as long as the process:
        # move it out of the garbage collector's sight, so a full collection during a request walks
        # only what requests made (CPython's gc.freeze, for servers)
        gc.collect()
        gc.freeze()
        log.info("serving %s (%s model, %s)", app.state.backend.model_id, app.state.backend.format.kind,
                 app.state.backend.lm.backend)
        yield
        app.state.worker.stop()

    app = FastAPI(title="BarkGPT", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions and chat for BarkGPT models and chat GGUFs.")
    app.state.settings, app.state.backend = settings, None
    app.include_router(router)
    app.add_middleware(RequestLimits, max_body=64 * 1024 + 8 * serve.max_prompt_chars,
                       body_timeout_s=serve.request_body_timeout_s)
    app.add_middleware(CORSMiddleware, allow_origins=serve.cors_origins, allow_methods=["GET", "POST"],
                       allow_headers=["Authorization", "Content-Type"])  # errors get CORS headers too
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(serve), www_redirect=False)
    app.add_middleware(CountRequests)  # outermost: every answer is counted, refused ones too

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, err: ApiError):
        return error_response(err.status, err.message, err.code, err.headers, err.param)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, err: RequestValidationError):
        return error_response(400, describe(err.errors()), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, err: StarletteHTTPException):
        return error_response(err.status_code, str(err.detail), "http_error", getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, err: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal server error; see the server log", "internal_error")

    return app


def uvicorn_options(serve) -> dict:
    """What `uvicorn.run` needs besides the app, host and port: the slow-client guard on headers."""
    from barkgpt.serve.limits import guarded_http

    return {"http": guarded_http(serve.request_header_timeout_s), "timeout_keep_alive": 5}
