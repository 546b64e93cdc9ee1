"""Load benchmark for `barkgpt serve` on loopback: latency percentiles, throughput, errors.

Starts the server (bark model through llama.cpp by default), then for each concurrency level runs
a fixed number of chat requests from that many concurrent clients (keep-alive connections) and
prints p50/p90/p99 latency, requests/s, 4xx/5xx counts, dropped connections and how many replies
kept the bark contract. Bounded: every level stops after --requests requests.

Several server configurations run in turn, so every figure comes from one run on one machine,
and each configuration's requests/s is printed as a ratio to the first one's:
- `ref:REF`: the code of git revision REF (checked out into a temporary worktree) with its own
  defaults, e.g. `ref:main` or the commit before a change: the server as it was;
- `single`: this code as one process generating in a model thread (serve.workers 1, inline never);
- `params`: this code with the project's params.yaml serve section (serve.workers, serve.inline);
- `llama-server`: llama.cpp's own C++ server on the same GGUF, built from the llama.cpp that the
  pinned llama-cpp-python vendors (scripts/build_llama_server.sh; cached after the first build),
  one decode thread, its chat template from the GGUF (--jinja), as many slots as the most clients;
- `llama_cpp.server`: llama-cpp-python's own OpenAI-compatible server (`python -m llama_cpp.server`).

    python benchmarks/serve_load.py                        # single, then params: 8 and 32 clients, 2000 requests
    python benchmarks/serve_load.py --configs ref:HEAD~3 params   # an older revision against today
    python benchmarks/serve_load.py --configs params llama-server llama_cpp.server   # against llama.cpp's servers
    python benchmarks/serve_load.py --configs params llama-server --rounds 3   # A B A B A B on a shared machine
    python benchmarks/serve_load.py --requests 200         # short check
    python benchmarks/serve_load.py --url http://HOST:PORT --model-id NAME   # an already running server
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from barkgpt.params import BARKS  # noqa: E402


def bark_gguf(root: Path, quant: str) -> Path:
    """The pipeline's deploy GGUF; without one, export models/bark/best.pt to a temp GGUF."""
    from barkgpt.errors import BarkError
    from barkgpt.serve.backends import resolve_model
    from barkgpt.serve.settings import load_settings

    serve = load_settings(root=root, quant=quant, backend="llama").serve
    quant = serve.quant
    try:
        return resolve_model(serve, root)
    except BarkError:
        from barkgpt.checkpoint import load_model
        from barkgpt.export.gguf_file import write_gguf
        from barkgpt.export.quantize import quantize

        out = Path(tempfile.mkdtemp(prefix="barkgpt-bench-"))
        model, tok = load_model(root / "models" / "bark" / "best.pt")
        f32 = write_gguf(model, tok, out / "bark-f32.gguf")
        return quantize(f32, out / f"bark-{quant.lower()}.gguf", quant.lower())


def start_server(model: Path, port: int, threads: int, code: Path = ROOT, params: Path | None = None
                 ) -> subprocess.Popen:
    """`barkgpt serve` of the code in `code`, with `params` as its params file when given."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    cmd = [sys.executable, "-m", "barkgpt", *(["--params", str(params)] if params else []), "serve",
           "--model", str(model), "--port", str(port), "--host", "127.0.0.1", "--log-level", "warning",
           "--threads", str(threads)]
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(proc, f"http://127.0.0.1:{port}/ready", cmd)
    return proc


SINGLE = {"workers": 1, "inline": "never"}  # one process, generation in a model thread


@contextlib.contextmanager
def configuration(name: str, work: Path):
    """(code folder, params file or None) for a configuration name (see the module docstring)."""
    if name.startswith("ref:"):
        tree = work / name[4:].replace("/", "_")
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), name[4:]], check=True)
        try:
            yield tree, None
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    elif name in EXTERNAL:
        yield None, None
    elif name in ("single", "params"):
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        if name == "single":
            raw = {**raw, "serve": {**raw.get("serve", {}), **SINGLE}}
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        yield ROOT, path
    else:
        raise SystemExit(f"unknown configuration {name!r}: use ref:REV, single, params, llama-server or "
                         "llama_cpp.server")


EXTERNAL = ("llama-server", "llama_cpp.server")


def start_external(name: str, model: Path, port: int, threads: int, slots: int) -> subprocess.Popen:
    """llama.cpp's C++ server or llama-cpp-python's, on `model`, answering as the model's stem."""
    n_ctx = gguf_context(model)
    if name == "llama-server":
        binary = subprocess.run([str(ROOT / "scripts" / "build_llama_server.sh")], check=True, capture_output=True,
                                text=True).stdout.strip()
        cmd = [binary, "-m", str(model), "--jinja", "-a", model.stem, "--host", "127.0.0.1", "--port", str(port),
               "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(n_ctx * slots), "--kv-unified",
               "--no-webui", "-lv", "0"]
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", model.stem,
               "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--host", "127.0.0.1", "--port", str(port),
               "--verbose", "false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(proc, f"http://127.0.0.1:{port}/v1/models", cmd)
    return proc


