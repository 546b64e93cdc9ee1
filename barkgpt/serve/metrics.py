"""Prometheus metrics at GET /metrics, summed over the server's worker processes.

With `serve.workers` > 1 each worker is its own process, and a scrape reaches one of them. So the
supervisor gives every worker one folder (prometheus_client's multiprocess mode,
PROMETHEUS_MULTIPROC_DIR, set before the workers start): each process writes its values into
memory-mapped files there, and whichever worker answers a scrape adds them all up. One process
keeps them in memory as usual.

What is counted: requests by route and status code (errors are the 4xx/5xx codes), requests
waiting for the model, prompt and generated tokens, time to the first generated piece (queue
wait included: what a client waits) and time per generated token after it.
"""
from __future__ import annotations

import os
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

REQUESTS = Counter("barkgpt_requests", "HTTP requests answered, by route and status code", ["route", "code"])
QUEUE = Gauge("barkgpt_queue_waiting", "requests waiting for the model", multiprocess_mode="livesum")
PROMPT_TOKENS = Counter("barkgpt_prompt_tokens", "prompt tokens read")
GENERATED_TOKENS = Counter("barkgpt_generated_tokens", "tokens generated")
FIRST_TOKEN = Histogram("barkgpt_time_to_first_token_seconds", "from a request's arrival at the model queue to "
                        "its first generated text", buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2,
                                                            5, 10, 30))
PER_TOKEN = Histogram("barkgpt_time_per_output_token_seconds", "generation time per token after the first",
                      buckets=(.00002, .00005, .0001, .0002, .0005, .001, .002, .005, .01, .02, .05, .1, .5))

ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/model/generate",
          "/health", "/ready", "/metrics", "/"}


def exposition() -> tuple[bytes, str]:
    """The text a scrape gets: this process's metrics, or every worker's summed."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def observe_generation(queued_at: float, first_at: float | None, done_at: float, prompt_tokens: int,
                       tokens: int) -> None:
    PROMPT_TOKENS.inc(prompt_tokens)
    if not tokens:
        return
    GENERATED_TOKENS.inc(tokens)
    if first_at is not None:
        FIRST_TOKEN.observe(first_at - queued_at)
        if tokens > 1:
            PER_TOKEN.observe((done_at - first_at) / (tokens - 1))


class CountRequests:
    """ASGI middleware: one count per answered request (plain ASGI: no per-request task or copy)."""

    def __init__(self, app):
        self.app = app
        self.counters = {}  # (route, code) -> the labelled child, looked up once

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                key = (route, message["status"])
                child = self.counters.get(key)
                if child is None:
                    child = self.counters[key] = REQUESTS.labels(route, str(message["status"]))
                child.inc()
            await send(message)

        await self.app(scope, receive, counted)


def now() -> float:
    return time.monotonic()
