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
new server. The project folder is not part of the setup: it travels with each command, so one
server serves every project (a `sys.path` entry that is only the working directory, as
`python -m` adds, is re-pointed per command). A server sits in `/`, so no project folder stays busy
while it waits, and exits after `BARKGPT_WARM_IDLE` seconds (default 300) with no command running, or
within 10 s of its code being edited (no command would pick it again). At
most `BARKGPT_WARM_MAX` servers (default 2) live per user: a new one stops the least recently used.
The first server a user starts says so on stderr, once.

On by default on Linux for the stage commands only (not serve, chat or the others). Off with
`BARKGPT_WARM=0`, on other systems (fork is unsafe after some macOS frameworks load), and under
torchrun. `python -m barkgpt.warm status` lists this user's servers and their memory;
`python -m barkgpt.warm stop` stops them.
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
DEFAULT_MAX_SERVERS = 2
CHECK_S = 10.0  # how often an idle server checks that its socket and its code are still its own
START_TIMEOUT_S = 120.0  # from connecting to the child's pid: the server may be finishing an import
MAX_FOLDER_CHARS = 64  # a Unix socket's path has at most 107 bytes: the folder, a 24-character key, ".sock.<pid>"
ANNOUNCEMENT = ("barkgpt: started a warm server for stage commands: it keeps torch, MLflow and Great Expectations "
                "imported so the next stages start at once, and exits after {idle:g} s without a command (at most "
                "{max} per user). `python -m barkgpt.warm status` shows its memory, `python -m barkgpt.warm stop` "
                "stops it, BARKGPT_WARM=0 turns it off. (Said once.)")
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


def import_path(path: list[str] | None = None, cwd: str | None = None, package: Path | None = None) -> list:
    """`sys.path` with the entry that is just the working directory (`python -m` and `-c` put it
    first) as None: each command fills in its own, so the project folder picks no server. Kept
    when this barkgpt itself lives there (a checkout): then it names the code."""
    path = list(sys.path if path is None else path)
    cwd = os.path.realpath(cwd or os.getcwd())
    package = package or Path(__file__).resolve().parent
    if str(package.parent) == cwd:
        return path
    return [None if os.path.realpath(entry or ".") == cwd else entry for entry in path]


def fingerprint(path: list | None = None, environ: dict | None = None, package: Path | None = None) -> str:
    """The setup a server serves: interpreter, import path (as `import_path` gives it), environment,
    code (`package`: this barkgpt's folder) and packages; not the working directory."""
    package = package or Path(__file__).resolve().parent
    path = import_path(package=package) if path is None else list(path)
    environ = dict(os.environ if environ is None else environ)
    kept = sorted((k, v) for k, v in environ.items() if k not in VOLATILE_ENV and not k.startswith(VOLATILE_PREFIXES))
    h = hashlib.sha256(json.dumps([sys.executable, path, kept]).encode())
    h.update(code_stamp(path, package).encode())
    return h.hexdigest()[:24]


def code_stamp(path: list, package: Path | None = None) -> str:
    """The code and packages as they are on disk: the size and mtime of every barkgpt source file and
    of each site-packages folder (installing or removing a package changes its mtime; a project
    folder's is not looked at: every stage writes there)."""
    h = hashlib.sha256()
    for entry in path:
        if entry and os.path.basename(entry) in ("site-packages", "dist-packages"):
            try:
                h.update(f"{entry}:{os.stat(entry).st_mtime_ns}".encode())
            except OSError:
                pass
    for file in sorted((package or Path(__file__).resolve().parent).rglob("*.py")):
        try:
            st = file.stat()
        except OSError:
            continue
        h.update(f"{file}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


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
    from barkgpt.errors import BarkError

    try:
        idle_seconds(), max_servers()
    except BarkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    folder = runtime_dir()
    if folder is None:
        return None
    path = import_path()
    key = fingerprint(path)
    sock_path = folder / f"{key}.sock"
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(sock_path))
    except OSError:
        conn.close()
        _start_server(folder, key, path)
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
            return None  # "cold": this folder would shadow a module the server has loaded
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


def idle_seconds() -> float:
    return _setting("BARKGPT_WARM_IDLE", DEFAULT_IDLE_S, float, "number of seconds")


def max_servers() -> int:
    return _setting("BARKGPT_WARM_MAX", DEFAULT_MAX_SERVERS, int, "whole number")


def _setting(name: str, default, kind, what: str):
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        if (value := kind(raw)) > 0:
            return value
    except ValueError:
        pass
    from barkgpt.errors import BarkError

    raise BarkError(f"{name}={raw!r} is not a positive {what}; set it to one (the default is "
                    f"{name}={default:g}) or unset it")


