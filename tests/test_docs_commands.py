"""Every command in the README's and docs' fenced code blocks, run as written on a fresh copy.

Each command is matched against RULES, which say how it runs:
  run         as written, in the project copy; must exit 0
  server      started in the background as written; the port it names must answer; later
              commands of the same document (curl, clients) talk to it; stopped at the document's end
  input       run as written with an empty line on stdin (an interactive program that quits on it)
  env         `export`/`source` lines: applied to the environment of the commands after them
  expensive   minutes of work (a 300 s training, benchmarks, the whole suite): skipped unless
              BARKGPT_DOCS_EXPENSIVE=1, each naming the test that already covers it
  server-check  started, checked to listen, stopped (the server before it on that port comes back)
  skip        cannot run here, with the reason (real AWS, docker, a placeholder to fill in)
  known-broken  a documented command that fails today, naming the issue that fixes it
A command that matches no rule fails the test: a new documented command must be classified.
Python blocks run as scripts unless their rule says otherwise. One fresh copy of the project is
shared by all documents, which run in order (README first); `dvc repro` in the README trains it.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, copy_worktree
from barkgpt.net import free_port

BIN = Path(sys.executable).parent
DOCS = ["README.md", "docs/orchestration.md", "docs/export.md", "docs/serving.md", "docs/deploy.md",
        "docs/webtext.md", "docs/evaluation.md", "docs/scaling.md", "docs/experiments.md", "docs/team.md"]
# Fenced blocks run as written by another test, which needs them in its own setting: (document,
# index of the block in it) -> that test. docs/team.md's first block starts the team stack and runs
# the flow through it; tests/test_stack.py runs it line by line as machine A (one stack, one flow).
RUN_ELSEWHERE = {("docs/team.md", 0): "tests/test_stack.py runs this block as written (machine A, on its stack)"}
# Single commands run as written by another test: (document, the command's start) -> that test.
RUN_ELSEWHERE_COMMANDS = {
    ("README.md", "barkgpt sweep bark "): "tests/test_sweep.py runs it as written (plus --study) and checks the four trials",
    ("README.md", "dvc exp show --only-changed"): "tests/test_sweep.py runs it after the README's sweep and checks its columns",
}
EXPENSIVE = os.environ.get("BARKGPT_DOCS_EXPENSIVE") == "1"
COMMAND_TIMEOUT_S = 900
pytestmark = pytest.mark.timeout(2400)  # a document's commands in sequence (the README trains a model)

# (regex on the command, kind, reason). First match wins.
RULES: list[tuple[str, str, str]] = [
    (r"^make (run|test)\b", "expensive", "install + the whole flow / suite: make test runs this test; "
                                          "tests/test_orchestration.py runs the flow"),
    (r"^(pip install|apt-get install)", "skip", "installs packages (a registry): done once by make install-dev"),
    (r"^pytest ", "expensive", "runs test files of this suite"),
    (r"^export (MLFLOW_TRACKING_URI=http://tracking\.example|AWS_REGION=eu-west-1 AWS_PROFILE=)", "skip",
     "another machine's placeholders (docs/team.md); tests/test_stack.py runs a second clone"),
    (r"^dvc remote default --local team && dvc pull dvc\.yaml$", "skip",
     "pulls from the placeholder hosts above; tests/test_stack.py pulls from the stack's S3"),
    (r"^(source|export|eval) ", "env", ""),
    (r"^(TAG|REPO)=", "skip", "real AWS: builds and pushes the Lambda image to ECR"),
    (r"^(aws|docker) ", "skip", "real AWS or docker: not reachable offline"),
    (r"^moto_server -H 127\.0\.0\.1 -p 9000 &$", "server", "9000"),
    (r"^dvc remote default --local team$", "run", ""),
    (r"^python -m barkgpt\.stack buckets ", "run", ""),
    (r"^dvc exp run -S bark\.train\.max_steps=500", "expensive",
     "retrains 500 steps and re-runs every later stage (~1 min idle); tests/test_dvc_remote.py runs dvc repro"),
    (r"^git clone <repo>", "skip", "a placeholder (<repo>); tests/test_dvc_remote.py clones and pulls"),
    (r"^dvc remote modify --local local url /path/to/", "skip", "a placeholder path"),
    (r"^prefect work-pool create \S+ --type (docker|kubernetes)", "skip",
     "Docker or Kubernetes and their Prefect plugins (not installed here)"),
    (r"^prefect (server start|worker start)", "expensive", "a Prefect server and worker: tests/test_orchestration.py"),
    (r"^prefect (work-pool|--no-prompt deploy|deployment run)", "expensive",
     "needs the Prefect server above: tests/test_orchestration.py runs these"),
    (r"^python -m flows\.", "expensive", "the whole flow (~1 min): tests/test_orchestration.py runs it"),
    (r"^python benchmarks/", "expensive", "benchmarks: minutes each, on an idle machine"),
    (r"^bash benchmarks/gpu_checks\.sh", "skip", "needs a CUDA GPU (tests/test_cuda.py skips without one)"),
    (r"^torchrun .*--nproc-per-node 8", "skip", "8 GPUs; tests/test_scale.py runs torchrun with 2 CPU processes"),
    (r"^dvc repro pipelines/webtext/dvc\.yaml", "expensive", "a 300 s WebText-2 training: tests/test_webtext.py"),
    (r"^dvc plots show reports/webtext", "expensive", "needs the WebText-2 training above"),
    (r"^cat reports/webtext/", "expensive", "needs the WebText-2 training above"),
    (r"^barkgpt (train|evaluate) webtext|^barkgpt generate --pipeline webtext", "expensive",
     "a 300 s WebText-2 training: tests/test_webtext.py"),
    (r"^barkgpt serve --model path/to/", "skip", "a placeholder for any chat GGUF"),
    (r"^barkgpt serve --model ~/.cache/gemma", "expensive", "assembles and serves a 250 MB model: tests/test_serve.py"),
    (r"^python -c \"import gemma3", "expensive", "assembles a 250 MB model: tests/test_serve.py"),
    (r"^barkgpt sweep webtext", "skip", "a team's servers (placeholder hosts above) or a space file to write "
                                       "first; tests/test_sweep.py runs sweeps through the CLI and the flow"),
    (r"^barkgpt sweep \S+ --(grid|space)", "expensive", "trains several models (a minute or more): "
                                                        "tests/test_sweep.py runs sweeps through the CLI and the flow"),
    (r"^dvc exp apply ", "expensive", "applies a trial of the sweep above: tests/test_sweep.py runs the sweep"),
    (r"^git add params\.yaml dvc\.lock", "expensive", "commits the sweep trial applied above"),
    (r"^dvc exp show\b", "run", ""),
    (r"^optuna-dashboard ", "expensive", "shows the study a sweep above wrote (optuna.db): tests/test_sweep.py "
                                        "runs sweeps; the screenshot in docs/experiments.md was taken of one"),
    (r"^barkgpt serve --backend torch", "server-check", "8000"),
    (r"^mlflow server ", "server", "5000"),
    (r"^mlflow ui ", "server", "5000"),
    (r"^barkgpt serve\b", "server", "8000"),
    (r"^python -m llama_cpp\.server ", "server", "8080"),
    (r"^barkgpt chat\b", "input", ""),
    (r"^curl .*\$BARKGPT_API_KEY", "skip", "needs a server started with an API key"),
    (r"^curl ", "run", ""),
    (r"^dvc (repro|metrics show|plots show|exp run|push|pull|gc|status)\b", "run", ""),
    (r"^barkgpt ", "run", ""),
    (r"^sed -i ", "run", ""),
    (r"^cat ", "run", ""),
    (r"^python -c ", "run", ""),
    # python blocks, by their first line
    (r"^PYTHON from langchain_openai", "skip", "top-level `await` (an excerpt); tests/test_chat.py runs it"),
    (r"^PYTHON from barkgpt\.chat\.agent", "skip", "an excerpt using ChatBarkGPT from the block before; "
                                                    "tests/test_chat.py runs it"),
    (r"^PYTHON from barkgpt\.serve\.app", "skip", "needs mangum's Lambda event loop; "
                                                   "tests/test_serve.py::test_create_app_from_env_under_mangum"),
    (r"^PYTHON ", "run", ""),
]
# A command that ends with this comment needs the server started before it in the same document.
NEEDS_SERVER = "# needs: server"


@dataclass
class Command:
    doc: str
    line: int
    text: str
    python: bool = False
    block: int = 0  # which fenced block of the document it is in


def strip_comment(line: str) -> str:
    """The command without a trailing `# comment` (a # inside quotes stays)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def commands(doc: str) -> list[Command]:
    text = (ROOT / doc).read_text()
    out = []
    for block, m in enumerate(re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.M | re.S)):
        lang, body, line = m.group(1), m.group(2), text[: m.start()].count("\n") + 2
        if lang == "python":
            out.append(Command(doc, line, body, python=True, block=block))
        elif lang in ("bash", "sh"):
            cur, start = "", line
            for i, raw in enumerate(body.splitlines()):
                if not cur:
                    start = line + i
                    if not raw.strip() or raw.strip().startswith("#"):
                        continue
                cur = f"{cur}\n{raw}" if cur else raw.strip()
                if cur.endswith("\\"):
                    continue
                if cur.count('"') % 2 or cur.count("'") % 2:  # a quoted argument spanning lines
                    continue
                out.append(Command(doc, start, cur, block=block))
                cur = ""
    return out


