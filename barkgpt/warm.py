"""A warm process for stage commands: `barkgpt <stage> ...` forks from it instead of importing
torch, MLflow and Great Expectations all over again.

`dvc repro` runs each stage as its own process, and each one used to spend 1 to 4 seconds
importing the same libraries (about 22 of the bark pipeline's 36 seconds). Mercurial's `chg` and
PyTorch's DataLoader workers show the way out: keep one process that has done the imports, and
fork it per command. The first stage command starts the server in the background and runs
in-process itself. The server imports the heavy modules one at a time, in the order the stages
need them, and between two imports it forks for any command that is waiting. The next commands
connect over a Unix socket, hand over their argv, working directory, environment and
stdin/stdout/stderr (as file descriptors), and relay signals and the exit code. The forked child
runs `barkgpt.cli.main` exactly as a fresh process would, and imports whatever is not loaded yet.

A server serves one exact setup: its socket's name is a hash of the Python executable, `sys.path`,
the environment, and the size and mtime of every barkgpt source file and site-packages folder. Change
any of them (edit the code, install a package, export a variable) and the next command starts a
new server; the old one exits after `BARKGPT_WARM_IDLE` seconds (default 300) without a command.

On by default on Linux for the stage commands only (not serve, chat or the others). Off with
`BARKGPT_WARM=0`, on other systems (fork is unsafe after some macOS frameworks load), and under
torchrun. `python -m barkgpt.warm stop` stops this user's servers.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# The commands that fork from the server: the pipeline stages. tests/test_warm.py checks that this
# is every stage the pipelines declare (the client must decide before importing them).
STAGE_COMMANDS = frozenset({"data", "ingest", "validate", "tokenizer", "tokenize", "validate-tokens", "train",
                            "evaluate", "export", "quantize", "parity"})
# What the server imports, one module at a time between commands, in the order the bark and
# WebText stages first need them (Great Expectations for the validate stages comes first).
PRELOAD = ("great_expectations", "torch", "torch._dynamo", "mlflow", "mlflow.store.tracking.sqlalchemy_store",
           "mlflow.store.model_registry.sqlalchemy_store", "llama_cpp", "gguf", "tiktoken", "tokenizers",
           "barkgpt.cli", "barkgpt.stages", "barkgpt.pipelines", "barkgpt.validation", "barkgpt.train",
           "barkgpt.tracking.runs", "barkgpt.tracking.registry", "barkgpt.evaluate", "barkgpt.export.pipeline",
           "barkgpt.export.quantize", "barkgpt.export.parity")
# Variables that change between commands without changing what the imports do (the child still
# gets them: only the choice of server ignores them).
# MLFLOW_RUN_ID: the run a sweep hands each trial's training (barkgpt/sweep/trial.py).
VOLATILE_ENV = frozenset({"PWD", "OLDPWD", "SHLVL", "_", "COLUMNS", "LINES", "MLFLOW_RUN_ID"})
VOLATILE_PREFIXES = ("DVC_",)  # DVC_STAGE, DVC_ROOT: per stage and per repository
DEFAULT_IDLE_S = 300.0
START_TIMEOUT_S = 120.0  # from connecting to the child's pid: the server may be finishing an import
MAX_FOLDER_CHARS = 64  # a Unix socket's path has at most 107 bytes: the folder, a 24-character key, ".sock.<pid>"
_HEADER = struct.Struct("!I")
_in_server = False  # set in a forked child: its own cli.main must not connect again


def enabled(argv: list[str]) -> bool:
    rest = list(argv)
    if "--params" in rest:  # `--params FILE` would put FILE first among the non-options
        i = rest.index("--params")
        del rest[i:i + 2]
    command = next((a for a in rest if not a.startswith("-")), None)
    return (not _in_server and os.environ.get("BARKGPT_WARM", "1") != "0" and sys.platform == "linux"
            and command in STAGE_COMMANDS and "TORCHELASTIC_RUN_ID" not in os.environ
            and not any(a in ("-h", "--help", "--version") for a in argv))


def runtime_dir() -> Path | None:
    """A folder only this user can enter, or None (then no warm server)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = Path(base) / f"barkgpt-warm-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.stat()
    except OSError:
        return None
    private = st.st_uid == os.getuid() and not st.st_mode & 0o077
    return path if private and len(str(path)) <= MAX_FOLDER_CHARS else None


