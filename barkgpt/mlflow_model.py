"""The registered MLflow model (models-from-code): prompts in, completions out.

MLflow stores this file with the model and runs it at load time; the weights come from the
logged checkpoint artifact and the code from the installed barkgpt package, so nothing is pickled.
    mlflow.pyfunc.load_model("models:/barkgpt-bark@champion").predict(["User: speak Assistant:"])
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline unless the user opts in
import mlflow  # noqa: E402
from mlflow.pyfunc import PythonModel  # noqa: E402


class BarkCompletion(PythonModel):
    def load_context(self, context):
        from barkgpt.lm.torch_lm import TorchLM

        self.lm = TorchLM.load(Path(context.artifacts["checkpoint"]))
        self.config = dict(context.model_config or {})

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        """The text that follows each prompt, decoded by the model's own tokenizer."""
        from barkgpt.lm import Sampling, generate_text

        cfg = {**self.config, **(params or {})}
        s = Sampling(temperature=cfg.get("temperature", 1.0), top_k=cfg.get("top_k"), top_p=cfg.get("top_p"),
                     max_new_tokens=cfg.get("max_new_tokens", 24), seed=cfg.get("sample_seed"))
        return [generate_text(self.lm, prompt, s) for prompt in model_input]


mlflow.models.set_model(BarkCompletion())
