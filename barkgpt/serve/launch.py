"""Start the HTTP server: one process, or `serve.workers` processes sharing one listening socket.

One Python process runs on at most one core at a time (HTTP parsing, validation, JSON and the
sampling loop hold the GIL; llama.cpp runs a tiny model in microseconds). Several worker
processes, each with its own llama.cpp model (a bark GGUF is a few hundred KB; a chat GGUF costs
its size per worker), use every core. uvicorn's supervisor starts them, lets them accept from
the same socket (an idle worker tends to accept first, so connections spread) and restarts any
that dies. The workers rebuild the app from the parent's resolved settings, passed in the
environment variable below (the API key stays in BARKGPT_API_KEY, never in that variable).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from barkgpt.serve.settings import Settings

SETTINGS_ENV = "BARKGPT_SERVE_WORKER_SETTINGS"


def run(settings: Settings, log_level: str = "info") -> None:
    import uvicorn

    s = settings.serve
    common = dict(host=s.host, port=s.port, log_level=log_level, timeout_graceful_shutdown=5)
    if s.workers == 1:
        from barkgpt.serve.app import create_app

        uvicorn.run(create_app(settings), **common)
        return
    os.environ[SETTINGS_ENV] = json.dumps({"serve": s.model_dump(), "root": str(Path(settings.root).resolve())})
    uvicorn.run(f"{__name__}:worker_app", factory=True, workers=s.workers, **common)


def worker_app():
    """The app of one worker process (uvicorn imports this by name in each process)."""
    from barkgpt.params import ServeParams
    from barkgpt.serve.app import create_app

    raw = json.loads(os.environ[SETTINGS_ENV])
    return create_app(Settings(serve=ServeParams(**raw["serve"]), root=Path(raw["root"]),
                               api_key=os.environ.get("BARKGPT_API_KEY") or None))
