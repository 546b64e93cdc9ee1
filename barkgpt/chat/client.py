"""BarkClient: a small HTTP client for the BarkGPT server (sync and async, httpx).

One connection pool per client (reuse), explicit timeouts, and retries with exponential backoff
on connection errors, 429 (honouring Retry-After) and 5xx. A stream is retried only before its
first byte arrives; after that a failure is raised, since replaying would repeat text.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator

import httpx

from barkgpt.errors import BarkError

RETRY_STATUS = {429, 500, 502, 503, 504}


class ServerError(BarkError):
    """The server answered with an error (4xx after no retry, or 5xx after all retries)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"server answered {status}: {message}")
        self.status = status


def _error_message(resp: httpx.Response) -> str:
    try:
        return resp.json()["error"]["message"]
    except Exception:
        return resp.text[:200]


def _delay(attempt: int, backoff: float, resp: httpx.Response | None) -> float:
    if resp is not None and resp.headers.get("retry-after", "").isdigit():
        return float(resp.headers["retry-after"])
    return backoff * 2**attempt


def _sse_data(lines) -> Iterator[dict]:
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            return
        obj = json.loads(data)
        if "error" in obj:
            raise ServerError(200, obj["error"].get("message", "stream error"))
        yield obj


def _chat_body(messages, stream: bool, **options) -> dict:
    body = {"messages": messages, "stream": stream}
    body.update({k: v for k, v in options.items() if v is not None})
    return body


def _delta(chunk: dict) -> str:
    choices = chunk.get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or ""


class BarkClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 30.0, connect_timeout: float = 3.0, retries: int = 3, backoff: float = 0.2):
        self.base_url = base_url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get("BARKGPT_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self.retries, self.backoff = retries, backoff
        self._client: httpx.Client | None = None
        self._aclient: httpx.AsyncClient | None = None

    # --- connection pools, created on first use ---
    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=self.timeout)
        return self._client

    @property
    def aclient(self) -> httpx.AsyncClient:
        if self._aclient is None:
            self._aclient = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout)
        return self._aclient

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def aclose(self) -> None:
        if self._aclient is not None:
            await self._aclient.aclose()
            self._aclient = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- sync ---
    def request(self, method: str, path: str, json_body: dict | None = None) -> dict:
        for attempt in range(self.retries + 1):
            resp = None
            try:
                resp = self.client.request(method, path, json=json_body)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as err:
                if attempt == self.retries:
                    raise BarkError(f"cannot reach the server at {self.base_url} ({type(err).__name__}); "
                                    "is `barkgpt serve` running?") from None
            else:
                if resp.status_code < 400:
                    return resp.json()
                if resp.status_code not in RETRY_STATUS or attempt == self.retries:
                    raise ServerError(resp.status_code, _error_message(resp))
            time.sleep(_delay(attempt, self.backoff, resp))
        raise AssertionError("unreachable")

    def health(self) -> dict:
        return self.request("GET", "/health")

    def models(self) -> list[str]:
        return [m["id"] for m in self.request("GET", "/v1/models")["data"]]

    def chat(self, messages: list[dict], **options) -> dict:
        """The full chat.completion response; options: model, max_tokens, temperature, top_p, stop, seed."""
        return self.request("POST", "/v1/chat/completions", _chat_body(messages, False, **options))

    def reply(self, messages: list[dict], **options) -> str:
        return self.chat(messages, **options)["choices"][0]["message"]["content"]

    def complete(self, prompt: str, **options) -> dict:
        body = {"prompt": prompt, **{k: v for k, v in options.items() if v is not None}}
        return self.request("POST", "/v1/completions", body)

    def generate(self, prompt: str) -> str:
        """The tutorial's endpoint: {"prompt"} -> {"message"}."""
        return self.request("POST", "/v1/model/generate", {"prompt": prompt})["message"]

    def stream_chunks(self, messages: list[dict], **options) -> Iterator[dict]:
        body = _chat_body(messages, True, **options)
        for attempt in range(self.retries + 1):
            try:
                with self.client.stream("POST", "/v1/chat/completions", json=body) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        if resp.status_code not in RETRY_STATUS or attempt == self.retries:
                            raise ServerError(resp.status_code, _error_message(resp))
                        wait = _delay(attempt, self.backoff, resp)
                    else:
                        yield from _sse_data(resp.iter_lines())
                        return
            except (httpx.ConnectError, httpx.ConnectTimeout) as err:
                if attempt == self.retries:
                    raise BarkError(f"cannot reach the server at {self.base_url} ({type(err).__name__})") from None
                wait = _delay(attempt, self.backoff, None)
            time.sleep(wait)

    def stream(self, messages: list[dict], **options) -> Iterator[str]:
        """Yield the reply's text pieces as they arrive."""
        for chunk in self.stream_chunks(messages, **options):
            if text := _delta(chunk):
                yield text

    # --- async ---
    async def arequest(self, method: str, path: str, json_body: dict | None = None) -> dict:
        for attempt in range(self.retries + 1):
            resp = None
            try:
                resp = await self.aclient.request(method, path, json=json_body)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as err:
                if attempt == self.retries:
                    raise BarkError(f"cannot reach the server at {self.base_url} ({type(err).__name__})") from None
            else:
                if resp.status_code < 400:
                    return resp.json()
                if resp.status_code not in RETRY_STATUS or attempt == self.retries:
                    raise ServerError(resp.status_code, _error_message(resp))
            await asyncio.sleep(_delay(attempt, self.backoff, resp))
        raise AssertionError("unreachable")

    async def achat(self, messages: list[dict], **options) -> dict:
        return await self.arequest("POST", "/v1/chat/completions", _chat_body(messages, False, **options))

    async def astream_chunks(self, messages: list[dict], **options) -> AsyncIterator[dict]:
        body = _chat_body(messages, True, **options)
        for attempt in range(self.retries + 1):
            try:
                async with self.aclient.stream("POST", "/v1/chat/completions", json=body) as resp:
                    if resp.status_code >= 400:
                        await resp.aread()
                        if resp.status_code not in RETRY_STATUS or attempt == self.retries:
                            raise ServerError(resp.status_code, _error_message(resp))
                        wait = _delay(attempt, self.backoff, resp)
                    else:
                        async for line in resp.aiter_lines():
                            if not line.startswith("data: "):
                                continue
                            if line[6:] == "[DONE]":
                                return
                            for obj in _sse_data([line]):
                                yield obj
                        return
            except (httpx.ConnectError, httpx.ConnectTimeout) as err:
                if attempt == self.retries:
                    raise BarkError(f"cannot reach the server at {self.base_url} ({type(err).__name__})") from None
                wait = _delay(attempt, self.backoff, None)
            await asyncio.sleep(wait)

    async def astream(self, messages: list[dict], **options) -> AsyncIterator[str]:
        async for chunk in self.astream_chunks(messages, **options):
            if text := _delta(chunk):
                yield text
