"""Prefect tasks: the retryable runbook steps. Each wraps one plain function of wedefi_dr."""

import os

# The core logs through stdlib loggers named wedefi_dr.*; route them into the Prefect UI.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "wedefi_dr")
