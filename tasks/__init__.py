"""Prefect tasks: one thin wrapper per pipeline stage over barkgpt.stages (the CLI and DVC call the same)."""
