"""Deploy gates: what must have passed before a model ships. One implementation, in barkgpt.gates:
every report that judged what ships (evaluation; parity for a GGUF) must describe these exact files
(their sha256) and pass its gate; a stale or failing report is named with the stage to re-run."""
from __future__ import annotations

from pathlib import Path

from barkgpt.gates import check_release, deploy_quantization  # noqa: F401 (deploy_quantization: API)
from barkgpt.params import Params


def check_gates(params: Params, name: str, root: Path) -> dict:
    if not params.deploy.require_gates:
        return {}
    return check_release(params, name, Path(root), params.deploy.artifact)
