"""Prefect flows: one module per runbook, each step one task named as the runbook names it."""

import os

# The core logs through stdlib loggers named wedefi_dr.*; route them into the Prefect UI.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "wedefi_dr")
