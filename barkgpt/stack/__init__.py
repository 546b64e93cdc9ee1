"""A team's stack of real services: PostgreSQL, an MLflow tracking server with S3 artifacts, a Prefect
server with a work pool and worker, S3 buckets for MLflow and DVC. Declared once (services.py), run
on loopback (run.py) or written as compose.yaml (compose.py)."""
