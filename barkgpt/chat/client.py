"""Talking to a BarkGPT server with the official openai SDK.

The SDK keeps one connection pool per client, applies time-outs, and retries connection errors,
408, 429 (honouring Retry-After) and 5xx with exponential backoff; a stream is never replayed.
This module only points it at a server: users name the server as `barkgpt serve` prints it (the
chat page's URL), the key comes from BARKGPT_API_KEY, and errors become BarkErrors naming the fix.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

from barkgpt.errors import BarkError

DEFAULT_URL = "http://127.0.0.1:8000"


def api_url(url: str) -> str:
    """The server's root (http://host:port) -> its OpenAI API base (http://host:port/v1)."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def api_key(key: str | None = None) -> str:
    # the SDK insists on a key; a server without BARKGPT_API_KEY ignores it
    return key or os.environ.get("BARKGPT_API_KEY") or "unused"


def openai_client(url: str = DEFAULT_URL, key: str | None = None, timeout: float = 30.0, retries: int = 2):
    from openai import OpenAI

    return OpenAI(base_url=api_url(url), api_key=api_key(key), timeout=timeout, max_retries=retries)


@contextmanager
def server_errors(url: str):
    """openai's exceptions as BarkErrors naming the server and the fix (the CLI exits 2, no traceback)."""
    import openai

    try:
        yield
    except openai.APIConnectionError as err:  # refused, reset or timed out, after the retries
        raise BarkError(f"cannot reach the server at {url} ({type(err).__name__}); is `barkgpt serve` "
                        "running there?") from None
    except openai.APIStatusError as err:
        raise BarkError(f"the server at {url} answered {err.status_code}: {err.message}") from None
    except openai.APIError as err:  # an error event inside a stream
        raise BarkError(f"the server at {url} failed mid-reply: {err.message}") from None
