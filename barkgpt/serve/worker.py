"""One model worker thread with a bounded queue in front of it.

llama.cpp contexts (and our KV cache) are not thread-safe, so exactly one thread runs the model.
Requests wait in a bounded queue; when it is full the server answers 429 with Retry-After at once
instead of letting latency grow without bound. Each job carries a deadline and a cancel flag that
the backend polls between tokens (timeouts, clients that disconnect mid-stream).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

from barkgpt.errors import BarkError

log = logging.getLogger("barkgpt.serve")


class Busy(Exception):
    """The queue is full."""


class Job:
    def __init__(self, run: Callable[[Callable[[], bool]], Iterator], loop: asyncio.AbstractEventLoop,
                 timeout_s: float, whole: bool = False):
        self.run = run
        self.whole = whole  # deliver all items in one event (non-streaming: one cross-thread wake-up)
        self.loop = loop
        self.deadline = time.monotonic() + timeout_s
        self.cancelled = threading.Event()
        self.events: asyncio.Queue = asyncio.Queue()

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or time.monotonic() > self.deadline

    def timed_out(self) -> bool:
        return time.monotonic() > self.deadline

    def emit(self, kind: str, value=None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


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

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.should_stop():  # gave up while waiting in the queue
                job.emit("timeout" if job.timed_out() else "cancelled")
                continue
            self.busy = True
            try:
                if job.whole:
                    job.emit("items", list(job.run(job.should_stop)))
                else:
                    for item in job.run(job.should_stop):
                        job.emit("item", item)
                job.emit("timeout" if job.timed_out() else "end")
            except BarkError as err:
                job.emit("bad", str(err))
            except Exception:  # a bug or a library failure: log it, answer 500, keep serving
                log.exception("generation failed")
                job.emit("fail", "internal error while generating; see the server log")
            finally:
                self.busy = False
