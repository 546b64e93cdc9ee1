"""Prefect flows over the stage tasks. Prefect state stays in the project (.prefect/) by default."""
import os
from pathlib import Path

# Keep Prefect's database, results and cache records inside the project unless the user chose a
# home (or a server via PREFECT_API_URL); set before prefect is imported so it takes effect.
os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parent.parent / ".prefect"))
# Offline by default: the local (ephemeral) Prefect server sends no usage analytics.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
