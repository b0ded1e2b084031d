"""Prefect tasks: the retryable runbook steps. Each wraps one plain function of wedefi_dr."""
