"""MLflow tracking (runs.py: one run per trained model) and registry (registry.py: one model
version per trained model, `champion` on the best gate-passing version).

The stages call these names; nothing here is needed with `tracking.enabled: false`.
"""
from barkgpt.tracking.runs import (  # noqa: F401
    TrackingLost,
    TrainingRun,
    check_server,
    client_for,
    data_tags,
    finish_evaluation,
    finish_training,
    git_commit,
    log_export,
    open_store,
    loss_curve_png,
    pipeline_params,
    reopen_run,
    resolve_uri,
    run_name,
    run_summary,
    start_training_run,
)