def rule_for(cmd: Command) -> tuple[str, str]:
    if (cmd.doc, cmd.block) in RUN_ELSEWHERE:
        return "elsewhere", RUN_ELSEWHERE[cmd.doc, cmd.block]
    for (doc, start), reason in RUN_ELSEWHERE_COMMANDS.items():
        if cmd.doc == doc and strip_comment(cmd.text).startswith(start):
            return "elsewhere", reason
    key = ("PYTHON " + cmd.text.strip().splitlines()[0]) if cmd.python else strip_comment(cmd.text)
    for pattern, kind, reason in RULES:
        if re.search(pattern, key):
            return kind, reason
    return "unclassified", ""


def all_commands() -> list[Command]:
    return [c for doc in DOCS for c in commands(doc)]


def test_every_documented_command_is_classified():
    unknown = [f"{c.doc}:{c.line}: {c.text.splitlines()[0]}" for c in all_commands() if rule_for(c)[0] == "unclassified"]
    assert not unknown, "documented commands no rule covers (add one to RULES):\n" + "\n".join(unknown)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def fresh_project(tmp_path_factory) -> Path:
    """The working tree's tracked and unignored files, copied, as a new git repo (for dvc exp run)."""
    base = tmp_path_factory.mktemp("docs")
    root = copy_worktree(base / "project")
    if (ROOT.parent / "shared").exists():
        (base / "shared").symlink_to((ROOT.parent / "shared").resolve())  # ../shared as in a checkout
    # .dvc/offline-plots.html is committed (a clone draws plots offline); config.local is not
    if (ROOT / ".dvc/config.local").exists():
        shutil.copy2(ROOT / ".dvc/config.local", root / ".dvc/config.local")
    return root


