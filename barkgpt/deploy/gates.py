"""Deploy gates: what must have passed before a model ships (read from the stages' reports)."""
from __future__ import annotations

from pathlib import Path

from barkgpt.errors import BarkError
from barkgpt.fileio import read_json
from barkgpt.layout import layout
from barkgpt.params import Params


def deploy_quantization(params: Params) -> str:
    return params.deploy.quantization or params.export.deploy_quantization


def check_gates(params: Params, name: str, root: Path) -> dict:
    """The evaluation gate (and the quantization gate for GGUF) must have passed."""
    cfg = params.deploy
    paths = layout(name, root)
    metrics_path = paths.metrics
    summary: dict = {}
    if metrics_path.exists():
        metrics = read_json(metrics_path)
        summary["eval"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool, str))}
    if not cfg.require_gates:
        return summary
    if not metrics_path.exists():
        raise BarkError(f"{metrics_path}: not found; evaluate the model before deploying (dvc repro)")
    if summary["eval"].get("gate_passed") is not True:
        raise BarkError(f"{metrics_path}: the evaluation gate did not pass; not deploying "
                        "(improve the model, or set deploy.require_gates: false to override)")
    if cfg.artifact == "gguf":
        parity_path = paths.parity_report
        if not parity_path.exists():
            raise BarkError(f"{parity_path}: not found; run export and quantization before deploying")
        parity = read_json(parity_path)
        if parity.get("gate", {}).get("f32_parity_passed") is False:
            raise BarkError(f"{parity_path}: F32 GGUF parity with PyTorch failed; not deploying")
        quant = deploy_quantization(params)
        verdict = quantization_verdict(parity, quant)
        if verdict is not True:
            raise BarkError(f"{parity_path}: quantization {quant} did not pass its gate ({verdict}); "
                            "not deploying (re-run parity, or choose export.deploy_quantization)")
    return summary


def quantization_verdict(parity: dict, quant: str):
    """True if the parity report accepts `quant`; otherwise a short reason."""
    quants = parity.get("quantizations") or parity.get("quants") or {}
    if isinstance(quants, list):
        quants = {str(q.get("type", q.get("name", ""))).lower(): q for q in quants}
    entry = {str(k).lower(): v for k, v in quants.items()}.get(quant.lower())
    if entry is None:
        return f"no entry for {quant} in the report"
    for key in ("accepted", "passed", "gate_passed"):
        if key in entry:
            return True if entry[key] is True else f"{key}={entry[key]}"
    status = str(entry.get("status", "")).lower()
    return True if status in ("accepted", "passed", "pass", "ok") else f"status={status or 'unknown'}"
