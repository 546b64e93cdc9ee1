"""Loopback ports for the servers the project starts (the local AWS API, MLflow, Prefect, tests)."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A port free on 127.0.0.1 now (the OS picks it; another process may take it before us)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
