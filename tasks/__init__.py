"""Prefect tasks: the retryable runbook steps. Each wraps one plain function of wedefi_dr."""

# A worker loads a deployment's flow from its file, not as ``flows.<name>``, but every flow
# imports tasks: so the shared result storage's block type is known before Prefect loads
# the run's default result storage (PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK).
from tasks import result_storage  # noqa: E402, F401