def fingerprint(path: list[str] | None = None, environ: dict | None = None, package: Path | None = None) -> str:
    """The setup a server serves: interpreter, import path, environment, code (`package`: this
    barkgpt's folder) and packages."""
    path = list(sys.path if path is None else path)
    environ = dict(os.environ if environ is None else environ)
    kept = sorted((k, v) for k, v in environ.items() if k not in VOLATILE_ENV and not k.startswith(VOLATILE_PREFIXES))
    h = hashlib.sha256(json.dumps([sys.executable, path, kept]).encode())
    for entry in path:  # installing or removing a package changes its site-packages folder's mtime
        if os.path.basename(entry) in ("site-packages", "dist-packages"):  # (not a project folder's:
            try:                                                         # every stage writes there)
                h.update(f"{entry}:{os.stat(entry).st_mtime_ns}".encode())
            except OSError:
                pass
    package = package or Path(__file__).resolve().parent
    for file in sorted(package.rglob("*.py")):
        st = file.stat()
        h.update(f"{file}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _send(conn: socket.socket, payload: dict, fds: list[int] = ()) -> None:
    data = json.dumps(payload).encode()
    conn.sendmsg([_HEADER.pack(len(data))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
                 if fds else [])
    conn.sendall(data)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 8)
    if len(header) != _HEADER.size:
        raise ConnectionError("short header")
    size, data = _HEADER.unpack(header)[0], b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("short request")
        data += chunk
    return json.loads(data), fds


# --- the client: the `barkgpt` command ---------------------------------------------------------

def run(argv: list[str]) -> int | None:
    """Run `barkgpt ARGV` in a forked child of a warm server and return its exit code; None when
    there is no server ready (one is started for the next command) or warm mode is off."""
    if not enabled(argv):
        return None
    folder = runtime_dir()
    if folder is None:
        return None
    key = fingerprint()
    sock_path = folder / f"{key}.sock"
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(sock_path))
    except OSError:
        conn.close()
        _start_server(folder, key)
        return None
    with conn:
        try:
            # Ctrl-C as this process has it: a job started in the background by a shell ignores it
            sigint_ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            _send(conn, {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                         "sigint_ignored": sigint_ignored}, [0, 1, 2])
            conn.settimeout(START_TIMEOUT_S)  # a server stuck mid-import must not hang the command
            reader = conn.makefile("rb")
            line = reader.readline()
        except OSError:
            return None  # nothing started (a child that finds us gone exits before it runs): run here
        if not line.startswith(b"pid "):
            return None
        conn.settimeout(None)  # the command itself may take as long as it takes
        return _relay(int(line.split()[1]), reader)


def _relay(pid: int, reader) -> int:
    """Pass the signals a terminal or DVC sends this process on to the child; wait for its exit."""
    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def suspend(_signum, _frame):
        # Ctrl-Z: the terminal stops only this process (the child is in the server's session), so
        # stop the child too, then this process; `fg` or `bg` continues both.
        forward(signal.SIGSTOP, None)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # returns on SIGCONT
        signal.signal(signal.SIGTSTP, suspend)
        forward(signal.SIGCONT, None)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, forward)
    signal.signal(signal.SIGTSTP, suspend)
    line = reader.readline()
    if line.startswith(b"exit "):
        return int(line.split()[1])
    print(f"error: the stage process (pid {pid}) ended without an exit status (killed?); run the command "
          "again, or with BARKGPT_WARM=0 to run it in this process", file=sys.stderr)
    return 1