def _start_server(folder: Path, key: str, path: list) -> None:
    lock = folder / f"{key}.lock"
    try:
        import fcntl

        with open(lock, "a") as held:  # a server holds this lock from start to exit
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # one is starting already
    import subprocess

    with open(folder / f"{key}.log", "w") as log:
        # Started from here, it leaves this folder for / at once (serve).
        subprocess.Popen([sys.executable, "-m", "barkgpt.warm_server", str(folder / f"{key}.sock"),
                          str(idle_seconds()), json.dumps(path)], stdin=subprocess.DEVNULL, stdout=log,
                         stderr=log, start_new_session=True, close_fds=True)
    _announce_once(folder)


def _announce_once(folder: Path) -> None:
    """Tell the user, the first time only, that a process now stays behind, and how to see and stop it."""
    try:
        os.close(os.open(folder / "announced", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        return  # said before (or the folder is gone: nothing was started)
    print(ANNOUNCEMENT.format(idle=idle_seconds(), max=max_servers()), file=sys.stderr)


# --- the server --------------------------------------------------------------------------------

def serve(sock_path: Path, idle_s: float, entry: Callable[[list[str]], int], path: list | None = None) -> int:
    """Serve commands on `sock_path` until idle: each runs `entry(argv)` (barkgpt.cli.main) in a
    forked child. `path`: the clients' `sys.path`, None where each command's working directory goes.
    Started by `python -m barkgpt.warm_server`."""
    import fcntl
    import importlib
    import time

    os.chdir("/")  # no project folder stays busy (an unmount, a tmpfs clean-up) while it waits
    lock = os.open(sock_path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another server has this key
    record = {"pid": os.getpid(), "started": time.time(), "used": time.time(), "idle_s": idle_s,
              "preloaded": 0, "of": len(PRELOAD)}
    _write_record(lock, record)
    _make_room(sock_path.parent, max_servers() - 1, os.getpid())
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = sock_path.with_name(f"{sock_path.name}.{os.getpid()}")
    listener.bind(str(staging))
    listener.listen(64)
    os.replace(staging, sock_path)  # clients may connect from now on; they wait while a module imports
    ours = sock_path.stat().st_ino
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    pending = list(PRELOAD)
    stamp = code_stamp(path or sys.path)
    children: set[int] = set()  # the commands running now: while one runs, the server is not idle
    try:
        while True:
            # A waiting command first; else the next import; else wait for a command until idle.
            # Imports and forks take turns in this one thread, so no fork happens mid-import.
            children = {pid for pid in children if _running(pid)}
            if children:
                record["used"] = time.time()
                _write_record(lock, record)  # `status` counts idle time from the last command's end
            left = record["used"] + idle_s - time.time()
            listener.settimeout(0 if pending else max(0.0, min(left, CHECK_S)))
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, TimeoutError):
                # Idle (importing or not); our socket removed (stop, a deleted runtime folder); or our
                # code edited or a package installed: no command would pick this server again.
                if left <= 0 or not _still_ours(sock_path, ours) or code_stamp(path or sys.path) != stamp:
                    return 0
                if pending:
                    name = pending.pop(0)
                    try:
                        importlib.import_module(name)
                    except Exception as err:  # an optional engine missing: its stages import it themselves
                        print(f"preload {name}: {err}", file=sys.stderr)
                    record["preloaded"] += 1
                    _write_record(lock, record)
                continue
            conn.setblocking(True)
            record["used"] = time.time()
            _write_record(lock, record)
            pid = os.fork()
            if pid == 0:
                listener.close()
                os.close(lock)
                os._exit(_child(conn, entry, path))
            children.add(pid)
            conn.close()
    finally:
        try:
            if sock_path.stat().st_ino == ours:
                sock_path.unlink()
        except OSError:
            pass
        for leftover in (sock_path.with_suffix(".lock"), sock_path.with_suffix(".log")):
            leftover.unlink(missing_ok=True)  # still locked by us: no other server owns these


def _write_record(fd: int, record: dict) -> None:
    """What `status` shows and eviction reads: the server's pid, start, last command, imports done."""
    data = json.dumps(record).encode()
    os.pwrite(fd, data.ljust(256), 0)  # one short write, padded: a reader never sees a mix of two
    os.ftruncate(fd, max(256, len(data)))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # children are reaped by the kernel (SIGCHLD ignored): an ended one is gone
        return True
    except ProcessLookupError:
        return False


def _still_ours(sock_path: Path, ino: int) -> bool:
    try:
        return sock_path.stat().st_ino == ino
    except OSError:
        return False


def _make_room(folder: Path, keep: int, me: int) -> None:
    """Stop the least recently used servers until at most `keep` others remain. A stopped server's
    running commands finish: they are processes of their own."""
    others = sorted((s for s in servers(folder) if s["pid"] != me), key=lambda s: s.get("used", 0))
    for old in others[:max(0, len(others) - keep)]:
        try:
            os.kill(old["pid"], signal.SIGTERM)
        except OSError:
            pass


def _child(conn: socket.socket, entry: Callable[[list[str]], int], path: list | None) -> int:
    global _in_server
    import atexit
    import threading
    import traceback

    _in_server = True
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # subprocesses of the stage are waited for as usual
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        request, fds = _receive(conn)
        os.chdir(request["cwd"])
    except (OSError, ValueError):
        return 1
    # The folder this server imported barkgpt from is gone (a DVC temporary experiment, removed when
    # it ended): a lazy import would fail in the stage. Let the client run it itself.
    gone = not Path(__file__).parent.is_dir()
    if gone or path is not None:
        if path is not None:
            sys.path[:] = [request["cwd"] if entry_ is None else entry_ for entry_ in path]
        if gone or (None in path and _shadowed(request["cwd"])):
            try:
                conn.sendall(b"cold\n")  # a fresh process would import that folder's module: run there
            except OSError:
                pass
            return 0
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
        os.close(fd)
    # Ctrl-C as the client has it, not as whichever command started the server had it.
    signal.signal(signal.SIGINT, signal.SIG_IGN if request.get("sigint_ignored") else signal.default_int_handler)
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


def _shadowed(cwd: str) -> str | None:
    """A module this process has loaded that a file or package in `cwd` would replace in a fresh
    process (for which `cwd` comes first on sys.path); None when there is none."""
    try:
        entries = os.listdir(cwd)
    except OSError:
        return None
    for entry in entries:
        name = entry[:-3] if entry.endswith(".py") else entry
        module = sys.modules.get(name)
        if module is None or (entry == name and not os.path.isfile(os.path.join(cwd, entry, "__init__.py"))):
            continue  # a plain folder is a namespace portion: a regular package elsewhere still wins
        origin = getattr(module, "__file__", None) or ""
        if not os.path.realpath(origin).startswith(os.path.realpath(os.path.join(cwd, entry))):
            return name
    return None


# --- seeing and stopping them --------------------------------------------------------------------

def servers(folder: Path) -> list[dict]:
    """This user's live servers in `folder`, from their lock files: pid, key, started, used (last
    command), idle_s, preloaded/of. Not the commands they run (those share the command line)."""
    found = []
    for lock in folder.glob("*.lock"):
        try:
            record = json.loads(lock.read_bytes().strip() or b"{}")
            pid = int(record["pid"])
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, KeyError, TypeError):
            continue  # starting, gone, or not a server's lock
        if cmd[1:3] == [b"-m", b"barkgpt.warm_server"] and cmd[3] == str(lock.with_suffix(".sock")).encode():
            found.append({**record, "pid": pid, "key": lock.stem})
    return sorted(found, key=lambda s: s["started"])


def memory_kib(pid: int) -> dict:
    """Resident (RSS) and proportional (PSS: shared pages split among their users) memory, in KiB."""
    out = {}
    for file, field, name in (("status", "VmRSS:", "rss"), ("smaps_rollup", "Pss:", "pss")):
        try:
            line = next(x for x in Path(f"/proc/{pid}/{file}").read_text().splitlines() if x.startswith(field))
            out[name] = int(line.split()[1])
        except (OSError, StopIteration, ValueError, IndexError):
            pass
    return out


def status() -> int:
    """Print this user's warm servers: state, memory, idle time, commands running."""
    import time

    folder = runtime_dir()
    if folder is None:
        print("no warm servers: no private runtime folder (XDG_RUNTIME_DIR or the temp folder) for them")
        return 0
    found = servers(folder)
    print(f"{len(found)} warm server(s) in {folder} (at most {max_servers()} per user; "
          f"each exits after its idle time without a command)")
    if not found:
        return 0
    all_pids = server_pids(folder)
    total = 0
    for s in found:
        mem = memory_kib(s["pid"])
        total += mem.get("rss", 0)
        commands = sum(_parent(pid) == s["pid"] for pid in all_pids)
        state = "ready" if s["preloaded"] >= s["of"] else f"importing ({s['preloaded']}/{s['of']} modules)"
        print(f"  pid {s['pid']}: {state}, {mem.get('rss', 0) / 1024:.0f} MiB resident"
              f" ({mem.get('pss', 0) / 1024:.0f} MiB proportional), idle {time.time() - s['used']:.0f} of "
              f"{s['idle_s']:g} s, {commands} command(s) running, key {s['key']}")
    print(f"total: {total / 1024:.0f} MiB resident")
    return 0


def stop() -> int:
    """Stop this user's warm servers; each exits on SIGTERM and removes its socket. The commands
    they run now finish."""
    folder = runtime_dir()
    pids = [s["pid"] for s in servers(folder)] if folder else []
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
    commands = {"status": status, "stop": stop}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        print("usage: python -m barkgpt.warm {status,stop}", file=sys.stderr)
        sys.exit(2)
    sys.exit(commands[sys.argv[1]]())
