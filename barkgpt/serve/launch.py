"""Start the HTTP server: one process, or `serve.workers` processes sharing one listening socket.

One Python process runs on at most one core at a time (HTTP parsing, validation, JSON and the
sampling loop hold the GIL; llama.cpp runs the bark model in microseconds). Several worker
processes, each with its own llama.cpp model (a bark GGUF is a few hundred KB; a chat GGUF costs
its size in memory per worker), use every core. uvicorn's supervisor starts them, passes each the
one listening socket (an idle worker tends to accept first, so connections spread) and restarts
any that dies. It pickles the configuration for each worker, so the app and the guarded HTTP
protocol (closures) are built inside the worker, from plain settings (`WorkerConfig.load`).
"""
from __future__ import annotations

import json
from pathlib import Path

import uvicorn

from barkgpt.serve.settings import Settings


def run(settings: Settings, log_level: str = "info") -> None:
    from barkgpt.serve.app import create_app, uvicorn_options

    s = settings.serve
    common = dict(host=s.host, port=s.port, log_level=log_level, timeout_graceful_shutdown=5)
    if s.workers == 1:
        uvicorn.run(create_app(settings), **common, **uvicorn_options(s))
        return
    from uvicorn.supervisors import Multiprocess

    config = WorkerConfig(settings, workers=s.workers, **common)
    sock = config.bind_socket()
    Multiprocess(config, sockets=[sock]).run()


class WorkerConfig(uvicorn.Config):
    """uvicorn's configuration for worker processes: it travels as plain settings (the API key
    stays in the environment the workers inherit) and becomes the app in each worker."""

    def __init__(self, settings: Settings, **kwargs):
        self.settings_json = json.dumps({"serve": settings.serve.model_dump(),
                                         "root": str(Path(settings.root).resolve())})
        super().__init__(app=None, **kwargs)

    def load(self) -> None:
        from barkgpt.params import ServeParams
        from barkgpt.serve.app import create_app, uvicorn_options
        from barkgpt.serve.settings import read_env

        raw = json.loads(self.settings_json)
        key = read_env().api_key
        settings = Settings(serve=ServeParams(**raw["serve"]), root=Path(raw["root"]),
                            api_key=key.get_secret_value() if key else None)
        self.app = create_app(settings)
        for name, value in uvicorn_options(settings.serve).items():
            setattr(self, name, value)
        super().load()
