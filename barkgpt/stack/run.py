"""The team stack on loopback: `barkgpt stack up | down | status | env`.

Every service of barkgpt/stack/services.py runs as its own process group, detached from the
command that started it; the state (PostgreSQL's data, logs, pids, the ports) lives in one folder,
`.stack/` by default. `down` stops what `up` recorded, in reverse order, and nothing else.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from barkgpt.errors import BarkError
from barkgpt.fileio import read_json, write_json, write_text
from barkgpt.stack.services import DB_USER, DEFAULT_PORTS, Service, client_env, services

STATE_FILE = "stack.json"
REGION = "us-east-1"
LOCAL_S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}  # moto takes any
READY_TIMEOUT_S = 180.0
JOB_TIMEOUT_S = 180.0


# --- where things are -----------------------------------------------------------------------------

def ports_for(base: int | None) -> dict[str, int]:
    """The documented ports, or base, base+1, ... (a test's own range)."""
    if base is None:
        return dict(DEFAULT_PORTS)
    return {name: base + i for i, name in enumerate(DEFAULT_PORTS)}


def values(state: Path, ports: dict[str, int]) -> dict[str, str]:
    """What the command templates are filled with on loopback."""
    return {**{k: str(v) for k, v in ports.items()},
            "bind": "127.0.0.1", "pg_host": "127.0.0.1", "mlflow_host": "127.0.0.1", "prefect_host": "127.0.0.1",
            "s3_url": f"http://127.0.0.1:{ports['s3']}", "region": REGION,
            "pg_data": str(state / "postgres" / "data"), "pg_socket": str(state / "postgres" / "run"),
            "prefect_home": str(state / "prefect"),
            "mlflow_allowed_hosts": f"127.0.0.1:{ports['mlflow']},localhost:{ports['mlflow']}"}


def stack_env(state: Path, ports: dict[str, int]) -> dict[str, str]:
    """The environment a machine (or a service) needs to use the stack: where each service is, and
    the credentials as the standard chains take them (a libpq password file; moto's test keys)."""
    return {**{k: v.format(**values(state, ports)) for k, v in client_env().items()},
            "PGPASSFILE": str(state / "pgpass"), **LOCAL_S3_KEYS}


def executable(name: str) -> str:
    """A service's program: this interpreter for `python`, the venv's scripts, PostgreSQL's bindir."""
    if name == "python":
        return sys.executable
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (bindir / name).exists():
            return str(bindir / name)
    raise BarkError(f"`{name}` not found: the team stack needs it on PATH "
                    + ("(PostgreSQL 15: apt-get install postgresql-15)" if name in ("postgres", "initdb")
                       else "(install the project with scripts/install.sh all)"))


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


# --- processes ------------------------------------------------------------------------------------

def start_time(pid: int) -> str | None:
    """The kernel's start time of a pid (field 22 of /proc/<pid>/stat): a pid reused by another
    process has another one, so `down` never signals a stranger."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else fields[19]


def alive(record: dict) -> bool:
    return start_time(record["pid"]) == record["start"]


def group_alive(pgid: int) -> bool:
    try:  # a leader this process started (start_service) is a zombie until reaped: reap it first
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_group(record: dict, stop_signal: str, timeout: float = 30.0) -> str:
    """Stop a service's process group: its stop signal, then SIGKILL after `timeout`. Says how."""
    pid, started = record["pid"], time.monotonic()
    if alive(record):
        try:
            os.killpg(pid, getattr(signal, stop_signal))
        except ProcessLookupError:
            return "stopped"
    deadline = started + timeout
    while group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not group_alive(pid):
        return f"stopped ({time.monotonic() - started:.1f} s)"
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return "stopped"
    while group_alive(pid) and time.monotonic() < deadline + 10:
        time.sleep(0.2)
    return f"stopped (killed: still running {timeout:g} s after {stop_signal})"


# --- PostgreSQL's cluster -------------------------------------------------------------------------

def pg_user() -> dict:
    """PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user."""
    if os.geteuid() != 0:
        return {}
    import pwd

    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise BarkError("running as root, and PostgreSQL refuses root: create a `postgres` user "
                        "(useradd -r postgres) or run `barkgpt stack up` as a normal user") from None
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def init_cluster(state: Path, log) -> None:
    """initdb once, with password authentication; the password goes to a libpq password file
    (mode 0600) that clients find through PGPASSFILE, never into a URL."""
    pgdir = state / "postgres"
    data = pgdir / "data"
    (pgdir / "run").mkdir(parents=True, exist_ok=True)
    if (data / "PG_VERSION").exists():
        return
    password = secrets.token_urlsafe(24)
    pwfile = pgdir / "initdb.pw"
    as_user = pg_user()
    if data.exists():
        shutil.rmtree(data)  # an initdb that did not finish
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    try:
        if as_user:
            for p in (pgdir, pgdir / "run", pwfile):
                os.chown(p, as_user["user"], as_user["group"])
            check = subprocess.run(["test", "-w", str(pgdir)], **as_user)
            if check.returncode != 0:
                raise BarkError(f"the postgres user cannot reach {pgdir}: a parent folder is private "
                                f"(chmod o+x on it), or choose another state folder (--dir)")
        subprocess.run([executable("initdb"), "-D", str(data), "-U", DB_USER, "--auth=scram-sha-256",
                        f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C"],
                       stdout=log, stderr=subprocess.STDOUT, check=True, timeout=JOB_TIMEOUT_S, **as_user)
    except subprocess.CalledProcessError:
        raise BarkError(f"initdb failed: see {log.name}") from None
    finally:
        pwfile.unlink(missing_ok=True)
    pgpass = state / "pgpass"
    write_text(pgpass, f"*:*:*:{DB_USER}:{password}\n")
    pgpass.chmod(0o600)


# --- the stack --------------------------------------------------------------------------------------

class Stack:
    def __init__(self, state: str | Path = ".stack"):
        self.state = Path(state).resolve()
        self.file = self.state / STATE_FILE

    def read(self) -> dict:
        return read_json(self.file) if self.file.exists() else {"ports": None, "processes": {}}

    def up(self, base_port: int | None = None, echo=print) -> dict:
        record = self.read()
        running = {n: r for n, r in record["processes"].items() if alive(r)}
        if running:
            raise BarkError(f"the stack in {self.state} is already running ({', '.join(running)}): "
                            "`barkgpt stack status` shows it, `barkgpt stack down` stops it")
        ports = ports_for(base_port) if base_port is not None or not record.get("ports") else record["ports"]
        busy = [f"{name} {port}" for name, port in ports.items() if port_open(port)]
        if busy:
            raise BarkError(f"ports already in use: {', '.join(busy)}; stop what holds them, or choose "
                            "another range with --base-port")
        (self.state / "logs").mkdir(parents=True, exist_ok=True)
        write_text(self.state / ".gitignore", "*\n")  # inside a project, the state never enters git
        record = {"ports": ports, "processes": {}}
        write_json(self.file, record)
        try:
            for service in services():
                if service.loopback:
                    self.launch(service, record, echo)
        except BaseException:
            self.down(echo=lambda *_: None)
            raise
        return record

    def launch(self, service: Service, record: dict, echo=print) -> None:
        """Run a job to its end, or start a service and wait until it answers; record its process."""
        ports = record["ports"]
        vals = values(self.state, ports)
        env = {**os.environ, **stack_env(self.state, ports)}
        env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
        log_path = self.state / "logs" / f"{service.name}.log"
        with log_path.open("ab") as log:
            if service.name == "postgres":
                init_cluster(self.state, log)
            argv = service.argv(vals)
            argv[0] = executable(argv[0])
            penv = {**env, **service.environment(vals)}
            extra = pg_user() if service.name == "postgres" else {}
            if service.job:
                echo(f"{service.name}: {' '.join(service.argv(vals))}")
                done = subprocess.run(argv, env=penv, cwd=self.state, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=JOB_TIMEOUT_S)
                if done.returncode != 0:
                    raise BarkError(f"{service.name} failed (exit {done.returncode}): "
                                    f"{tail(log_path)}\nfull log: {log_path}")
                return
            proc = subprocess.Popen(argv, env=penv, cwd=self.state, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, **extra)
        record["processes"][service.name] = {"pid": proc.pid, "start": start_time(proc.pid),
                                             "signal": service.stop_signal, "grace_s": service.stop_grace_s}
        write_json(self.file, record)
        self.wait_ready(service, ports, proc, log_path)
        echo(f"{service.name}: ready (pid {proc.pid})")

    def stop_service(self, name: str) -> None:
        """Stop one service (e.g. the database under a running training); `start_service` restarts it."""
        record = self.read()
        proc = record["processes"].pop(name)
        stop_group(proc, proc.get("signal", "SIGTERM"), proc.get("grace_s", 30.0))
        write_json(self.file, record)

    def start_service(self, name: str) -> None:
        record = self.read()
        self.launch(next(s for s in services() if s.name == name), record, echo=lambda *_: None)

    def wait_ready(self, service: Service, ports: dict, proc: subprocess.Popen, log_path: Path) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise BarkError(f"{service.name} exited ({proc.returncode}) while starting: "
                                f"{tail(log_path)}\nfull log: {log_path}")
            if self.ready(service, ports):
                return
            if time.monotonic() > deadline:
                raise BarkError(f"{service.name} not ready after {READY_TIMEOUT_S:g}s: {tail(log_path)}\n"
                                f"full log: {log_path}")
            time.sleep(0.3)

    @staticmethod
    def ready(service: Service, ports: dict) -> bool:
        if service.port is None:  # the worker: alive is all it can show from outside
            return True
        port = ports[service.port]
        if not port_open(port):
            return False
        if service.health is None:
            return True
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{service.health}", timeout=3) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def down(self, echo=print) -> list[str]:
        record = self.read()
        stopped = []
        order = [s.name for s in services()]  # the state file's keys are sorted: stop in reverse start order
        for name, proc in sorted(record["processes"].items(), key=lambda kv: -order.index(kv[0])):
            how = stop_group(proc, proc.get("signal", "SIGTERM"), proc.get("grace_s", 30.0))
            stopped.append(name)
            echo(f"{name}: {how}")
        if self.file.exists():
            write_json(self.file, {"ports": record.get("ports"), "processes": {}})
        return stopped

    def status(self) -> dict:
        record = self.read()
        ports = record.get("ports")
        by_name = {s.name: s for s in services()}
        rows = {}
        for name, proc in record["processes"].items():
            up = alive(proc)
            rows[name] = "ready" if up and self.ready(by_name[name], ports) else ("starting" if up else "stopped")
        return {"state": str(self.state), "services": rows,
                "env": stack_env(self.state, ports) if ports else {}}


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def env_lines(env: dict[str, str]) -> str:
    import shlex

    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())


def dvc_remote_commands() -> list[str]:
    """The `team` remote is in .dvc/config; choosing it is per machine (.dvc/config.local). Its
    endpoint comes from AWS_ENDPOINT_URL (botocore reads it), so real AWS is the same remote."""
    return ["dvc remote default --local team"]
