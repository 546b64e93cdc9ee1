"""Trace the LangChain chat model and the LangGraph agent into the project's MLflow.

MLflow's LangChain autologging records every chat model call and every graph run as a trace
(inputs, outputs, latency, token usage); a run of the agent is one trace, its turns are spans
inside it. The traces go to the store the pipeline tracks into (params.yaml `tracking:`, or
MLFLOW_TRACKING_URI), under its experiment, and show on that experiment's Traces page
(`mlflow ui --backend-store-uri sqlite:///mlflow.db`).

    from barkgpt.chat.agent import run_agent
    from barkgpt.chat.langchain import ChatBarkGPT
    from barkgpt.chat.tracing import trace_to_mlflow

    trace_to_mlflow()                      # once per process, in the project root
    run_agent(ChatBarkGPT(base_url="http://127.0.0.1:8000"))
"""
from __future__ import annotations

from pathlib import Path


def trace_to_mlflow(root: str | Path = ".", params_path: str | Path | None = None) -> str:
    """Turn LangChain tracing on into this project's MLflow store; returns the experiment id."""
    from barkgpt.config import load_params
    from barkgpt.errors import BarkError
    from barkgpt.tracking.runs import client_for, experiment_id, resolve_uri

    root = Path(root)
    params = load_params(Path(params_path) if params_path else root / "params.yaml")
    if not params.tracking.enabled:
        raise BarkError("tracking.enabled is false in params.yaml; enable it to record traces in MLflow")
    mlflow, client = client_for(params, root)
    exp = experiment_id(client, params.tracking, root, resolve_uri(params.tracking, root))
    mlflow.set_experiment(experiment_id=exp)
    mlflow.langchain.autolog(log_traces=True, silent=True)
    return exp
