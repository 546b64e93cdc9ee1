"""The warm server for stage commands (barkgpt/warm.py): `dvc repro` forks every stage from one
process that imported torch, MLflow and Great Expectations once, with the same results as fresh
processes. Each test gets its own runtime folder (XDG_RUNTIME_DIR), so its servers are its own."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from barkgpt import warm
from barkgpt.pipelines import REGISTRY
from tests.conftest import ROOT, copy_worktree

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the warm server is Linux-only (fork)")


def warm_env(runtime: Path, project: Path, **extra: str) -> dict:
    return {**os.environ, "BARKGPT_WARM": "1", "BARKGPT_WARM_IDLE": "120", "XDG_RUNTIME_DIR": str(runtime),
            "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(project), "GX_ANALYTICS_ENABLED": "False",
            "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "TQDM_DISABLE": "1", **extra}


def barkgpt(args: list[str], project: Path, env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "barkgpt"), *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=300, **kw)


def sockets(runtime: Path) -> list[Path]:
    return sorted(runtime.glob("barkgpt-warm-*/*.sock"))


def wait_for(predicate, seconds: float = 90.0, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def serve_processes(runtime: Path) -> list[int]:
    folder = next(runtime.glob("barkgpt-warm-*"), None)
    return warm.server_pids(folder) if folder else []


@pytest.fixture
def runtime():
    folder = Path(tempfile.mkdtemp(prefix="bw-"))  # short: a socket's path has at most 107 bytes
    yield folder
    for pid in serve_processes(folder):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)


def test_the_warm_commands_are_the_declared_stages(monkeypatch):
    """The client decides before importing the pipelines, so it keeps its own list: this one."""
    monkeypatch.setenv("BARKGPT_WARM", "1")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert warm.STAGE_COMMANDS == {s.name for p in REGISTRY.values() for s in p.stages}
    assert warm.enabled(["train", "bark"]) and warm.enabled(["--params", "p.yaml", "parity", "bark", "-q"])
    for argv in (["serve"], ["chat"], ["generate"], ["deploy"], ["--params", "train", "serve"], ["train", "-h"]):
        assert not warm.enabled(argv), argv
    monkeypatch.setenv("BARKGPT_WARM", "0")
    assert not warm.enabled(["train", "bark"])


def test_a_bad_warm_setting_is_named_with_its_fix(monkeypatch, capsys):
    monkeypatch.setenv("BARKGPT_WARM", "1")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    for name, value in (("BARKGPT_WARM_MAX", "two"), ("BARKGPT_WARM_IDLE", "-5")):
        monkeypatch.setenv(name, value)
        assert warm.run(["train", "bark"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {name}={value!r} is not a positive") and "unset it" in err
        monkeypatch.delenv(name)


def test_the_server_is_chosen_by_code_environment_and_path_not_by_dvc_stage_or_project(monkeypatch, tmp_path):
    env = dict(os.environ)
    base = warm.fingerprint(environ=env)
    assert warm.fingerprint(environ={**env, "DVC_STAGE": "bark-train", "PWD": "/elsewhere"}) == base
    assert warm.fingerprint(environ={**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}) != base
    assert warm.fingerprint(path=[*sys.path, "/extra"], environ=env) != base
    # `python -m barkgpt` puts the working directory first on sys.path: each command fills in its
    # own, so two project folders pick one server; a checkout's own folder names the code, and stays.
    for project in (tmp_path / "a", tmp_path / "b"):
        project.mkdir()
        monkeypatch.chdir(project)
        assert warm.import_path([str(project), *sys.path[1:]]) == [None, *sys.path[1:]]
        assert warm.import_path(["", *sys.path[1:]]) == [None, *sys.path[1:]]
    checkout = Path(warm.__file__).resolve().parent.parent
    monkeypatch.chdir(checkout)
    assert warm.import_path([str(checkout), *sys.path[1:]]) == [str(checkout), *sys.path[1:]]


def test_a_module_in_the_project_folder_that_a_fresh_process_would_import_is_seen(tmp_path):
    """The forked child has loaded modules a fresh `python -m barkgpt` in that folder would take from
    the folder: then the command runs in its own process."""
    assert "yaml" in sys.modules and warm._shadowed(str(tmp_path)) is None
    (tmp_path / "data").mkdir()  # a plain folder (a namespace portion) shadows no regular package
    (tmp_path / "yaml").mkdir()
    assert warm._shadowed(str(tmp_path)) is None
    (tmp_path / "yaml.py").write_text("")
    assert warm._shadowed(str(tmp_path)) == "yaml"
    assert warm._shadowed(str(Path(warm.__file__).resolve().parent.parent)) is None  # the checkout's own barkgpt


def test_an_edited_source_file_gets_a_new_server(tmp_path):
    code = tmp_path / "barkgpt"
    code.mkdir()
    (code / "model.py").write_text("N_LAYER = 2\n")
    before = warm.fingerprint(package=code)
    assert warm.fingerprint(package=code) == before
    stamp = (code / "model.py").stat().st_mtime_ns
    (code / "model.py").write_text("N_LAYER = 12\n")
    os.utime(code / "model.py", ns=(stamp, stamp))  # the same mtime: the size tells
    assert warm.fingerprint(package=code) != before
    (code / "model.py").write_text("N_LAYER = 2\n")
    os.utime(code / "model.py", ns=(stamp + 1, stamp + 1))  # the same size: the mtime tells
    assert warm.fingerprint(package=code) != before


def test_dvc_repro_forks_every_stage_from_one_server_with_the_results_of_fresh_processes(tmp_path, runtime):
    project = copy_worktree(tmp_path / "project")
    env = warm_env(runtime, project)
    repro = subprocess.run([str(BIN / "dvc"), "repro"], cwd=project, env=env, capture_output=True, text=True,
                           timeout=600)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    for stage in REGISTRY["bark"].stages:
        assert f"Running stage 'bark-{stage.name}'" in repro.stdout
    # One server for the whole run: DVC_STAGE differs per stage, the project folder fills up, and
    # neither picks another server.
    assert len(sockets(runtime)) == 1
    wait_for(lambda: len(serve_processes(runtime)) == 1, 10, "the last stage's child to exit")  # it reported first
    status = subprocess.run([str(BIN / "dvc"), "status", "dvc.yaml"], cwd=project, env=env, capture_output=True, text=True)
    assert "changed" not in status.stdout, status.stdout

    # The client of a warm command imports neither torch nor MLflow: the forked child had them.
    client = subprocess.run([sys.executable, "-X", "importtime", str(BIN / "barkgpt"), "tokenize", "bark"],
                            cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert client.returncode == 0 and "train:" in client.stdout, client.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in client.stderr.splitlines() if "import time:" in line}
    assert "barkgpt.warm" in imported and not imported & {"torch", "mlflow", "great_expectations"}, (
        [line for line in client.stderr.splitlines() if "import time:" not in line][-5:],
        warm.servers(next(runtime.glob("barkgpt-warm-*"))), os.listdir(next(runtime.glob("barkgpt-warm-*"))))

    # The same training in a fresh process (warm off) gives the same weights, bit for bit.
    cold = tmp_path / "cold"
    shutil.copytree(project, cold, ignore=shutil.ignore_patterns("models", "runs", "mlruns", "mlflow.db", "exports"))
    out = barkgpt(["train", "bark", "--quiet"], cold, {**warm_env(runtime, cold), "BARKGPT_WARM": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    warm_state = torch.load(project / "models/bark/best.pt", weights_only=False)["model"]
    cold_state = torch.load(cold / "models/bark/best.pt", weights_only=False)["model"]
    assert warm_state.keys() == cold_state.keys()
    assert all(torch.equal(warm_state[k], cold_state[k]) for k in warm_state)


def start_server(project: Path, env: dict, ready: bool = True) -> None:
    """The first stage command starts the server (and runs in-process); wait until it listens and,
    if `ready`, has imported everything (on a busy machine a command's own imports would otherwise
    race the server's)."""
    first = barkgpt(["data", "bark"], project, env)
    assert first.returncode == 0, first.stderr
    runtime = Path(env["XDG_RUNTIME_DIR"])
    wait_for(lambda: sockets(runtime), what="the warm server's socket")
    if ready:
        wait_for(lambda: any(s["preloaded"] == s["of"] for s in warm.servers(next(runtime.glob("barkgpt-warm-*")))),
                 300, "the server's imports")


def small_project(tmp_path: Path, overrides: dict, name: str = "project") -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["bark"]["data"].update(train_conversations=300, val_conversations=60)
    for key, value in overrides.items():
        raw["bark"]["train"][key] = value
    project = tmp_path / name
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    return project


def test_errors_exit_codes_and_output_pass_through(tmp_path, runtime):
    project = small_project(tmp_path, {})
    env = warm_env(runtime, ROOT)
    start_server(project, env)
    ok = barkgpt(["tokenize", "bark"], project, env)
    assert ok.returncode == 0 and "train:" in ok.stdout
    missing = barkgpt(["--params", "nowhere.yaml", "train", "bark"], project, env)
    assert missing.returncode == 2 and "error:" in missing.stderr and "nowhere.yaml" in missing.stderr
    assert "Traceback" not in missing.stderr
    usage = barkgpt(["train", "no-such-pipeline"], project, env)
    assert usage.returncode == 2 and "invalid choice" in usage.stderr


def ctrl_c(proc: subprocess.Popen) -> str:
    """What a terminal's Ctrl-C sends the foreground job; the stage's stderr once it exited."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        return "still running 60 s after Ctrl-C: " + proc.communicate()[1]


def ignores_sigint(pid: int) -> bool:
    mask = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask.split()[1], 16) & (1 << (signal.SIGINT - 1)))


def process_state(pid: int) -> str:
    """R, S, T (stopped), ... from /proc/<pid>/stat."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_ctrl_c_and_ctrl_z_reach_the_stage_and_a_killed_client_takes_its_stage_down(tmp_path, runtime):
    project = small_project(tmp_path, {"max_steps": 1_000_000, "log_every": 1, "checkpoint_every": 10})
    env = warm_env(runtime, ROOT)
    start_server(project, env)
    assert barkgpt(["tokenize", "bark"], project, env).returncode == 0
    wait_for(lambda: len(serve_processes(runtime)) == 1, 10, "tokenize's child to exit")
    server = serve_processes(runtime)

    def long_training(sigint=signal.SIG_DFL) -> tuple[subprocess.Popen, int]:
        """`barkgpt train bark` as a job of a shell, and the pid of its stage once it trains (past
        MLflow's set-up: a Ctrl-C there is another test's, in test_tracking.py)."""
        # Its own process group, as a shell gives a job: a stop signal to an orphaned group is discarded.
        # Ctrl-C as a foreground job has it, or ignored as a background job of a script has it,
        # whatever pytest has: set by a small exec wrapper, as preexec_fn is unsafe in a threaded pytest.
        wrapper = ("import os, signal, sys; signal.signal(signal.SIGINT, getattr(signal, sys.argv[1])); "
                   "os.execv(sys.argv[2], sys.argv[2:])")
        proc = subprocess.Popen([sys.executable, "-c", wrapper, sigint.name, str(BIN / "barkgpt"), "train", "bark",
                                 "--quiet"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, process_group=0)
        before = set(runs())

        def training() -> bool:
            assert proc.poll() is None, f"train exited {proc.returncode}: {proc.communicate()[1][-3000:]}"
            return len(serve_processes(runtime)) == 2 and any((run / "last.pt").exists() for run in set(runs()) - before)

        # Minutes on a busy 2-core machine (MLflow's store, then 10 steps): the wait ends when it trains.
        wait_for(training, 300, "the forked stage to train (a checkpoint in a new run folder)")
        (child,) = set(serve_processes(runtime)) - set(server)
        return proc, child

    def runs() -> list[Path]:
        return list(project.glob("runs/bark/*/"))

    proc, child = long_training()
    proc.send_signal(signal.SIGTSTP)  # what a terminal's Ctrl-Z sends the foreground job
    wait_for(lambda: process_state(child) == "T" and process_state(proc.pid) == "T", 10, "stage and client to stop")
    proc.send_signal(signal.SIGCONT)  # what the shell's `fg` sends
    wait_for(lambda: process_state(child) != "T" and process_state(proc.pid) != "T", 10, "both to continue")
    err = ctrl_c(proc)
    assert proc.returncode == 130 and "interrupted" in err, err[-2000:]
    wait_for(lambda: serve_processes(runtime) == server, 30, "the stage to end")

    # A client that ignores Ctrl-C (started in the background) gets a stage that ignores it too,
    # whatever the command that started the server had.
    proc, child = long_training(signal.SIG_IGN)
    assert ignores_sigint(child)
    proc.kill()
    proc.wait()
    wait_for(lambda: serve_processes(runtime) == server, 30, "the orphaned stage to stop")

    proc, child = long_training()
    assert not ignores_sigint(child)
    proc.kill()  # no chance to forward anything: the child notices its client is gone
    proc.wait()
    wait_for(lambda: serve_processes(runtime) == server, 30, "the orphaned stage to stop")


def test_an_idle_server_exits_and_removes_its_socket(tmp_path, runtime):
    project = small_project(tmp_path, {})
    env = {**warm_env(runtime, ROOT), "BARKGPT_WARM_IDLE": "1"}
    start_server(project, env, ready=False)
    wait_for(lambda: not sockets(runtime) and not serve_processes(runtime), 90, "the idle server to exit")
    assert not any(runtime.glob("barkgpt-warm-*/*.lock"))


def test_ten_project_folders_share_one_server_that_keeps_none_busy(tmp_path, runtime):
    """`python -m barkgpt <stage>` in 10 project folders (each folder first on its sys.path, as
    scripts/bad_inputs.py runs it): one server afterwards, sitting in /, its memory shown by
    `status`, announced once. A new setup beyond BARKGPT_WARM_MAX stops the least recently used."""
    env = warm_env(runtime, ROOT)
    outs = []
    for i in range(10):
        project = small_project(tmp_path, {}, f"p{i}")
        outs.append(subprocess.run([sys.executable, "-m", "barkgpt", "data", "bark"], cwd=project, env=env,
                                   capture_output=True, text=True, timeout=300))
        assert outs[-1].returncode == 0 and (project / "data/bark/train.txt").exists(), outs[-1].stderr[-2000:]
    folder = next(runtime.glob("barkgpt-warm-*"))
    wait_for(lambda: len(serve_processes(runtime)) == 1, 30, "the last command's child to exit")
    (server,) = warm.servers(folder)
    assert Path(f"/proc/{server['pid']}/cwd").resolve() == Path("/")
    assert [i for i, out in enumerate(outs) if "started a warm server" in out.stderr] == [0]
    status = subprocess.run([sys.executable, "-m", "barkgpt.warm", "status"], env=env, capture_output=True, text=True)
    assert status.returncode == 0 and f"pid {server['pid']}: " in status.stdout, status.stdout + status.stderr
    resident = int(status.stdout.split(f"pid {server['pid']}: ")[1].split(" MiB resident")[0].rsplit(" ", 1)[1])
    assert resident * 1024 == pytest.approx(warm.memory_kib(server["pid"])["rss"], rel=0.5) and resident > 50

    # A folder holding a module the server has loaded: the command runs in a fresh process, which
    # imports the folder's module, exactly as without a server.
    shadowing = small_project(tmp_path, {}, "shadowing")
    (shadowing / "yaml.py").write_text("import sys\nprint('the project folder\\'s yaml.py', file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-m", "barkgpt", "data", "bark"], cwd=shadowing, env=env,
                         capture_output=True, text=True, timeout=300)
    assert "the project folder's yaml.py" in out.stderr

    # Another setup (an exported variable) with room for one server: the old one goes.
    other = barkgpt(["data", "bark"], tmp_path / "p0", {**env, "BARKGPT_WARM_MAX": "1", "BARKGPT_TEST_SETUP": "1"})
    assert other.returncode == 0 and "started a warm server" not in other.stderr, other.stderr[-2000:]
    wait_for(lambda: [s["pid"] for s in warm.servers(folder)] not in ([], [server["pid"]])
             and len(warm.servers(folder)) == 1, 60, "the new server to replace the old one")


def test_a_server_whose_code_was_edited_exits(tmp_path, runtime):
    """No command picks a server again once its code changed: it goes at once, not after its idle time."""
    code = tmp_path / "code"
    shutil.copytree(ROOT / "barkgpt", code / "barkgpt", ignore=shutil.ignore_patterns("__pycache__"))
    project = small_project(tmp_path, {})
    start_server(project, warm_env(runtime, code), ready=False)
    (server,) = warm.servers(next(runtime.glob("barkgpt-warm-*")))
    with open(code / "barkgpt/errors.py", "a") as f:
        f.write("# an edit\n")
    wait_for(lambda: not serve_processes(runtime), 60, "the stale server to exit")
    assert not sockets(runtime)
