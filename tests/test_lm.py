"""One model interface (barkgpt.lm), two backends: the same text through PyTorch, llama.cpp, the server's
backends and `barkgpt generate`; serving a GGUF never imports torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from barkgpt.params import BARKS
from barkgpt.serve.backends import Backend, Done, GenParams

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["User: speak Assistant:", "User: speak Assistant: woof woof <EOS> User: speak Assistant:",
           "Assistant:"]


def completion(backend: Backend, prompt: str, **sampling) -> tuple[str, Done]:
    pieces = list(backend.complete(prompt, GenParams(max_tokens=16, **sampling), lambda: False))
    return "".join(p for p in pieces if isinstance(p, str)), pieces[-1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "barkgpt", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def bark_f32(bark_project, tmp_path_factory) -> Path:
    from barkgpt.checkpoint import load_model
    from barkgpt.export.gguf_file import write_gguf

    model, tok = load_model(bark_project / "models/bark/best.pt")
    return write_gguf(model, tok, tmp_path_factory.mktemp("lm") / "bark-f32.gguf")


def test_bark_greedy_text_is_identical_through_both_backends_and_the_cli(bark_project, bark_f32):
    from barkgpt.lm import Sampling
    from barkgpt.lm.llama_lm import LlamaLM
    from barkgpt.lm.torch_lm import TorchLM

    torch_lm, llama_lm = TorchLM.load(bark_project / "models/bark/best.pt"), LlamaLM(bark_f32)
    on_torch, on_llama = Backend(torch_lm, torch_lm.name), Backend(llama_lm, llama_lm.name)
    assert (on_torch.model_id, on_llama.model_id) == ("bark-best", "bark-f32")
    assert on_torch.format.kind == on_llama.format.kind == "bark" and on_llama.info()["backend"] == "llama.cpp"
    try:
        for prompt in PROMPTS:
            text, done = completion(on_torch, prompt, temperature=0)
            assert completion(on_llama, prompt, temperature=0) == (text, done)
            ids = torch_lm.tokenizer.encode(prompt)
            new = list(torch_lm.generate(ids, Sampling(temperature=0, max_new_tokens=16)))
            # the model's own decoding of the whole sequence: one space between words, none invented
            assert prompt + text == torch_lm.tokenizer.decode(ids + [t for t in new if t != torch_lm.tokenizer.eos_id])
            assert text.startswith(" ") and "  " not in text and set(text.split()) <= set(BARKS), text
            assert done.finish_reason == "stop" and done.completion_tokens == len(new)
            for model in ([], ["--model", str(bark_f32)]):
                out = cli("generate", "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "16", *model,
                          cwd=bark_project)
                assert out.returncode == 0, out.stderr
                assert out.stdout == prompt + text + "\n"
        # a temperature or top_p too small for floating point is greedy, not a crash
        assert completion(on_torch, PROMPTS[0], temperature=1e-300, top_p=1e-300)[0] == completion(
            on_torch, PROMPTS[0], temperature=0)[0]
        assert completion(on_llama, PROMPTS[0], temperature=1e-300, top_p=1e-300)[0] == completion(
            on_llama, PROMPTS[0], temperature=0)[0]
        out = cli("generate", "--temperature", "1e-300", "--top-p", "1e-300", cwd=bark_project)
        assert out.returncode == 0 and "Traceback" not in out.stderr
        assert out.stdout == PROMPTS[0] + completion(on_torch, PROMPTS[0], temperature=0)[0] + "\n"
        # sampled: a seed reproduces the same completion on each backend
        for backend in (on_torch, on_llama):
            assert completion(backend, PROMPTS[0], seed=5) == completion(backend, PROMPTS[0], seed=5)
    finally:
        llama_lm.close()


def test_serving_a_gguf_and_the_lambda_handler_never_import_torch(bark_f32, tmp_path):
    """In a fresh interpreter: the server over a GGUF answers a chat request and the Lambda handler's
    app loads the released GGUF; torch was never imported."""
    code = textwrap.dedent(f"""
        import json
        import sys
        from pathlib import Path
        from fastapi.testclient import TestClient
        from barkgpt.deploy import lambda_handler
        from barkgpt.serve.app import create_app
        from barkgpt.serve.settings import load_settings

        body = {{"messages": [{{"role": "user", "content": "hi"}}], "seed": 1}}
        local = "http://127.0.0.1"  # a Host the server answers (it refuses others: DNS rebinding)
        with TestClient(create_app(load_settings(root={str(tmp_path)!r}, env={{}}, model={str(bark_f32)!r})),
                        base_url=local) as c:
            reply = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
            info = c.get("/v1/models").json()["data"][0]
        # the Lambda handler's server over a released GGUF, started as the handler starts it (model loaded)
        app = lambda_handler.serving_app({{"model": Path({str(bark_f32)!r})}}, {{"backend": "llama", "pipeline": "bark"}}, {{}})
        backend = app.state.backend
        print(json.dumps([reply, backend.model_id, backend.format.kind, info["id"], info["kind"], "torch" in sys.modules]))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    reply, lambda_id, lambda_kind, model_id, kind, torch_loaded = json.loads(out.stdout.splitlines()[-1])
    assert set(reply.split()) <= set(BARKS) and reply.strip()
    assert (model_id, kind, lambda_id, lambda_kind, torch_loaded) == ("bark-f32", "bark", "bark-f32", "bark", False)


def test_bf16_training_validation_bpb_equals_the_evaluate_stage(tmp_path):
    """Training in bfloat16 validates in float32 with the evaluate stage's function and windows: the
    bpb logged for best.pt and the evaluated bpb of best.pt agree to 1e-6."""
    import csv

    from barkgpt.config import load_params
    from barkgpt.pipelines import run_stage
    from conftest import make_project

    root = make_project(tmp_path, {"tracking": {"enabled": False}, "bark": {
        "data": {"train_conversations": 300, "val_conversations": 60},
        "train": {"max_steps": 30, "eval_every": 10, "log_every": 10, "dtype": "bfloat16", "threads": 1},
        "gates": {"contract_samples": 100}}})
    params = load_params(root / "params.yaml")
    run_stage(params, "bark", "data", root)
    run_stage(params, "bark", "tokenize", root)
    run_stage(params, "bark", "train", root, progress=False)
    metrics = run_stage(params, "bark", "evaluate", root)
    rows = [r for r in csv.DictReader((root / "reports/bark/train_log.csv").open()) if r["val_loss"]]
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert len(rows) == 3 and abs(float(best["val_bpb"]) - metrics["val_bpb"]) < 1e-6, (rows, metrics["val_bpb"])
    # bark's byte count is the text's: every word plus the space or newline after it
    assert metrics["val_bytes"] == (root / "data/bark/val.txt").stat().st_size
