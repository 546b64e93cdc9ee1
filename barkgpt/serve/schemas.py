"""Request bodies and the OpenAI-shaped error every failure a client can cause becomes.

Every field the OpenAI API defines for a request is declared here, so none is silently ignored:
a field the server honours is typed and used; one it cannot honour is accepted only with its
neutral value (frequency_penalty 0, logit_bias {}, ...) and otherwise answered with a 400 naming
the field (`refuse_unsupported`). tests/test_serve.py derives OpenAI's field lists from the
`openai` package and checks that each is declared. Fields OpenAI does not define are ignored, as
OpenAI-compatible servers do (vendor extensions).
"""
from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

INT64 = 2**63 - 1


MAX_TOP_LOGPROBS = 20  # OpenAI's own limit


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, headers: dict | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.param = status, message, code, headers, param


def error_response(status: int, message: str, code: str, headers: dict | None = None,
                   param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def describe(errors: list[dict]) -> str:
    """pydantic's validation errors as one line for the client."""
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        if e.get("type") == "json_invalid":
            return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})"
        parts.append(f"{loc}: {e.get('msg')}")
    return "; ".join(parts)


# OpenAI fields this server does not implement: accepted only with a neutral value (None is always
# neutral), else a 400 naming the field and why. field -> (is the value neutral?, why not supported).
UNSUPPORTED = {
    "frequency_penalty": (lambda v: v == 0, "repetition penalties are not implemented"),
    "presence_penalty": (lambda v: v == 0, "repetition penalties are not implemented"),
    "logit_bias": (lambda v: not v, "logit bias is not implemented"),
    "best_of": (lambda v: v == 1, "only one completion is generated per request"),
    "echo": (lambda v: v is False, "the prompt is not echoed"),
    "suffix": (lambda v: v == "", "insertion (a suffix) is not implemented"),
    "store": (lambda v: v is False, "this server stores no completions"),
    "metadata": (lambda v: not v, "metadata is kept only with stored completions, which this server does not keep"),
    "service_tier": (lambda v: v in ("auto", "default"), "this server has one service tier"),
    "modalities": (lambda v: v == ["text"], "only text output"),
    "audio": (lambda v: False, "no audio output"),
    "prediction": (lambda v: False, "predicted outputs are not implemented"),
    "reasoning_effort": (lambda v: False, "the model is not a reasoning model"),
    "verbosity": (lambda v: False, "the model has no verbosity control"),
    "web_search_options": (lambda v: False, "no web search"),
    "functions": (lambda v: not v, "the deprecated functions are not supported; tools are, for chat models "
                                   "whose template supports them"),
    "function_call": (lambda v: v == "none", "the deprecated function_call is not supported"),
    "prompt_cache_retention": (lambda v: False, "prompt cache retention is not configurable here"),
    "prompt_cache_options": (lambda v: not v, "prompt caching is not configurable here"),
    "moderation": (lambda v: not v, "this server runs no moderation"),
    "dimensions": (lambda v: False, "the embedding size is the model's; it cannot be shortened"),
}


def refuse_unsupported(body: BaseModel) -> None:
    """A 400 for the first OpenAI field sent with a value this server cannot honour."""
    for name in body.model_fields_set & UNSUPPORTED.keys():  # only what the client sent
        value = getattr(body, name)
        neutral, why = UNSUPPORTED[name]
        if value is not None and not neutral(value):
            raise ApiError(400, f"{name}={value!r} is not supported by this server ({why}); leave it out",
                           "unsupported_parameter", param=name)


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
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # identifiers of the end user and of the prompt, for the provider's own bookkeeping: they change
    # no reply in OpenAI's API either, so accepting them ignores nothing
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


class CompletionRequest(Sampled):
    prompt: str | list[str] = Field(..., description="the text to continue (one prompt)")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="the log probability of each token and of the N most likely")
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(..., min_length=1, max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: ToolFunction


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "text"
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None


class ChatRequest(Sampled):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    audio: dict | None = None
    prediction: dict | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict | None = None
    functions: list[dict] | None = None
    function_call: str | dict | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict | None = None
    moderation: dict | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    max_tokens: int | None = Field(None, ge=1, le=INT64)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    seed: int | None = Field(None, ge=-INT64, le=INT64)
