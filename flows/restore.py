"""Runbook: restore a logical backup into a named database, and prove it.

validate request → audit row 'running' → download and verify checksum → decrypt and
pg_restore → verify row counts and content hashes → audit row 'success'.
Failures after validation: audit row 'failed' and a notification.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks import restore as steps
from tasks.common import (
    attempt_scoped_uuid,
    audit_recovery_finished,
    scrub,
    send_notification,
)
from wedefi_dr.postgres.conninfo import ConnTarget


@flow(name="restore-backup", log_prints=True)
def restore_backup(
    backup_id: str,
    target_dsn: str,
    operator: str,
    justification: str,
    overwrite_source: bool = False,
) -> dict[str, Any]:
    """Restore ``backup_id`` (or ``latest``) into ``target_dsn`` and verify it exactly.

    ``target_dsn`` must not carry a password (flow parameters are visible in the UI):
    libpq finds it in PGPASSFILE. It is parsed here, once; the identity check and
    pg_restore both receive that same parsed target.
    """
    logger = get_run_logger()
    conn_target = ConnTarget.parse(target_dsn, allow_password=False)
    manifest = steps.validate_request(
        backup_id, conn_target, operator, justification, overwrite_source
    )
    resolved = manifest["backup_id"]
    target = conn_target.location
    audit_id = attempt_scoped_uuid("recovery-audit")
    steps.audit_recovery_started(audit_id, resolved, target, operator, justification)
    timings: dict[str, float] = {}
    try:
        t = time.monotonic()
        ciphertext = steps.download_and_verify(manifest)
        timings["download_verify"] = time.monotonic() - t
        t = time.monotonic()
        steps.decrypt_and_restore(manifest, ciphertext, conn_target)
        timings["decrypt_restore"] = time.monotonic() - t
        t = time.monotonic()
        counts = steps.verify_restore(manifest, conn_target)
        timings["verify"] = time.monotonic() - t
    except Exception as exc:
        error = scrub(f"{type(exc).__name__}: {exc}")
        audit_recovery_finished(audit_id, "failed", error=error)
        send_notification(
            f"WeDefiDaily restore of {resolved} into {target} FAILED",
            "failure",
            {"backup_id": resolved, "target": target, "error": error},
        )
        raise
    audit_recovery_finished(audit_id, "success")
    result = {
        "backup_id": resolved,
        "target": target,
        **counts,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    logger.info(
        "restore of %s into %s verified: %d tables, %d rows identical to the backup",
        resolved,
        target,
        counts["tables"],
        counts["rows"],
    )
    create_markdown_artifact(
        key="restore-summary",
        markdown=(
            f"# Restore of {resolved} into {target}: verified\n\n"
            f"{counts['tables']} tables, {counts['rows']:,} rows: row counts and content hashes "
            f"equal the manifest's.\n\n| step | seconds |\n|---|---|\n"
            + "".join(f"| {k} | {v:.1f} |\n" for k, v in timings.items())
        ),
        description=f"restore {resolved}",
    )
    return result
