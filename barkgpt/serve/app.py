"""The FastAPI app: OpenAI-compatible completions and chat, SSE streaming, the chat page.

`create_app(settings)` builds the app; the model loads once in the lifespan (also under Mangum on
AWS Lambda). Every error a client can cause is a 4xx with an OpenAI-style JSON body
({"error": {"message", "type", "code"}}); no stack trace ever reaches a client.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from barkgpt.errors import BarkError
from barkgpt.serve.backends import Done, GenParams, load_backend
from barkgpt.serve.contract import message_text
from barkgpt.serve.settings import Settings, load_settings
from barkgpt.serve.worker import Busy, Job, make_worker

log = logging.getLogger("barkgpt.serve")
STATIC = Path(__file__).parent / "static"
INT64 = 2**63 - 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


def error_response(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status, headers=headers)


# --- request bodies (unknown OpenAI fields are ignored, so standard clients just work) ---------

class Sampled(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT64)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    seed: int | None = Field(None, ge=-INT64, le=INT64)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: dict | None = None


class CompletionRequest(Sampled):
    prompt: str | list[str] = Field(..., description="the text to continue (one prompt)")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "text"
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatRequest(Sampled):
    messages: list[ChatMessage] = Field(..., min_length=1)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    max_tokens: int | None = Field(None, ge=1, le=INT64)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    seed: int | None = Field(None, ge=-INT64, le=INT64)


class BodyLimit:
    """Refuse bodies over `max_body` bytes before the app parses them: by Content-Length when the
    client sends one, else by reading (and then replaying) the body up to the limit. Plain ASGI,
    so streaming responses and disconnect detection pass through untouched."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        too_big = error_response(413, f"request body over {self.max_body} bytes", "body_too_large")
        size = dict(scope["headers"]).get(b"content-length")
        if size is not None:
            if not size.isdigit() or int(size) > self.max_body:
                return await too_big(scope, receive, send)
            return await self.app(scope, receive, send)
        messages, total = [], 0  # chunked upload: buffer it, bounded
        while True:
            message = await receive()
            messages.append(message)
            total += len(message.get("body", b""))
            if total > self.max_body:
                return await too_big(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def _describe(errors: list[dict]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        if e.get("type") == "json_invalid":
            return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})"
        parts.append(f"{loc}: {e.get('msg')}")
    return "; ".join(parts)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    serve = settings.serve

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.backend = load_backend(serve, settings.root)  # once per process
        app.state.worker = make_worker(app.state.backend, serve)
        app.state.worker.start()
        log.info("serving %s (%s, %s backend)", app.state.backend.model_id, app.state.backend.kind, serve.backend)
        yield
        app.state.worker.stop()

    app = FastAPI(title="BarkGPT", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions and chat for BarkGPT models and chat GGUFs.")
    app.state.backend = None
    app.add_middleware(BodyLimit, max_body=64 * 1024 + 8 * serve.max_prompt_chars)
    app.add_middleware(CORSMiddleware, allow_origins=serve.cors_origins, allow_methods=["GET", "POST"],
                       allow_headers=["Authorization", "Content-Type"])  # outermost: errors get CORS headers too

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, err: ApiError):
        return error_response(err.status, err.message, err.code, err.headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, err: RequestValidationError):
        return error_response(400, _describe(err.errors()), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, err: StarletteHTTPException):
        return error_response(err.status_code, str(err.detail), "http_error", getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, err: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal server error; see the server log", "internal_error")

    async def require_key(request: Request) -> None:  # async: a sync dependency costs a thread hop
        if not settings.api_key:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'", "invalid_api_key",
                           {"WWW-Authenticate": "Bearer"})

    def backend_for(request: Request, model: str | None):
        backend = request.app.state.backend
        if backend is None:
            raise ApiError(503, "the model is still loading; retry shortly", "not_ready",
                           {"Retry-After": str(serve.retry_after_s)})
        if model and model != backend.model_id:
            raise ApiError(404, f"model {model!r} is not served here; this server serves {backend.model_id!r} "
                                "(see GET /v1/models)", "model_not_found")
        return backend

    def gen_params(body: Sampled) -> GenParams:
        requested = body.max_completion_tokens or body.max_tokens
        if requested is not None and requested > serve.max_tokens_limit:
            raise ApiError(400, f"max_tokens {requested} is over this server's limit of {serve.max_tokens_limit}",
                           "max_tokens_too_large")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "stop: at most 4 stop strings", "invalid_request")
        return GenParams(max_tokens=requested or serve.default_max_tokens, temperature=body.temperature,
                         top_p=body.top_p, stop=stops, seed=body.seed)

    def check_chars(n: int) -> None:
        if n > serve.max_prompt_chars:
            raise ApiError(400, f"the prompt has {n} characters; this server's limit is {serve.max_prompt_chars}",
                           "prompt_too_long")

    def start(request: Request, run, whole: bool = False) -> Job:
        job = Job(run, asyncio.get_running_loop(), serve.request_timeout_s, whole)
        try:
            request.app.state.worker.submit(job)
        except Busy:
            raise ApiError(429, f"the server is busy ({serve.queue_size} requests waiting); retry after "
                                f"{serve.retry_after_s} s", "queue_full",
                           {"Retry-After": str(serve.retry_after_s)}) from None
        return job

    async def next_event(job: Job):
        try:
            kind, value = await asyncio.wait_for(job.events.get(), max(0.05, job.deadline - time.monotonic() + 1.0))
        except asyncio.TimeoutError:
            kind, value = "timeout", None
        if kind == "bad":
            raise ApiError(400, value, "invalid_prompt")
        if kind == "timeout":
            job.cancelled.set()
            raise ApiError(504, f"generation took longer than {serve.request_timeout_s} s", "timeout")
        if kind == "fail":
            raise ApiError(500, value, "internal_error")
        return kind, value

    async def collect(job: Job) -> tuple[str, Done]:
        parts, done = [], Done("stop", 0, 0)
        try:
            while True:
                kind, value = await next_event(job)
                if kind not in ("item", "items"):
                    return "".join(parts), done
                for item in value if kind == "items" else [value]:
                    if isinstance(item, Done):
                        done = item
                    else:
                        parts.append(item)
        finally:
            job.cancelled.set()

    def usage(done: Done) -> dict:
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    async def stream_events(job: Job, first, piece_chunk, final_chunk, include_usage: bool, head: list[dict]):
        """SSE body: chunks for each piece, the final chunk, usage if asked, [DONE]. An error after
        the first byte cannot change the status any more: it is sent as an error event."""
        try:
            for chunk in head:
                yield sse(chunk)
            event = first
            while True:
                kind, value = event
                if kind != "item":
                    break
                if isinstance(value, Done):
                    yield sse(final_chunk(value))
                    if include_usage:
                        yield sse(final_chunk(value, usage_only=True))
                elif value:
                    yield sse(piece_chunk(value))
                try:
                    event = await next_event(job)
                except ApiError as err:
                    yield sse({"error": {"message": err.message, "type": "server_error", "code": err.code}})
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # also when the client went away mid-stream

    # --- routes ---------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request):
        backend = request.app.state.backend
        if backend is None:
            return error_response(503, "the model is not loaded yet", "not_ready")
        return {"status": "ready", "model": backend.model_id, "kind": backend.kind,
                "queue_waiting": request.app.state.worker.waiting}

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models(request: Request):
        backend = backend_for(request, None)
        return {"object": "list", "data": [{"id": backend.model_id, "object": "model", "created": 0,
                                             "owned_by": "barkgpt", "context_length": backend.n_ctx}]}

    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(body: CompletionRequest, request: Request):
        backend = backend_for(request, body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt: send exactly one prompt string", "invalid_request")
        prompt = prompts[0]
        check_chars(len(prompt))
        g = gen_params(body)
        job = start(request, lambda stop: backend.complete(prompt, g, stop), whole=not body.stream)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": backend.model_id,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        if not body.stream:
            text, done = await collect(job)
            return {**chunk(text, done.finish_reason), "usage": usage(done)}

        def final(done: Done, usage_only: bool = False) -> dict:
            if usage_only:
                return {**chunk("", None), "choices": [], "usage": usage(done)}
            return chunk("", done.finish_reason)

        first = await first_event(job)
        return sse_response(stream_events(job, first, lambda t: chunk(t, None), final,
                                          bool((body.stream_options or {}).get("include_usage")), []))

    async def first_event(job: Job):
        try:
            return await next_event(job)  # errors before the first token keep their 4xx status
        except BaseException:
            job.cancelled.set()
            raise

    def sse_response(gen) -> StreamingResponse:
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def chat_messages(body: ChatRequest) -> list[dict]:
        if len(body.messages) > serve.max_messages:
            raise ApiError(400, f"{len(body.messages)} messages; this server's limit is {serve.max_messages}",
                           "too_many_messages")
        messages = [{"role": m.role if m.role != "developer" else "system", "content": message_text(
            [p.model_dump() for p in m.content] if isinstance(m.content, list) else m.content)}
            for m in body.messages]
        check_chars(sum(len(m["content"]) for m in messages))
        if not any(m["role"] == "user" for m in messages):
            raise ApiError(400, "messages: at least one message must have role 'user'", "invalid_request")
        return messages

    async def run_chat(request: Request, body: ChatRequest):
        backend = backend_for(request, body.model)
        messages = chat_messages(body)
        g = gen_params(body)
        job = start(request, lambda stop: backend.chat(messages, g, stop), whole=not body.stream)
        return backend, job

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(body: ChatRequest, request: Request):
        backend, job = await run_chat(request, body)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": cid, "created": created, "model": backend.model_id}
        if not body.stream:
            text, done = await collect(job)
            return {**base, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text.strip()},
                                 "logprobs": None, "finish_reason": done.finish_reason}],
                    "usage": usage(done)}

        def chunk(delta: dict, finish: str | None) -> dict:
            return {**base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        started = [False]

        def piece(text: str) -> dict:
            if not started[0]:  # the reply starts with its first word, not a separator
                text, started[0] = text.lstrip(), True
            return chunk({"content": text}, None)

        def final(done: Done, usage_only: bool = False) -> dict:
            if usage_only:
                return {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage(done)}
            return chunk({}, done.finish_reason)

        first = await first_event(job)
        head = [chunk({"role": "assistant", "content": ""}, None)]
        return sse_response(stream_events(job, first, piece, final,
                                          bool((body.stream_options or {}).get("include_usage")), head))

    @app.post("/v1/model/generate", dependencies=[Depends(require_key)])
    async def generate(body: GenerateRequest, request: Request):
        """The tutorial's endpoint: the prompt is one user message; the reply comes back whole."""
        chat = ChatRequest(messages=[ChatMessage(role="user", content=body.prompt)], max_tokens=body.max_tokens,
                           temperature=body.temperature, seed=body.seed)
        _, job = await run_chat(request, chat)
        text, _ = await collect(job)
        return {"message": text.strip()}

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app
