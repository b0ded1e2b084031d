"""Runbook: restore a logical backup into a named database, and prove it.

validate request → (overwriting production: pause for the break-glass approval) → audit
row 'running' → download and verify checksum → decrypt and pg_restore → verify row counts
and content hashes → audit row 'success'.
A refused request (target policy, approval): audit row 'refused', nothing changed.
Failures after that: audit row 'failed'. Both send a notification.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.approval import request_approval_and_wait
from tasks import restore as steps
from tasks.common import (
    attempt_scoped_uuid,
    audit_recovery_finished,
    audit_recovery_started,
    failure_reported,
    publish_summary,
    run_lock,
)
from wedefi_dr.observability.audit import check_operator
from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.runbook import Restore, step_key, timed


@flow(name="restore-backup", log_prints=True)
def restore_backup(
    backup_id: str,
    target_dsn: str,
    operator: str,
    justification: str,
    overwrite: bool = False,
    approval_timeout_seconds: int = 3600,
) -> dict[str, Any]:
    """Restore ``backup_id`` (or ``latest``) into ``target_dsn`` and verify it exactly.

    ``target_dsn`` must not carry a password (flow parameters are visible in the UI):
    libpq finds it in PGPASSFILE. It is parsed here, once; the identity check and
    pg_restore both receive that same parsed target. A target that holds tables is
    replaced only with ``overwrite``; when it also counts as production the run pauses
    for the break-glass approval (the same request, pause and rule as PITR).

    Args:
        backup_id: The backup to restore: an id, or ``latest``.
        target_dsn: The database to restore into (libpq DSN without a password).
        operator: Who asks for the restore, recorded in the audit row.
        justification: Why, recorded in the audit row.
        overwrite: Replace a target that already holds tables.
        approval_timeout_seconds: How long a break-glass restore waits for its approval.
    """
    check_operator(operator)  # before anything: the refusal's audit row could not keep it
    conn_target = ConnTarget.parse(target_dsn, allow_password=False)
    target = conn_target.location
    audit_id = attempt_scoped_uuid("recovery-audit")

    def audit_started(backup: str | None, why: str) -> None:
        audit_recovery_started(
            audit_id=audit_id,
            recovery_type="logical_restore",
            backup_id=backup,
            target=target,
            operator=operator,
            justification=why,
        )

    def record_refusal(error: str) -> None:
        """A refused request is on the record, unless it named no one to record."""
        if operator.strip() and justification.strip():
            audit_started(backup_id, justification)
            audit_recovery_finished(audit_id, "refused", error=error)

    subject = f"WeDefiDaily restore of {backup_id} into {target}"
    with failure_reported(subject, {"backup_id": backup_id, "target": target}, record_refusal):
        checked = steps.validate_request(backup_id, conn_target, operator, justification, overwrite)
    manifest = checked["manifest"]
    resolved = manifest["backup_id"]
    if checked["privileged"]:
        get_run_logger().warning("%s", checked["privileged"])
    why = justification
    if checked["break_glass"]:
        with failure_reported(subject, {"backup_id": resolved, "target": target}, record_refusal):
            approvers = request_approval_and_wait(
                operation="restore",
                subject=f"overwrite {target} with backup {resolved} ({checked['break_glass']})",
                question=(
                    f"Overwrite {target} with backup {resolved}? Break-glass: "
                    f"{checked['break_glass']}. Two approvers other than {operator}, "
                    "emergency declared."
                ),
                production=True,
                operator=operator,
                justification=justification,
                timeout_seconds=approval_timeout_seconds,
                key="break-glass-approval",
            )
        why = f"{justification} [break-glass overwrite approved by {', '.join(approvers)}]"
    audit_started(resolved, why)
    timings: dict[str, dict[str, float]] = {}
    with (
        failure_reported(
            f"WeDefiDaily restore of {resolved} into {target}",
            {"backup_id": resolved, "target": target},
            close_audit=lambda error: audit_recovery_finished(audit_id, "failed", error=error),
        ),
        run_lock("restore", target),
    ):
        with timed() as timings[Restore.DOWNLOAD_VERIFY]:
            ciphertext = steps.download_and_verify(manifest)
        with timed() as timings[Restore.DECRYPT_RESTORE]:
            restored = steps.decrypt_and_restore(manifest, ciphertext, conn_target)
        with timed() as timings[Restore.VERIFY]:
            counts = steps.verify_restore(manifest, conn_target, restored)
    audit_recovery_finished(audit_id, "success")
    seconds = {step_key(step): round(t["seconds"], 3) for step, t in timings.items()}
    get_run_logger().info(
        "restore of %s into %s verified: %d tables, %d rows identical to the backup",
        resolved,
        target,
        counts["tables"],
        counts["rows"],
    )
    publish_summary(
        "restore-summary",
        "restore_summary.md.j2",
        f"restore {resolved}",
        backup_id=resolved,
        target=target,
        timings={str(step): t["seconds"] for step, t in timings.items()},
        **counts,
    )
    return {
        "backup_id": resolved,
        "target": target,
        **counts,
        "timings": seconds,
        # Part of decrypt_restore: the tables' fingerprints, taken before COMMIT (building a
        # new database: the part taken after the load, before it took the target's name).
        "tables_fingerprinted_seconds": restored["verify_seconds"],
        "privilege_warning": checked["privileged"],
    }
