"""The team stack, declared once: each service's command, the one-shot jobs that prepare it, and
the environment a machine needs to use it.

Two renderings read these declarations: `barkgpt stack up` runs them as processes on loopback
(barkgpt/stack/run.py), and `barkgpt stack compose` writes compose.yaml (barkgpt/stack/compose.py).
A command is a template; only the values filled in differ (a loopback port and a folder in the
state directory, or a compose service name and a container path), so the two cannot drift apart.

Nothing here imports Prefect, MLflow or DVC: each service is started by its own command line, the
way its own documentation starts it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

DB_USER = "barkgpt"
DATABASES = ("mlflow", "prefect", "optuna")  # one PostgreSQL cluster, one database per tool
MLFLOW_BUCKET = "barkgpt-mlflow"             # MLflow's artifacts, proxied by the tracking server
DVC_BUCKET = "barkgpt-dvc"                   # the team's DVC remote
WORK_POOL = "barkgpt-local"                  # prefect.yaml's deployments name this pool
DVC_REMOTE_URL = f"s3://{DVC_BUCKET}/store"
DEFAULT_PORTS = {"postgres": 5433, "s3": 9000, "mlflow": 5000, "prefect": 4200}


COMPOSE_STOP_GRACE_S = 10.0  # `docker compose stop`'s default grace before SIGKILL


@dataclass(frozen=True)
class Service:
    """A long-running process, or (job=True) a command that runs once and exits 0."""

    name: str
    command: tuple[str, ...]               # a template: {placeholders} are filled from Values
    env: dict[str, str] = field(default_factory=dict)  # templates too
    port: str | None = None                # the Values key of the port it listens on
    health: str | None = None              # an HTTP path that answers 200 when ready
    after: tuple[str, ...] = ()            # services (ready) and jobs (done) it needs first
    job: bool = False
    image: str = "barkgpt"                 # compose: the project image, unless a stock one fits
    loopback: bool = True                  # False: compose only (the serving app)
    stop_signal: str = "SIGTERM"
    # then SIGKILL after this long, as `docker compose stop` does: the servers keep their state in
    # PostgreSQL or nowhere, so a kill loses nothing a stop would keep
    stop_grace_s: float = COMPOSE_STOP_GRACE_S

    def argv(self, values: dict) -> list[str]:
        return [part.format(**values) for part in self.command]

    def environment(self, values: dict) -> dict[str, str]:
        return {k: v.format(**values) for k, v in self.env.items()}


# The client side, shared by the services that are clients of others and by every machine that
# uses the stack: where each service is, never what to train. Credentials come from the standard
# chains (PGPASSFILE or PGPASSWORD for PostgreSQL; the AWS variables, profile or role for S3).
def aws_env() -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": "{s3_url}", "AWS_REGION": "{region}", "AWS_DEFAULT_REGION": "{region}"}


def client_env() -> dict[str, str]:
    return {**aws_env(),
            "MLFLOW_TRACKING_URI": "http://{mlflow_host}:{mlflow}",
            "PREFECT_API_URL": "http://{prefect_host}:{prefect}/api",
            "BARKGPT_OPTUNA_STORAGE": "postgresql+psycopg2://" + DB_USER + "@{pg_host}:{postgres}/optuna"}


def services() -> list[Service]:
    pg = "postgresql+psycopg2://" + DB_USER + "@{pg_host}:{postgres}"
    return [
        Service("postgres", ("postgres", "-D", "{pg_data}", "-p", "{postgres}", "-h", "{bind}", "-k", "{pg_socket}"),
                port="postgres", image="postgres:15", stop_signal="SIGINT",  # SIGINT: fast shutdown
                stop_grace_s=30.0),  # its fast shutdown ends every session first
        Service("databases", ("python", "-m", "barkgpt.stack", "databases", "--url", pg + "/postgres",
                              *DATABASES), after=("postgres",), job=True),
        Service("s3", ("moto_server", "-H", "{bind}", "-p", "{s3}"), port="s3", health="/moto-api/"),
        Service("buckets", ("python", "-m", "barkgpt.stack", "buckets", MLFLOW_BUCKET, DVC_BUCKET),
                env=aws_env(), after=("s3",), job=True),
        # artifacts proxied: clients talk HTTP to the server, only the server holds S3 credentials
        Service("mlflow", ("mlflow", "server", "--backend-store-uri", pg + "/mlflow",
                           "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts",
                           "--host", "{bind}", "--port", "{mlflow}", "--workers", "1",
                           "--allowed-hosts", "{mlflow_allowed_hosts}"),
                env={**aws_env(), "MLFLOW_S3_ENDPOINT_URL": "{s3_url}"},
                port="mlflow", health="/health", after=("databases", "buckets")),
        Service("prefect-server", ("prefect", "server", "start", "--host", "{bind}", "--port", "{prefect}"),
                env={"PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://" + DB_USER
                     + "@{pg_host}:{postgres}/prefect",
                     "PREFECT_HOME": "{prefect_home}", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
                port="prefect", health="/api/health", after=("databases",)),
        Service("work-pool", ("prefect", "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite"),
                env={"PREFECT_API_URL": "http://{prefect_host}:{prefect}/api", "PREFECT_HOME": "{prefect_home}"},
                after=("prefect-server",), job=True),
        # the worker runs flow runs with its own environment: it must find the other services
        Service("prefect-worker", ("prefect", "worker", "start", "--pool", WORK_POOL),
                env={**client_env(), "PREFECT_HOME": "{prefect_home}"},
                after=("work-pool", "mlflow")),
        Service("serve", ("barkgpt", "serve", "--host", "{bind}", "--port", "{serve}"),
                port="serve", health="/health", loopback=False),
    ]


def by_name() -> dict[str, Service]:
    return {s.name: s for s in services()}
