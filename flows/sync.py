"""Runbook: daily cross-region copy of the backups (primary bucket → DR bucket).

audit row 'running' → copy new backups to the DR region (server-side, verified; refused and
alerted when the primary looks wiped) → audit row 'success' → summary. On any failure:
audit row 'failed', notification.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from tasks import sync as steps
from tasks.common import (
    attempt_scoped_uuid,
    audit_backup_finished,
    audit_backup_started,
    backup_id_for_this_run,
    failure_reported,
    publish_summary,
    run_lock,
)
from wedefi_dr.config import get_settings
from wedefi_dr.lifecycle.sync import describe


@flow(name="sync", log_prints=True)
def sync(operator: str = "scheduler", dry_run: bool = False) -> dict:
    """Copy what the DR bucket lacks, propagate recorded deletions; returns the summary."""
    settings = get_settings()
    run_label = "sync-" + backup_id_for_this_run("sync-id")
    audit_id = attempt_scoped_uuid("sync-audit")

    def audit_failed(error: str) -> None:
        audit_backup_started(audit_id, run_label, operator, backup_type="sync")
        audit_backup_finished(audit_id, "failed", error=error)

    with (
        failure_reported(f"WeDefiDaily sync {run_label}", {"run": run_label}, audit_failed),
        run_lock("sync", f"{settings.bucket}->{settings.dr_bucket}"),
    ):
        audit_backup_started(audit_id, run_label, operator, backup_type="sync")
        summary = steps.copy_to_dr(dry_run)
    audit_backup_finished(audit_id, "success", size_bytes=summary["bytes_copied"])
    for line in describe(summary):
        get_run_logger().info(line)
    publish_summary(
        "sync-summary",
        "sync_summary.md.j2",
        f"sync {run_label}",
        s=summary,
        lines=describe(summary),
    )
    return summary
