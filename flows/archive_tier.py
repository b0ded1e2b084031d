"""Runbook: weekly copy of the newest full backup to the Glacier tier.

audit row 'running' → copy the week's newest full backup to the Glacier tier (data object
as GLACIER or DEEP_ARCHIVE, manifest beside it, verified) → audit row 'success'. On any
failure: audit row 'failed', notification.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from tasks import sync as steps
from tasks.common import (
    attempt_scoped_uuid,
    audit_backup_finished,
    audit_backup_started,
    failure_reported,
    run_lock,
)
from wedefi_dr.config import get_settings


@flow(name="archive-tier", log_prints=True)
def archive_tier(backup_id: str = "latest", operator: str = "scheduler") -> dict:
    """Copy ``backup_id`` (default: the newest) to the Glacier bucket; returns what happened."""
    settings = get_settings()
    audit_id = attempt_scoped_uuid("archive-tier-audit")

    def audit_failed(error: str) -> None:
        audit_backup_started(audit_id, backup_id, operator, backup_type="archive-tier")
        audit_backup_finished(audit_id, "failed", error=error)

    with (
        failure_reported("WeDefiDaily archive tier", {"backup_id": backup_id}, audit_failed),
        run_lock("archive-tier", settings.glacier_bucket),
    ):
        audit_backup_started(audit_id, backup_id, operator, backup_type="archive-tier")
        result = steps.archive_newest(backup_id)
    audit_backup_finished(audit_id, "success")
    get_run_logger().info(
        "%s in s3://%s as %s (%s)",
        result["backup_id"],
        result["bucket"],
        result["storage_class"],
        "copied" if result["copied"] else "already there",
    )
    return result
