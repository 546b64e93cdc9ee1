"""Prefect flows over the stage tasks. Prefect state stays in the project (.prefect/) by default."""
import logging
import os
from pathlib import Path

# Keep Prefect's database, results and cache records inside the project unless the user chose a
# home (or a server via PREFECT_API_URL); set before prefect is imported so it takes effect.
os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parent.parent / ".prefect"))
# Offline by default: the local (ephemeral) Prefect server sends no usage analytics.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Nothing pickled is ever loaded: whatever Prefect persists (the flows' and tasks' results, so a
# failed flow run can be retried from its failed task) is JSON.
os.environ.setdefault("PREFECT_RESULTS_DEFAULT_SERIALIZER", "json")
# The temporary local API starts in seconds on an idle laptop, slower on a loaded 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# barkgpt's own log lines (training progress at least every 10 s) go to the flow run's log.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "barkgpt")
logging.getLogger("barkgpt").setLevel(logging.INFO)


class ExpectedErrorsWithoutTraceback(logging.Filter):
    """A BarkError is bad input with its fix in the message: Prefect logs the message, not a
    traceback (an unexpected error keeps its traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from barkgpt.errors import BarkError

        if record.exc_info and isinstance(record.exc_info[1], BarkError):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs", "prefect.flow_engine", "prefect.task_engine"):
    logging.getLogger(_name).addFilter(ExpectedErrorsWithoutTraceback())
