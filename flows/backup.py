"""Runbook: daily full logical backup (the plan's 02:00 UTC pg_dump, done safely).

preflight → audit row 'running' → dump, encrypt and upload → write manifest →
audit row 'success' → metrics. On any failure: audit row 'failed', metrics, notification.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks import backup as steps
from tasks.common import (
    attempt_scoped_uuid,
    audit_backup_finished,
    audit_backup_started,
    backup_id_for_this_run,
    publish_backup_metrics,
    scrub,
    send_notification,
)


@flow(name="logical-backup", log_prints=True)
def logical_backup(operator: str = "scheduler") -> str:
    """Take a full logical backup of the primary; returns the backup id."""
    logger = get_run_logger()
    backup_id = backup_id_for_this_run("backup-id")
    audit_id = attempt_scoped_uuid("backup-audit")
    logger.info("backup %s starting (operator %s)", backup_id, operator)
    database = "unknown"
    try:
        database = steps.preflight()["database"]
        audit_backup_started(audit_id, backup_id, operator)
        manifest = steps.dump_encrypt_upload(backup_id, operator)
        steps.write_manifest(manifest)
    except Exception as exc:
        error = scrub(f"{type(exc).__name__}: {exc}")
        try:
            audit_backup_started(audit_id, backup_id, operator)  # no-op if already there
            audit_backup_finished(audit_id, "failed", error=error)
        finally:
            publish_backup_metrics(database, None, None)
            send_notification(
                f"WeDefiDaily backup {backup_id} FAILED",
                "failure",
                {"backup_id": backup_id, "error": error},
            )
        raise
    obj = manifest["object"]
    audit_backup_finished(audit_id, "success", size_bytes=obj["size_bytes"], checksum=obj["sha256"])
    publish_backup_metrics(database, manifest["duration_seconds"], obj["size_bytes"])
    tables = manifest["tables"]
    create_markdown_artifact(
        key="backup-summary",
        markdown=(
            f"# Backup {backup_id}\n\n"
            f"| | |\n|---|---|\n"
            f"| database | {database} (PostgreSQL {manifest['source']['server_version']}) |\n"
            f"| stored | s3://{obj['bucket']}/{obj['key']} |\n"
            f"| size | {obj['size_bytes']:,} bytes ({obj['storage_class']}, SSE {obj['sse']}) |\n"
            f"| sha256 | `{obj['sha256']}` |\n"
            f"| tables / rows | {len(tables)} / {sum(t['rows'] for t in tables.values()):,} |\n"
            f"| duration | {manifest['duration_seconds']:.1f} s |\n"
        ),
        description=f"logical backup {backup_id}",
    )
    return backup_id
