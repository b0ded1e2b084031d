"""Runbook: daily full logical backup (the plan's 02:00 UTC pg_dump, done safely).

preflight → audit row 'running' → dump, encrypt and upload → write manifest →
audit row 'success' → metrics. On any failure: audit row 'failed', metrics, notification.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from tasks import backup as steps
from tasks.common import (
    attempt_scoped_uuid,
    audit_backup_finished,
    audit_backup_started,
    backup_id_for_this_run,
    failure_reported,
    protected_database,
    publish_backup_metrics,
    publish_summary,
    run_lock,
)


@flow(name="logical-backup", log_prints=True)
def logical_backup(operator: str = "scheduler") -> str:
    """Take a full logical backup of the primary; returns the backup id.

    Args:
        operator: Who asked for it, recorded in the audit row and the manifest.
    """
    backup_id = backup_id_for_this_run("backup-id")
    audit_id = attempt_scoped_uuid("backup-audit")
    get_run_logger().info("backup %s starting (operator %s)", backup_id, operator)
    database = "unknown"

    def audit_failed(error: str) -> None:
        audit_backup_started(audit_id, backup_id, operator)  # a no-op when already there
        audit_backup_finished(audit_id, "failed", error=error)

    with (
        failure_reported(
            f"WeDefiDaily backup {backup_id}",
            {"backup_id": backup_id},
            close_audit=audit_failed,
            also=lambda: publish_backup_metrics("logical", database, None, None),
        ),
        run_lock("backup", protected_database()),
    ):
        database = steps.preflight()["database"]
        audit_backup_started(audit_id, backup_id, operator)
        manifest = steps.dump_encrypt_upload(backup_id, operator)
        steps.write_manifest(manifest)
    obj = manifest["object"]
    audit_backup_finished(audit_id, "success", size_bytes=obj["size_bytes"], checksum=obj["sha256"])
    publish_backup_metrics("logical", database, manifest["duration_seconds"], obj["size_bytes"])
    publish_summary(
        "backup-summary",
        "backup_summary.md.j2",
        f"logical backup {backup_id}",
        m=manifest,
        database=database,
    )
    return backup_id