def gguf_context(model: Path) -> int:
    from gguf import GGUFReader

    reader = GGUFReader(str(model))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    return int(reader.fields[f"{arch}.context_length"].parts[-1][0])


def wait_ready(proc: subprocess.Popen, url: str, cmd: list[str]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; run `{' '.join(cmd)}` to see why")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not become ready in 120 s: {' '.join(cmd)}")


class Connection:
    """One keep-alive HTTP/1.1 connection on raw asyncio streams: a load generator much lighter
    than a full client library, so the numbers measure the server, not the client."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                close = True
        data = await self.reader.readexactly(length)
        if close:
            await self.close()
        return int(status_line.split()[1]), data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def run_level(url: str, model_id: str, clients: int, requests: int, max_tokens: int,
                    temperature: float = 1.0, end_text: str | None = None) -> dict:
    """end_text: a server that writes the end token's text at the end of a reply (llama-server
    renders the bark GGUF's `<EOS>`, a normal token of its vocabulary); it ends, not breaks, the reply."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    latencies: list[float] = []
    status: dict[int, int] = {}
    dropped = contract_ok = 0
    next_id = 0

    async def worker():
        nonlocal next_id, dropped, contract_ok
        conn = Connection(host, port)
        while next_id < requests:
            i = next_id
            next_id += 1
            body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "speak"}],
                               "max_tokens": max_tokens, "seed": i, "temperature": temperature}).encode()
            t0 = time.perf_counter()
            try:
                code, data = await asyncio.wait_for(conn.post("/v1/chat/completions", body), 30)
            except (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                dropped += 1
                await conn.close()
                continue
            latencies.append(time.perf_counter() - t0)
            status[code] = status.get(code, 0) + 1
            if code == 200:
                words = json.loads(data)["choices"][0]["message"]["content"].split()
                if end_text and words and words[-1] == end_text:
                    words.pop()
                contract_ok += bool(words) and all(w in BARKS for w in words)
        await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(clients)])
    wall = time.perf_counter() - start
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return 1000 * lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    return {"clients": clients, "requests": requests, "ok": status.get(200, 0),
            "4xx": sum(n for s, n in status.items() if 400 <= s < 500),
            "5xx": sum(n for s, n in status.items() if s >= 500), "dropped": dropped,
            "contract_ok": contract_ok, "req_per_s": requests / wall, "p50_ms": pct(0.50), "p90_ms": pct(0.90),
            "p99_ms": pct(0.99), "max_ms": 1000 * lat[-1] if lat else float("nan"),
            "mean_ms": 1000 * statistics.fmean(lat) if lat else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="sampling temperature of every request (0: greedy, every reply must keep the contract)")
    ap.add_argument("--model", help="GGUF to serve (default: the pipeline's Q8_0 GGUF, else one exported now)")
    ap.add_argument("--quant", default=None, help="default: export.deploy_quantization")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", nargs="+", default=["single", "params"],
                    help="server configurations, in turn: ref:REV, single, params, llama-server, llama_cpp.server "
                         "(the first is the baseline)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure the configurations in turn this many times (A B A B ...: a shared machine's "
                         "load falls on all of them alike); the table gives each figure's median over the rounds")
    ap.add_argument("--url", help="benchmark a running server instead of starting one")
    ap.add_argument("--model-id", help="with --url: the model name to send")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()

    if args.url:
        results = combine([{"config": args.url, **r} for i in range(args.rounds)
                           for r in measure(args.url.rstrip("/"), args.model_id, args, warm=i == 0)])
    else:
        model = Path(args.model) if args.model else bark_gguf(ROOT, args.quant)
        runs = []
        with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp, contextlib.ExitStack() as stack:
            servers = []  # every configuration's server up at once (idle ones cost nothing), measured in turn
            for name in args.configs:
                code, params = stack.enter_context(configuration(name, Path(tmp)))
                if name in EXTERNAL:
                    port = free_port()
                    proc, url = start_external(name, model, port, args.threads, max(args.clients)), \
                        f"http://127.0.0.1:{port}"
                else:
                    proc, url = serve(model, args.threads, code, params)
                stack.callback(stop, proc)
                model_id = httpx.get(url + "/v1/models").json()["data"][0]["id"]
                print(f"{name}: serving {model} as {model_id!r} on {url}", flush=True)
                servers.append((name, url, model_id))
            for i in range(args.rounds):
                for name, url, model_id in servers:
                    end = "<EOS>" if name == "llama-server" else None
                    got = [{"config": name, "round": i, **r}
                           for r in measure(url, model_id, args, warm=i == 0, end_text=end)]
                    if args.rounds > 1:
                        print(f"round {i + 1}: " + "; ".join(f"{name} {r['clients']} clients {r['req_per_s']:.0f} "
                                                             f"req/s p99 {r['p99_ms']:.1f} ms" for r in got), flush=True)
                    runs += got
        results = combine(runs)
    cols = ["config", "clients", "requests", "ok", "4xx", "5xx", "dropped", "contract_ok", "req_per_s", "p50_ms",
            "p90_ms", "p99_ms", "max_ms"] + (["rounds"] if args.rounds > 1 else [])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    report(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(model: Path, threads: int, code: Path, params: Path | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    return start_server(model, port, threads, code, params), f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(url: str, model_id: str, args, warm: bool = True, end_text: str | None = None) -> list[dict]:
    if warm:
        asyncio.run(run_level(url, model_id, 8, 400, args.max_tokens))  # warm-up (every worker), not reported
    return [asyncio.run(run_level(url, model_id, c, args.requests, args.max_tokens, args.temperature, end_text))
            for c in args.clients]


def combine(runs: list[dict]) -> list[dict]:
    """One row per configuration and concurrency: counts summed over the rounds, rates and
    latencies their median (a round that met a burst of other load moves no figure much)."""
    rows: dict[tuple, list[dict]] = {}
    for r in runs:
        rows.setdefault((r["config"], r["clients"]), []).append(r)
    out = []
    for (config, clients), rs in rows.items():
        row = {"config": config, "clients": clients, "rounds": len(rs)}
        for k in ("requests", "ok", "4xx", "5xx", "dropped", "contract_ok"):
            row[k] = sum(r[k] for r in rs)
        for k in ("req_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms"):
            row[k] = statistics.median(r[k] for r in rs)
        row["per_round"] = [{k: r[k] for k in ("req_per_s", "p50_ms", "p99_ms")} for r in rs]
        out.append(row)
    return out


def report(results: list[dict]) -> None:
    """Ratios to the first configuration and issue 14's targets, per configuration."""
    base = {r["clients"]: r for r in results if r["config"] == results[0]["config"]}
    for r in results:
        # Request i carries seed i in every configuration, so at temperature > 0 the model's own
        # sampled slips recur identically; the serving path must not add any.
        first = base.get(r["clients"], r)
        within = r["contract_ok"] == r["requests"] or r["contract_ok"] >= first["contract_ok"] > 0
        line = f"{r['config']}, {r['clients']} clients: {r['req_per_s']:.0f} req/s"
        if r["clients"] in base:
            line += (f" = {r['req_per_s'] / base[r['clients']]['req_per_s']:.2f}x the first configuration, p99 "
                     f"{r['p99_ms']:.1f} ms = {r['p99_ms'] / base[r['clients']]['p99_ms']:.2f}x its p99")
        if r["clients"] == 8:
            line += f"; p50 {r['p50_ms']:.1f} ms (target <= 5)"
        if r["clients"] == 32:
            line += f"; p99/p50 {r['p99_ms'] / r['p50_ms']:.1f} (target <= 4)"
        kept = f"{r['contract_ok']}/{r['requests']} replies within the contract"
        print(line + f"; {kept} ({'ok' if within else 'NO'}: all, or as many as the first configuration's, same seeds)")


if __name__ == "__main__":
    main()
