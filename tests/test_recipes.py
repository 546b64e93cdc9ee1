"""The exported bark GGUF served by stock llama.cpp (llama-cpp-python's OpenAI-compatible server,
`python -m llama_cpp.server`), with no BarkGPT code in the server; and the Ollama Modelfile."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from barkgpt.config import load_params
from barkgpt.params import BARKS
from tests.conftest import free_port


@pytest.fixture(scope="module")
def llama_cpp_server(bark_gguf, tmp_path_factory):
    pytest.importorskip("sse_starlette", reason="pip install 'llama-cpp-python[server]' (the serve extra)")
    import httpx

    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(bark_gguf), "--n_ctx", "64",
                             "--n_threads", "1", "--host", "127.0.0.1", "--port", str(port),
                             "--model_alias", "bark-q8_0"], stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_llama_cpp_server_keeps_the_contract(llama_cpp_server):
    """Chat through the template stored in the GGUF: each reply is barks only, ended by <EOS> (stop)."""
    from openai import OpenAI

    client = OpenAI(base_url=llama_cpp_server + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["bark-q8_0"]
    replies = []
    for seed in range(8):
        r = client.chat.completions.create(model="bark-q8_0", messages=[{"role": "user", "content": "speak"}],
                                           max_tokens=16, temperature=1.0, seed=seed)
        replies.append((r.choices[0].message.content, r.choices[0].finish_reason))
    kept = [words for words, finish in replies
            if finish == "stop" and words.split() and all(w in BARKS for w in words.split())]
    assert len(kept) >= 7, replies  # the model keeps the contract ~100% (parity report); one slip allowed
    # a multi-turn conversation in the contract, and a raw completion
    r = client.chat.completions.create(model="bark-q8_0", max_tokens=16, temperature=0, messages=[
        {"role": "user", "content": "speak"}, {"role": "assistant", "content": "woof arf"},
        {"role": "user", "content": "speak"}])
    assert r.choices[0].finish_reason == "stop" and all(w in BARKS for w in r.choices[0].message.content.split())
    c = client.completions.create(model="bark-q8_0", prompt="User: speak Assistant:", max_tokens=16, temperature=0)
    assert c.choices[0].text.split() and all(w in BARKS for w in c.choices[0].text.split())


def test_ollama_modelfile_and_server_commands(bark_project, tmp_path):
    from barkgpt.export.recipes import llama_server_commands, ollama_modelfile

    params = load_params(bark_project / "params.yaml")
    text = ollama_modelfile(params, "bark", bark_project)
    lines = text.splitlines()
    assert "FROM ./quantized/bark-q8_0.gguf" in lines and "PARAMETER num_ctx 64" in lines
    assert 'PARAMETER stop "<EOS>"' in lines and "PARAMETER top_k 0" in lines
    template = next(line for line in lines if line.startswith("TEMPLATE"))
    assert "User: speak" in template and "<EOS>" in template and template.endswith('Assistant:"""')
    cmds = llama_server_commands(params, "bark", bark_project)
    assert cmds["llama_cpp.server"][:3] == ["python", "-m", "llama_cpp.server"]
    assert Path(cmds["llama-server"][2]) == bark_project / "exports/bark/quantized/bark-q8_0.gguf"
    assert "--jinja" in cmds["llama-server"] and cmds["llama-server"][4] == "64"
