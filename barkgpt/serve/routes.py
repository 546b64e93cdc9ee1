"""The HTTP routes: OpenAI completions and chat (whole or streamed), the tutorial's generate, the
chat page, health and readiness. What a route needs arrives through FastAPI dependencies."""
from __future__ import annotations

import base64
import hmac
import time
import uuid
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response

from barkgpt.params import ServeParams
from barkgpt.serve.backends import Done, GenParams
from barkgpt.serve.contract import message_text
from barkgpt.serve.generation import Generation, usage
from barkgpt.serve.schemas import (ApiError, ChatMessage, ChatRequest, CompletionRequest, EmbeddingRequest,
                                   GenerateRequest, Sampled, error_response, refuse_unsupported)
from barkgpt.serve.structured import grammar_for
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


def gen_params(body: Sampled, serve: ServeParams, logprobs: int | None = None, grammar=None) -> GenParams:
    refuse_unsupported(body)
    requested = body.max_completion_tokens or body.max_tokens
    if requested is not None and requested > serve.max_tokens_limit:
        raise ApiError(400, f"max_tokens {requested} is over this server's limit of {serve.max_tokens_limit}",
                       "max_tokens_too_large")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
        raise ApiError(400, "stop: at most 4 stop strings", "invalid_request")
    return GenParams(max_tokens=requested or serve.default_max_tokens, temperature=body.temperature,
                     top_p=body.top_p, stop=stops, seed=body.seed, logprobs=logprobs, grammar=grammar)


def chat_logprobs(body: ChatRequest, backend) -> int | None:
    """How many alternatives per token the reply's logprobs list (None: no logprobs asked)."""
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "invalid_request", param="top_logprobs")
    if not body.logprobs:
        return None
    if refusal := backend.format.logprobs_refusal():
        raise ApiError(400, refusal, "unsupported_parameter", param="logprobs")
    return body.top_logprobs or 0


def chat_grammar(body: ChatRequest, backend):
    """The grammar a response_format asks for, or a 400 naming why this model cannot follow one."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if refusal := backend.format.grammar_refusal(backend, fmt.type):
        raise ApiError(400, refusal, "unsupported_parameter", param="response_format")
    return grammar_for(fmt)


def check_tools(body: ChatRequest, backend) -> None:
    """Tools are only offered to a model whose chat template can present them; none is implemented
    yet, so a request that names tools gets a 400 instead of a reply that ignores them."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, f"tool_choice {choice!r} needs tools", "invalid_request", param="tool_choice")
        return
    raise ApiError(400, backend.format.tools_refusal(backend.model_id), "unsupported_parameter", param="tools")


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
    check_tools(body, backend)
    messages = chat_messages(body, serve)
    g = gen_params(body, serve, chat_logprobs(body, backend), chat_grammar(body, backend))
    return Generation(request.app.state.worker, serve, lambda stop: backend.chat(messages, g, stop),
                      whole=not body.stream)


def chat_logprobs_of(done: Done) -> dict | None:
    return None if done.logprobs is None else {"content": done.logprobs, "refusal": None}


def completion_logprobs(entries: list[dict] | None) -> dict | None:
    """The completions API's older shape of the same numbers."""
    if entries is None:
        return None
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


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
    return {"status": "ready", "model": backend.model_id, "kind": backend.format.kind,
            "queue_waiting": request.app.state.worker.waiting}


@router.get("/metrics", include_in_schema=False)
async def metrics_page():
    """Prometheus text format, every worker process's counts summed (barkgpt/serve/metrics.py)."""
    from barkgpt.serve.metrics import exposition

    body, content_type = exposition()
    return Response(body, media_type=content_type)


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
    g = gen_params(body, serve, body.logprobs)
    gen = Generation(request.app.state.worker, serve, lambda stop: backend.complete(prompt, g, stop),
                     whole=not body.stream)
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(text: str, finish: str | None, logprobs=None) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": backend.model_id,
                "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}]}

    if not body.stream:
        text, done = await gen.text()
        return {**chunk(text, done.finish_reason, completion_logprobs(done.logprobs)), "usage": usage(done)}

    def final(done: Done, usage_only: bool = False) -> dict:
        if usage_only:
            return {**chunk("", None), "choices": [], "usage": usage(done)}
        return chunk("", done.finish_reason, completion_logprobs(done.logprobs))

    return await gen.stream(lambda t: chunk(t, None), final, include_usage(body), [])


@api.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, backend: Backend, serve: Serve):
    gen = start_chat(request, backend, serve, body)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": backend.model_id}
    if not body.stream:
        text, done = await gen.text()
        return {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text.strip()},
                             "logprobs": chat_logprobs_of(done), "finish_reason": done.finish_reason}],
                "usage": usage(done)}

    def chunk(delta: dict, finish: str | None, logprobs=None) -> dict:
        return {**base, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    started = [False]

    def piece(text: str) -> dict:
        if not started[0]:  # the reply starts with its first word, not a separator
            text, started[0] = text.lstrip(), True
        return chunk({"content": text}, None)

    def final(done: Done, usage_only: bool = False) -> dict:
        if usage_only:
            return {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage(done)}
        return chunk({}, done.finish_reason, chat_logprobs_of(done))  # a stream's logprobs come at its end

    head = [chunk({"role": "assistant", "content": ""}, None)]
    return await gen.stream(piece, final, include_usage(body), head)


@api.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request, backend: Backend, serve: Serve):
    served(backend, body.model)
    refuse_unsupported(body)
    raw = body.input
    inputs = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    if not inputs:
        raise ApiError(400, "input: the list is empty; send a string or a list of strings", "invalid_request",
                       param="input")
    if len(inputs) > serve.max_embedding_inputs:
        raise ApiError(400, f"input: {len(inputs)} inputs; this server embeds at most {serve.max_embedding_inputs} "
                            "per request; split them", "too_many_inputs", param="input")
    check_chars(sum(len(i) for i in inputs if isinstance(i, str)), serve)
    vocab = backend.lm.vocab_size
    if any(not 0 <= t < vocab for i in inputs if not isinstance(i, str) for t in i):
        raise ApiError(400, f"input: token ids must be in 0..{vocab - 1} (this model's vocabulary)", "invalid_request",
                       param="input")
    gen = Generation(request.app.state.worker, serve, lambda stop: backend.embed_all(inputs, stop), whole=True)
    kind, value = await gen.next_event()
    gen.job.cancelled.set()
    vectors, n = value[0]
    if len(vectors) < len(inputs):  # the deadline passed between inputs
        raise ApiError(504, f"embedding took longer than {serve.request_timeout_s} s", "timeout")

    def encode(v: list[float]):
        if body.encoding_format == "base64":
            return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
        return v

    return {"object": "list", "model": backend.model_id,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": n, "total_tokens": n}}


@api.post("/model/generate")
async def generate(body: GenerateRequest, request: Request, backend: Backend, serve: Serve):
    """The tutorial's endpoint: the prompt is one user message; the reply comes back whole."""
    chat = ChatRequest(messages=[ChatMessage(role="user", content=body.prompt)], max_tokens=body.max_tokens,
                       temperature=body.temperature, seed=body.seed)
    text, _ = await start_chat(request, backend, serve, chat).text()
    return {"message": text.strip()}


router.include_router(api)
