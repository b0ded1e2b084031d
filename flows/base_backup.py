"""Runbook: take a base backup for point-in-time recovery.

audit row 'running' → pg_basebackup streamed (gzip, gpg, multipart upload) → manifest
written last → audit row 'success'. A failure: audit row 'failed', a notification, and
no manifest (so nothing that looks like a base backup is left behind).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from tasks import base_backup as steps
from tasks.common import (
    attempt_scoped_uuid,
    audit_backup_finished,
    audit_backup_started,
    backup_id_for_this_run,
    failure_reported,
    protected_cluster,
    publish_backup_metrics,
    publish_summary,
    run_lock,
)

# A base backup is of the whole cluster, not of one database.
CLUSTER_LABEL = "cluster"


@flow(name="base-backup", log_prints=True)
def base_backup(operator: str = "scheduler") -> dict[str, Any]:
    """One base backup of the protected cluster; returns its manifest (summary).

    Args:
        operator: Who asked for it, recorded in the audit row and the manifest.
    """
    backup_id = backup_id_for_this_run("base-backup-id")
    audit_id = attempt_scoped_uuid("base-backup-audit")
    audit_backup_started(audit_id, backup_id, operator, backup_type="base")
    with (
        failure_reported(
            f"WeDefiDaily base backup {backup_id}",
            {"backup_id": backup_id},
            close_audit=lambda error: audit_backup_finished(audit_id, "failed", error=error),
            also=lambda: publish_backup_metrics("base", CLUSTER_LABEL, None, None),
        ),
        run_lock("base-backup", protected_cluster()),
    ):
        manifest = steps.stream_base_backup(backup_id, operator)
        steps.write_manifest(manifest)
    obj = manifest["object"]
    audit_backup_finished(audit_id, "success", size_bytes=obj["size_bytes"], checksum=obj["sha256"])
    publish_backup_metrics("base", CLUSTER_LABEL, manifest["duration_seconds"], obj["size_bytes"])
    get_run_logger().info(
        "base backup %s: WAL %s..%s on timeline %d, %.1f MB stored",
        backup_id,
        manifest["start_lsn"],
        manifest["stop_lsn"],
        manifest["timeline"],
        obj["size_bytes"] / 1e6,
    )
    publish_summary(
        "base-backup-summary", "base_backup_summary.md.j2", f"base backup {backup_id}", m=manifest
    )
    return {k: v for k, v in manifest.items() if k != "pg_backup_manifest"}
