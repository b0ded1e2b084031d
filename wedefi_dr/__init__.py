"""The core: plain Python, no Prefect, in one subpackage per domain of the DR runbook."""
