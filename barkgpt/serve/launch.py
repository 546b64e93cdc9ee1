"""Start the HTTP server: one process, or `serve.workers` processes listening on one port.

One Python process runs on at most one core at a time (HTTP parsing, validation, JSON and the
sampling loop hold the GIL; llama.cpp runs the bark model in microseconds). Several worker
processes, each with its own llama.cpp model (a bark GGUF is a few hundred KB; a chat GGUF costs
its size in memory per worker), use every core.

Each worker listens on its own socket bound to the same port with SO_REUSEPORT, so the kernel
spreads new connections evenly across them. One socket shared by all workers does not: asyncio
accepts every pending connection on each wake-up, so a burst of keep-alive clients lands on one
worker (measured: 8 clients, one of two workers used 94% of the CPU). A small supervisor starts
the workers, replaces one that dies, and stops them all on SIGINT or SIGTERM. Workers are
spawned, not forked, and get plain settings (the API key stays in the environment they inherit),
so the app is built inside each one.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

import uvicorn

from barkgpt.errors import BarkError
from barkgpt.serve.metrics import MULTIPROC_ENV
from barkgpt.serve.settings import Settings

log = logging.getLogger("uvicorn.error")
STARTUP_FAILURE = 3  # uvicorn's exit code for a server that could not start


def run(settings: Settings, log_level: str = "info") -> None:
    from barkgpt.serve.app import create_app, uvicorn_options

    s = settings.serve
    common = dict(host=s.host, port=s.port, log_level=log_level, timeout_graceful_shutdown=5)
    if s.workers == 1:
        uvicorn.run(create_app(settings), **common, **uvicorn_options(s))
        return
    supervise(settings, s.workers, common)


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port that other processes may bind too (SO_REUSEPORT)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise BarkError(f"cannot listen on {host}:{port} ({err.strerror}); stop what uses the port, "
                        "or choose another with --port") from None
    return sock


def supervise(settings: Settings, workers: int, common: dict) -> None:
    # Bound but never listening: the port is checked (and port 0 resolved) before any worker
    # starts, and no connection is ever queued on this socket.
    probe = listen_socket(common["host"], common["port"])
    common = {**common, "port": probe.getsockname()[1]}
    settings_json = json.dumps({"serve": settings.serve.model_dump(), "root": str(Path(settings.root).resolve())})
    spawn = multiprocessing.get_context("spawn")
    # one metrics folder for this server's workers (prometheus_client's multiprocess mode); the
    # spawned workers inherit the variable and read it when they import prometheus_client
    metrics_dir = tempfile.TemporaryDirectory(prefix="barkgpt-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir.name
    from prometheus_client.multiprocess import mark_process_dead

    def start() -> multiprocessing.Process:
        process = spawn.Process(target=serve_worker, args=(settings_json, common), name="barkgpt-serve-worker")
        process.start()
        return process

    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    processes = [start() for _ in range(workers)]
    code = 0
    while not stopping.wait(0.5):
        for i, process in enumerate(processes):
            if process.is_alive():
                continue
            if process.exitcode == STARTUP_FAILURE:
                log.error("worker [%d] could not start; stopping", process.pid)
                code = STARTUP_FAILURE
                stopping.set()
                break
            log.warning("worker [%d] died (exit code %s); starting another", process.pid, process.exitcode)
            mark_process_dead(process.pid)  # its live gauges (queue depth) no longer count
            processes[i] = start()
    for process in processes:
        if process.is_alive():
            process.terminate()  # SIGTERM: uvicorn's graceful shutdown in the worker
    for process in processes:
        process.join(common["timeout_graceful_shutdown"] + 5)
        if process.is_alive():
            process.kill()
    probe.close()
    metrics_dir.cleanup()
    if code:
        sys.exit(code)


def serve_worker(settings_json: str, common: dict) -> None:
    """One worker process: the app from plain settings, on its own SO_REUSEPORT socket."""
    from barkgpt.params import ServeParams
    from barkgpt.serve.app import create_app, uvicorn_options
    from barkgpt.serve.settings import read_env

    raw = json.loads(settings_json)
    key = read_env().api_key
    settings = Settings(serve=ServeParams(**raw["serve"]), root=Path(raw["root"]),
                        api_key=key.get_secret_value() if key else None)
    try:
        app = create_app(settings)
    except Exception as err:  # the supervisor stops instead of restarting a worker that cannot start
        log.error("worker could not build the app: %s", err)
        sys.exit(STARTUP_FAILURE)
    config = uvicorn.Config(app, **common, **uvicorn_options(settings.serve))
    uvicorn.Server(config).run(sockets=[listen_socket(common["host"], common["port"])])
