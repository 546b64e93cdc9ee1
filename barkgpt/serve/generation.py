"""One request's generation on the model worker, read back as a whole reply or as an SSE stream.

The job waits in the worker's bounded queue (full: 429 with Retry-After) and carries a deadline
(504). Errors before the first token keep their HTTP status; after the first byte of a stream the
status is sent, so a later error becomes an error event. A client that goes away cancels the job.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from barkgpt.params import ServeParams
from barkgpt.serve.backends import Done
from barkgpt.serve.schemas import ApiError
from barkgpt.serve.worker import Busy, Job, ModelWorker


def usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class Generation:
    def __init__(self, worker: ModelWorker, serve: ServeParams, run: Callable, whole: bool = False):
        self.serve = serve
        self.job = Job(run, asyncio.get_running_loop(), serve.request_timeout_s, whole)
        try:
            worker.submit(self.job)
        except Busy:
            raise ApiError(429, f"the server is busy ({serve.queue_size} requests waiting); retry after "
                                f"{serve.retry_after_s} s", "queue_full",
                           {"Retry-After": str(serve.retry_after_s)}) from None

    async def next_event(self):
        job = self.job
        try:
            kind, value = await asyncio.wait_for(job.events.get(), max(0.05, job.deadline - time.monotonic() + 1.0))
        except asyncio.TimeoutError:
            kind, value = "timeout", None
        if kind == "bad":
            raise ApiError(400, value, "invalid_prompt")
        if kind == "timeout":
            job.cancelled.set()
            raise ApiError(504, f"generation took longer than {self.serve.request_timeout_s} s", "timeout")
        if kind == "fail":
            raise ApiError(500, value, "internal_error")
        return kind, value

    async def text(self) -> tuple[str, Done]:
        """The whole reply and its Done."""
        parts, done = [], Done("stop", 0, 0)
        try:
            while True:
                kind, value = await self.next_event()
                if kind not in ("item", "items"):
                    return "".join(parts), done
                for item in value if kind == "items" else [value]:
                    if isinstance(item, Done):
                        done = item
                    else:
                        parts.append(item)
        finally:
            self.job.cancelled.set()

    async def stream(self, piece_chunk: Callable, final_chunk: Callable, include_usage: bool,
                     head: list[dict]) -> StreamingResponse:
        """SSE: `head` chunks, a chunk per piece, the final chunk, usage if asked, [DONE]."""
        try:
            first = await self.next_event()  # errors before the first token keep their 4xx status
        except BaseException:
            self.job.cancelled.set()
            raise
        return StreamingResponse(self._events(first, piece_chunk, final_chunk, include_usage, head),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, first, piece_chunk, final_chunk, include_usage, head) -> AsyncIterator[str]:
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
                    event = await self.next_event()
                except ApiError as err:
                    yield sse({"error": {"message": err.message, "type": "server_error", "code": err.code}})
                    break
            yield "data: [DONE]\n\n"
        finally:
            self.job.cancelled.set()  # also when the client went away mid-stream
