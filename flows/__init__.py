"""Prefect flows: one module per runbook, each step one task named as the runbook names it."""

from wedefi_dr.config import apply_prefect_run_defaults

# However a flow starts (the CLI, a worker, a test), the same run defaults apply: results
# persisted so a Retry skips finished steps, the core's loggers routed into the run's log.
apply_prefect_run_defaults()
