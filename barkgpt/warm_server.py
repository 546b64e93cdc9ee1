"""The warm server's process (barkgpt/warm.py): `barkgpt <stage>` starts it as
`python -m barkgpt.warm_server SOCKET IDLE_SECONDS SYS_PATH_JSON`; each command it serves runs
`barkgpt.cli.main` in a forked child. A module of its own so that warm.py, which the CLI imports
on every call, does not import the CLI back."""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":
    socket_path, idle_s, path = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
    # The client's import path, so a child imports what a fresh process would; None stands for
    # each command's working directory, filled in per command (barkgpt.warm.import_path).
    sys.path[:] = [entry for entry in path if entry is not None]
    from barkgpt import warm
    from barkgpt.cli import main

    sys.exit(warm.serve(Path(socket_path), idle_s, main, path))
