"""The HTTP routes: OpenAI completions and chat (whole or streamed), the tutorial's generate, the
chat page, health and readiness. What a route needs arrives through FastAPI dependencies."""
from __future__ import annotations

import hmac
import time
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse

from barkgpt.params import ServeParams
from barkgpt.serve.backends import Done, GenParams
from barkgpt.serve.contract import message_text
from barkgpt.serve.generation import Generation, usage
from barkgpt.serve.schemas import (ApiError, ChatMessage, ChatRequest, CompletionRequest, GenerateRequest, Sampled,
                                   error_response)
from barkgpt.serve.settings import Settings

STATIC = Path(__file__).parent / "static"


# --- dependencies ----------------------------------------------------------------------------------

async def settings(request: Request) -> Settings:  # async: FastAPI runs a sync dependency in a thread
    return request.app.state.settings


async def serve_params(s: Annotated[Settings, Depends(settings)]) -> ServeParams:
    return s.serve


async def require_key(request: Request, s: Annotated[Settings, Depends(settings)]) -> None:
    if not s.api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), s.api_key.encode()):
        raise ApiError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'", "invalid_api_key",
                       {"WWW-Authenticate": "Bearer"})


async def loaded_backend(request: Request, serve: Annotated[ServeParams, Depends(serve_params)]):
    backend = request.app.state.backend
    if backend is None:
        raise ApiError(503, "the model is still loading; retry shortly", "not_ready",
                       {"Retry-After": str(serve.retry_after_s)})
    return backend


Serve = Annotated[ServeParams, Depends(serve_params)]
Backend = Annotated[object, Depends(loaded_backend)]


def served(backend, model: str | None):
    if model and model != backend.model_id:
        raise ApiError(404, f"model {model!r} is not served here; this server serves {backend.model_id!r} "
                            "(see GET /v1/models)", "model_not_found")
    return backend


def gen_params(body: Sampled, serve: ServeParams) -> GenParams:
    requested = body.max_completion_tokens or body.max_tokens
    if requested is not None and requested > serve.max_tokens_limit:
        raise ApiError(400, f"max_tokens {requested} is over this server's limit of {serve.max_tokens_limit}",
                       "max_tokens_too_large")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
        raise ApiError(400, "stop: at most 4 stop strings", "invalid_request")
    return GenParams(max_tokens=requested or serve.default_max_tokens, temperature=body.temperature,
                     top_p=body.top_p, stop=stops, seed=body.seed)


def check_chars(n: int, serve: ServeParams) -> None:
    if n > serve.max_prompt_chars:
        raise ApiError(400, f"the prompt has {n} characters; this server's limit is {serve.max_prompt_chars}",
                       "prompt_too_long")


def chat_messages(body: ChatRequest, serve: ServeParams) -> list[dict]:
    if len(body.messages) > serve.max_messages:
        raise ApiError(400, f"{len(body.messages)} messages; this server's limit is {serve.max_messages}",
                       "too_many_messages")
    messages = [{"role": m.role if m.role != "developer" else "system", "content": message_text(
        [p.model_dump() for p in m.content] if isinstance(m.content, list) else m.content)}
        for m in body.messages]
    check_chars(sum(len(m["content"]) for m in messages), serve)
    if not any(m["role"] == "user" for m in messages):
        raise ApiError(400, "messages: at least one message must have role 'user'", "invalid_request")
    return messages


def start_chat(request: Request, backend, serve: ServeParams, body: ChatRequest) -> Generation:
    served(backend, body.model)
    messages, g = chat_messages(body, serve), gen_params(body, serve)
    return Generation(request.app.state.worker, serve, lambda stop: backend.chat(messages, g, stop),
                      whole=not body.stream)


def include_usage(body: Sampled) -> bool:
    return bool((body.stream_options or {}).get("include_usage"))


# --- routes --------------------------------------------------------------------------------------

router = APIRouter()
api = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    backend = request.app.state.backend
    if backend is None:
        return error_response(503, "the model is not loaded yet", "not_ready")
    return {"status": "ready", "model": backend.model_id, "kind": backend.kind,
            "queue_waiting": request.app.state.worker.waiting}


@router.get("/", include_in_schema=False)
async def chat_page():
    return FileResponse(STATIC / "index.html", media_type="text/html")


@api.get("/models")
async def models(backend: Backend):
    # OpenAI's fields, then what the model is and what it hears (the chat page shows them)
    return {"object": "list", "data": [{"id": backend.model_id, "object": "model", "created": 0,
                                         "owned_by": "barkgpt", **backend.info()}]}


@api.post("/completions")
async def completions(body: CompletionRequest, request: Request, backend: Backend, serve: Serve):
    served(backend, body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(400, "prompt: send exactly one prompt string", "invalid_request")
    prompt = prompts[0]
    check_chars(len(prompt), serve)
    g = gen_params(body, serve)
    gen = Generation(request.app.state.worker, serve, lambda stop: backend.complete(prompt, g, stop),
                     whole=not body.stream)
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(text: str, finish: str | None) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": backend.model_id,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

    if not body.stream:
        text, done = await gen.text()
        return {**chunk(text, done.finish_reason), "usage": usage(done)}

    def final(done: Done, usage_only: bool = False) -> dict:
        if usage_only:
            return {**chunk("", None), "choices": [], "usage": usage(done)}
        return chunk("", done.finish_reason)

    return await gen.stream(lambda t: chunk(t, None), final, include_usage(body), [])


@api.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, backend: Backend, serve: Serve):
    gen = start_chat(request, backend, serve, body)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": backend.model_id}
    if not body.stream:
        text, done = await gen.text()
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

    head = [chunk({"role": "assistant", "content": ""}, None)]
    return await gen.stream(piece, final, include_usage(body), head)


@api.post("/model/generate")
async def generate(body: GenerateRequest, request: Request, backend: Backend, serve: Serve):
    """The tutorial's endpoint: the prompt is one user message; the reply comes back whole."""
    chat = ChatRequest(messages=[ChatMessage(role="user", content=body.prompt)], max_tokens=body.max_tokens,
                       temperature=body.temperature, seed=body.seed)
    text, _ = await start_chat(request, backend, serve, chat).text()
    return {"message": text.strip()}


router.include_router(api)
