"""The model worker: one runner of generation jobs, with a bounded queue in front of it.

llama.cpp contexts (and our KV cache) are not thread-safe, so exactly one runner uses the model.
Requests wait in a bounded queue; when it is full the server answers 429 with Retry-After at once
instead of letting latency grow without bound. Each job carries a deadline and a cancel flag that
the backend polls between tokens (timeouts, clients that disconnect mid-stream).

Two runners behind one interface (`make_worker` picks, by `serve.inline`):
- `ModelWorker`: a thread of its own, so a long generation (a chat GGUF) never blocks the event
  loop that parses requests and streams replies.
- `InlineWorker`: a task on the event loop itself. The bark model writes a whole reply in a few
  hundred microseconds, less than handing the job to a thread and the reply back costs (a queue,
  a thread wake-up, the GIL changing hands several times); running it in place roughly halves the
  server's CPU time per request.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

from barkgpt.errors import BarkError
from barkgpt.serve import metrics
from barkgpt.serve.pieces import Done

log = logging.getLogger("barkgpt.serve")


class Busy(Exception):
    """The queue is full."""


class Job:
    def __init__(self, run: Callable[[Callable[[], bool]], Iterator], loop: asyncio.AbstractEventLoop,
                 timeout_s: float, whole: bool = False):
        self.run = run
        self.whole = whole  # deliver all items in one event (non-streaming: one cross-thread wake-up)
        self.loop = loop
        self.queued_at = time.monotonic()
        self.deadline = self.queued_at + timeout_s
        self.cancelled = threading.Event()
        self.events: asyncio.Queue = asyncio.Queue()

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or time.monotonic() > self.deadline

    def timed_out(self) -> bool:
        return time.monotonic() > self.deadline

    def emit(self, kind: str, value=None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def emit_here(self, kind: str, value=None) -> None:
        """`emit` from the event loop's own thread (no wake-up of the loop needed)."""
        self.events.put_nowait((kind, value))


def run_job(job: Job, emit: Callable) -> None:
    """Run one job, sending its items, then how it ended, through `emit(kind, value)`."""
    metrics.QUEUE.dec()
    if job.should_stop():  # gave up while waiting in the queue
        emit("timeout" if job.timed_out() else "cancelled")
        return
    try:
        first, items, last = None, [], None
        for item in job.run(job.should_stop):
            if first is None and isinstance(item, str) and item:
                first = time.monotonic()
            if job.whole:
                items.append(item)
            else:
                emit("item", item)
            last = item
        if job.whole:
            emit("items", items)
        if isinstance(last, Done):  # a generation's (an embedding job yields no Done)
            metrics.observe_generation(job.queued_at, first, time.monotonic(), last.prompt_tokens,
                                       last.completion_tokens)
        emit("timeout" if job.timed_out() else "end")
    except BarkError as err:
        emit("bad", str(err))
    except Exception:  # a bug or a library failure: log it, answer 500, keep serving
        log.exception("generation failed")
        emit("fail", "internal error while generating; see the server log")


class ModelWorker:
    def __init__(self, queue_size: int):
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.thread = threading.Thread(target=self._loop, name="barkgpt-model", daemon=True)
        self.busy = False

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        # unblock the thread; a job still running finishes its current token first
        try:
            self.jobs.put_nowait(None)
        except queue.Full:
            pass
        self.thread.join(timeout=5)

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Busy from None
        metrics.QUEUE.inc()

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self.busy = True
            try:
                run_job(job, job.emit)
            finally:
                self.busy = False


class InlineWorker:
    """Runs the jobs on the event loop, one at a time in arrival order (see the module docstring).
    The same bounded queue, deadlines and errors as ModelWorker; call start() inside the loop."""

    def __init__(self, queue_size: int):
        self.queue_size = queue_size
        self.jobs: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.busy = False

    def start(self) -> None:
        self.jobs = asyncio.Queue(maxsize=self.queue_size)
        self.task = asyncio.get_running_loop().create_task(self._loop())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except asyncio.QueueFull:
            raise Busy from None
        metrics.QUEUE.inc()

    @property
    def waiting(self) -> int:
        return self.jobs.qsize() if self.jobs is not None else 0

    async def _loop(self) -> None:
        while True:
            job = await self.jobs.get()
            self.busy = True
            try:
                run_job(job, job.emit_here)
            finally:
                self.busy = False
            await asyncio.sleep(0)  # let the loop send the reply and read requests between jobs


def make_worker(backend, serve) -> ModelWorker | InlineWorker:
    """serve.inline: auto runs in place a model whose format says it generates inline (the bark
    model), anything else in its own thread."""
    inline = serve.inline == "always" or (serve.inline == "auto" and backend.format.generates_inline)
    return InlineWorker(serve.queue_size) if inline else ModelWorker(serve.queue_size)
