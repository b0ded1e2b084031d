"""Runbook: take a base backup for point-in-time recovery.

audit row 'running' → pg_basebackup streamed (gzip, gpg, multipart upload) → manifest
written last → audit row 'success'. A failure: audit row 'failed', a notification, and
no manifest (so nothing that looks like a base backup is left behind).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks import pitr as steps
from tasks.common import (
    attempt_scoped_uuid,
    audit_backup_finished,
    audit_backup_started,
    backup_id_for_this_run,
    scrub,
    send_notification,
)


@flow(name="base-backup", log_prints=True)
def base_backup(operator: str = "scheduler") -> dict[str, Any]:
    """One base backup of the protected cluster; returns its manifest (summary)."""
    logger = get_run_logger()
    backup_id = backup_id_for_this_run("base-backup-id")
    audit_id = attempt_scoped_uuid("base-backup-audit")
    audit_backup_started(audit_id, backup_id, operator, backup_type="base")
    try:
        manifest = steps.stream_base_backup(backup_id, operator)
    except Exception as exc:
        error = scrub(f"{type(exc).__name__}: {exc}")
        audit_backup_finished(audit_id, "failed", error=error)
        send_notification(
            f"WeDefiDaily base backup {backup_id} FAILED",
            "failure",
            {"backup_id": backup_id, "error": error},
        )
        raise
    audit_backup_finished(
        audit_id,
        "success",
        size_bytes=manifest["object"]["size_bytes"],
        checksum=manifest["object"]["sha256"],
    )
    logger.info(
        "base backup %s: WAL %s..%s on timeline %d, %.1f MB stored",
        backup_id,
        manifest["start_lsn"],
        manifest["stop_lsn"],
        manifest["timeline"],
        manifest["object"]["size_bytes"] / 1e6,
    )
    create_markdown_artifact(
        key="base-backup-summary",
        markdown=(
            f"# Base backup {backup_id}\n\n| | |\n|---|---|\n"
            f"| timeline | {manifest['timeline']} |\n"
            f"| WAL | {manifest['start_lsn']} .. {manifest['stop_lsn']} |\n"
            f"| started | {manifest['started_at']} |\n| finished | {manifest['finished_at']} |\n"
            f"| tar | {manifest['plaintext_size_bytes'] / 1e6:.1f} MB |\n"
            f"| stored | {manifest['object']['size_bytes'] / 1e6:.1f} MB |\n"
        ),
        description=f"base backup {backup_id}",
    )
    return manifest