class Servers:
    """Servers on their documented ports; where another process (the machine is shared) holds one,
    on a free port instead, and the commands after it are rewritten to that port."""

    def __init__(self):
        self.procs: dict[int, subprocess.Popen] = {}
        self.commands: dict[int, str] = {}
        self.moved: dict[int, int] = {}  # documented port -> the port used

    def rewrite(self, text: str) -> str:
        for doc, real in self.moved.items():
            text = re.sub(rf"(?<=[:\s]){doc}\b", str(real), text)
            if doc == 8000 and text.startswith("barkgpt chat") and "--url" not in text:
                text += f" --url http://127.0.0.1:{real}"
        return text

    def start(self, cmd: str, port: int, cwd: Path, env: dict, log: Path) -> None:
        self.stop(port)
        self.moved.pop(port, None)
        if port_open(port):  # not ours: another process on this shared machine
            real = free_port()
            self.moved[port] = real
            cmd = self.rewrite(cmd) if re.search(rf"[:\s]{port}\b", cmd) else f"{cmd} --port {real}"
            port_used = real
        else:
            port_used = port
        proc = subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=cwd, env=env, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while not port_open(port_used):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop_proc(proc)
                pytest.fail(f"`{cmd}` did not listen on {port_used}: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        self.procs[port], self.commands[port] = proc, cmd

    @staticmethod
    def stop_proc(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the session this test started
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def stop(self, port: int | None = None) -> None:
        for p in [port] if port is not None else list(self.procs):
            proc = self.procs.pop(p, None)
            if proc is not None:
                self.stop_proc(proc)


def run_command(argv: list[str], cwd: Path, env: dict, stdin: str | None) -> subprocess.CompletedProcess:
    """Run in its own session; on a time-out the whole group goes (a `dvc repro` left behind would
    hold DVC's lock against every later command)."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n(killed after {COMMAND_TIMEOUT_S} s)"
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def apply_env(line: str, env: dict, cwd: Path) -> None:
    if line.startswith("source "):
        return  # .venv/bin/activate: this test already runs with the venv's PATH
    out = subprocess.run(["bash", "-c", f"{line} && env -0"], cwd=cwd, env=env, capture_output=True, check=True)
    env.clear()
    env.update(dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item))


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_work(doc, fresh_project, tmp_path):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "TQDM_DISABLE": "1", "GX_ANALYTICS_ENABLED": "False",
           "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(fresh_project)}
    env.pop("MLFLOW_TRACKING_URI", None)
    servers, ran, skipped, failures = Servers(), [], [], []
    try:
        for cmd in commands(doc):
            kind, reason = rule_for(cmd)
            where = f"{cmd.doc}:{cmd.line}"
            text = cmd.text if cmd.python else strip_comment(cmd.text)
            if kind == "expensive" and EXPENSIVE:
                kind = "server" if re.match(r"^(prefect server start|prefect worker start)", text) else "run"
            if kind in ("skip", "expensive", "unclassified", "known-broken", "elsewhere"):
                skipped.append(f"{where}: {text.splitlines()[0]} -- {kind}: {reason}")
                continue
            if kind == "env":
                apply_env(servers.rewrite(text), env, fresh_project)
                continue
            if kind in ("server", "server-check"):
                port, text = int(reason), text.removesuffix("&").strip()
                previous = servers.commands.get(port)
                servers.start(text, port, fresh_project, env, tmp_path / f"server-{port}.log")
                if kind == "server-check":
                    servers.stop(port)
                    if previous:
                        servers.start(previous, port, fresh_project, env, tmp_path / f"server-{port}.log")
                ran.append(where)
                continue
            argv = [sys.executable, "-c", text] if cmd.python else ["bash", "-c", text]
            argv[-1] = servers.rewrite(argv[-1])
            out = run_command(argv, fresh_project, env, "\n" if kind == "input" else None)
            ran.append(where)
            if out.returncode != 0 or (text.startswith("curl ") and not out.stdout.strip()):
                failures.append(f"{where}: `{text.splitlines()[0]}` exited {out.returncode}:\n"
                                f"{out.stdout[-1500:]}\n{out.stderr[-1500:]}")
            elif text.startswith("curl ") and '"error"' in out.stdout:
                failures.append(f"{where}: `{text.splitlines()[0]}` answered an error: {out.stdout[:500]}")
    finally:
        servers.stop()
    print(f"\n{doc}: ran {len(ran)} commands; skipped {len(skipped)}:\n  " + "\n  ".join(skipped))
    assert not failures, "\n\n".join(failures)