def _start_server(folder: Path, key: str) -> None:
    lock = folder / f"{key}.lock"
    try:
        import fcntl

        with open(lock, "a") as held:  # a server holds this lock from start to exit
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # one is starting already
    import subprocess

    idle = os.environ.get("BARKGPT_WARM_IDLE", str(DEFAULT_IDLE_S))
    with open(folder / f"{key}.log", "w") as log:
        subprocess.Popen([sys.executable, "-m", "barkgpt.warm_server", str(folder / f"{key}.sock"), idle,
                          json.dumps(sys.path)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                         start_new_session=True, close_fds=True)


# --- the server --------------------------------------------------------------------------------

def serve(sock_path: Path, idle_s: float, entry: Callable[[list[str]], int]) -> int:
    """Serve commands on `sock_path` until idle: each runs `entry(argv)` (barkgpt.cli.main) in a
    forked child. Started by `python -m barkgpt.warm_server`."""
    import fcntl
    import importlib

    lock = open(sock_path.with_suffix(".lock"), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another server has this key
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = sock_path.with_name(f"{sock_path.name}.{os.getpid()}")
    listener.bind(str(staging))
    listener.listen(64)
    os.replace(staging, sock_path)  # clients may connect from now on; they wait while a module imports
    ours = sock_path.stat().st_ino
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    pending = list(PRELOAD)
    try:
        while True:
            # A waiting command first; else the next import; else wait for a command until idle.
            # Imports and forks take turns in this one thread, so no fork happens mid-import.
            listener.settimeout(0 if pending else idle_s)
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, TimeoutError):
                if not pending:
                    return 0
                name = pending.pop(0)
                try:
                    importlib.import_module(name)
                except Exception as err:  # an optional engine missing: its stages import it themselves
                    print(f"preload {name}: {err}", file=sys.stderr)
                continue
            conn.setblocking(True)
            if os.fork() == 0:
                listener.close()
                lock.close()
                os._exit(_child(conn, entry))
            conn.close()
    finally:
        try:
            if sock_path.stat().st_ino == ours:
                sock_path.unlink()
        except OSError:
            pass
        for leftover in (sock_path.with_suffix(".lock"), sock_path.with_suffix(".log")):
            leftover.unlink(missing_ok=True)  # still locked by us: no other server owns these


def _child(conn: socket.socket, entry: Callable[[list[str]], int]) -> int:
    global _in_server
    import atexit
    import threading
    import traceback

    _in_server = True
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # subprocesses of the stage are waited for as usual
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        request, fds = _receive(conn)
    except (OSError, ValueError):
        return 1
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
        os.close(fd)
    # Ctrl-C as the client has it, not as whichever command started the server had it.
    signal.signal(signal.SIGINT, signal.SIG_IGN if request.get("sigint_ignored") else signal.default_int_handler)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["barkgpt", *request["argv"]]
    sys.stdout.reconfigure(line_buffering=os.isatty(1))
    try:
        conn.sendall(f"pid {os.getpid()}\n".encode())
    except OSError:
        return 1  # the client gave up waiting and runs the command itself: not here too

    def watch_client():  # the client gone (killed with its process group): stop, as its child would
        try:
            conn.recv(1)
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch_client, daemon=True).start()
    try:
        code = entry(request["argv"])
    except SystemExit as exit_:  # argparse's usage errors; sys.exit("message") prints and exits 1
        code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        try:
            conn.sendall(f"exit {code}\n".encode())
        except OSError:
            pass
    return code


def stop() -> int:
    """Stop this user's warm servers; each exits on SIGTERM and removes its socket."""
    folder = runtime_dir()
    found = server_pids(folder) if folder else []
    pids = [pid for pid in found if _parent(pid) not in found]  # not the stage commands running now
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    print(f"stopped {len(pids)} warm server(s)" + (f" in {folder}" if folder else ""))
    return 0


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def server_pids(folder: Path) -> list[int]:
    """This user's servers with a socket in `folder`, and their forked children (the same command line)."""
    pids, prefix = [], str(folder).encode() + b"/"
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.stat().st_uid != os.getuid():
                continue
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd[1:3] == [b"-m", b"barkgpt.warm_server"] and cmd[3].startswith(prefix):
            pids.append(int(proc.name))
    return pids


if __name__ == "__main__":
    if sys.argv[1:] != ["stop"]:
        print("usage: python -m barkgpt.warm stop", file=sys.stderr)
        sys.exit(2)
    sys.exit(stop())
