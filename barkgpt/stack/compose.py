"""compose.yaml, written from the stack's declarations (`barkgpt stack compose`; a test fails when
the committed file and the declarations disagree). Each service runs the command `barkgpt stack up`
runs, filled with compose's values: service names for hosts, container paths for folders."""
from __future__ import annotations

import yaml

from barkgpt.stack.services import COMPOSE_STOP_GRACE_S, DB_USER, DEFAULT_PORTS, Service, services

SERVE_PORT = 8000
PROJECT = "/srv/barkgpt"  # the project inside the image (deploy/stack.Dockerfile)
HEADER = ("# The team stack for Docker: written by `barkgpt stack compose` from barkgpt/stack/services.py,\n"
          "# the declarations `barkgpt stack up` runs on loopback; do not edit by hand (docs/team.md).\n"
          "#   POSTGRES_PASSWORD=... docker compose up -d\n")
PG_CLIENTS = {"databases", "mlflow", "prefect-server", "prefect-worker"}
AWS_CLIENTS = {"buckets", "mlflow", "prefect-worker", "s3"}


def values() -> dict[str, str]:
    ports = {**{k: str(v) for k, v in DEFAULT_PORTS.items()}, "serve": str(SERVE_PORT)}
    return {**ports, "bind": "0.0.0.0", "pg_host": "postgres", "mlflow_host": "mlflow",
            "prefect_host": "prefect-server", "s3_url": f"http://s3:{ports['s3']}", "region": "${AWS_REGION:-us-east-1}",
            "pg_data": "/var/lib/postgresql/data", "pg_socket": "/var/run/postgresql",
            "prefect_home": "/var/lib/prefect",
            "mlflow_allowed_hosts": f"mlflow:{ports['mlflow']},localhost:{ports['mlflow']},127.0.0.1:{ports['mlflow']}"}


def healthcheck(service: Service, vals: dict) -> dict | None:
    if service.name == "postgres":
        test = ["CMD", "pg_isready", "-h", "127.0.0.1", "-p", vals["postgres"], "-U", DB_USER]
    elif service.health:
        url = f"http://127.0.0.1:{vals[service.port]}{service.health}"
        test = ["CMD", "python", "-c", f"import urllib.request; urllib.request.urlopen({url!r}, timeout=3)"]
    else:
        return None
    return {"test": test, "interval": "5s", "timeout": "5s", "retries": 30}


def render() -> str:
    vals = values()
    declared = services()
    kinds = {s.name: s for s in declared}
    out: dict = {"services": {}, "volumes": {"pgdata": {}, "prefect": {}}}
    for service in declared:
        spec: dict = {}
        if service.image == "barkgpt":
            spec["build"] = {"context": ".", "dockerfile": "deploy/stack.Dockerfile"}
            spec["image"] = "barkgpt-stack"
        else:
            spec["image"] = service.image
        spec["command"] = service.argv(vals)
        env = service.environment(vals)
        if service.name == "postgres":
            env.update(POSTGRES_USER=DB_USER, POSTGRES_PASSWORD="${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}")
            spec["volumes"] = ["pgdata:/var/lib/postgresql/data"]
        if service.name in PG_CLIENTS:
            env["PGPASSWORD"] = "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"  # libpq and asyncpg read it
        if service.name in AWS_CLIENTS:  # the local S3 takes any keys; real AWS: the host's, or a role
            env.update(AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-testing}",
                       AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-testing}")
        if "prefect_home" in "".join(service.env.values()) and service.name != "work-pool":
            spec["volumes"] = ["prefect:/var/lib/prefect"]
        if service.name in ("prefect-worker", "serve"):
            # flow runs and the server work in the project: deployments record this folder
            spec["working_dir"] = PROJECT
            spec["volumes"] = [*spec.get("volumes", []), f".:{PROJECT}"]
        if env:
            spec["environment"] = env
        if service.port:
            port = vals[service.port]
            spec["ports"] = [f"127.0.0.1:{port}:{port}"]
        if service.stop_signal != "SIGTERM":
            spec["stop_signal"] = service.stop_signal
        if service.stop_grace_s != COMPOSE_STOP_GRACE_S:
            spec["stop_grace_period"] = f"{service.stop_grace_s:g}s"
        check = healthcheck(service, vals)
        if check:
            spec["healthcheck"] = check
        if service.after:
            spec["depends_on"] = {
                dep: {"condition": "service_completed_successfully" if kinds[dep].job
                      else "service_healthy" if healthcheck(kinds[dep], vals) else "service_started"}
                for dep in service.after}
        if service.job:
            spec["restart"] = "no"
        out["services"][service.name] = spec
    return HEADER + yaml.safe_dump(out, sort_keys=False, width=120)
