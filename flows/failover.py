"""Runbook: fail over to the streaming standby (break-glass).

1. check the request: operator and justification, both clusters described, the standby
   running and in recovery
2. approval: the same request-and-wait as PITR over production (an emergency declared
   and two authenticated approvers other than the operator); a timeout changes nothing
   and is audited
3. audit row 'running'
4. stop and fence the old primary: a fast shutdown (the standby receives its last WAL),
   then ``standby.signal`` + ``primary_conninfo`` to the new primary and a fence marker
   that every start through a cluster handle refuses (wedefi_dr.physical.standby)
5. production archiving on the standby (its own archive env file)
6. ``pg_promote()``: not in recovery, writable, on a new timeline
7. clusters file: the new primary ``production: true``, the old one ``production: false``
   and ``fenced: true`` (written atomically, audited; a file we may not write is named
   with the keys the operator must change)
8. confirm the archive: a segment of the new timeline (after its ``.history``) archived
9. audit row 'success'; report the new primary, and whether backups and monitoring already
   follow it (WEDEFI_DR_PRIMARY_DSN naming the old primary leads to the new one through the
   clusters file, wedefi_dr.postgres.primary) or the setting must be changed by hand

A failure between the fence and a finished promotion rolls back: the old primary is
unfenced and started again if it ran (the standby, not promoted, stays a standby).

The fence comes before the promotion, so there is never a moment with two primaries.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.approval import request_approval_and_wait
from tasks import failover as steps
from tasks.common import (
    attempt_scoped_uuid,
    audit_recovery_finished,
    audit_recovery_started,
    failure_reported,
    run_lock,
    send_notification,
)
from wedefi_dr.physical.pitr.recovery import RolledBack
from wedefi_dr.runbook import Failover, step_key, timed


@flow(name="failover", log_prints=True)
def failover(
    operator: str,
    justification: str,
    primary: str = "primary",
    standby: str = "standby",
    approval_timeout_seconds: int = 3600,
) -> dict[str, Any]:
    """Promote cluster ``standby`` in place of ``primary`` (both in the clusters file)."""
    timings: dict[Failover, dict[str, float]] = {}
    with timed() as timings[Failover.CHECK_REQUEST]:
        request = steps.check_request(primary, standby, operator, justification)
    subject = f"WeDefiDaily failover {primary} -> {standby}"
    details = {"old_primary": primary, "new_primary": standby}
    audit_id = attempt_scoped_uuid("failover-audit")
    target = f"failover: cluster {primary} -> cluster {standby}"

    def audit_started(why: str) -> None:
        audit_recovery_started(
            audit_id=audit_id,
            recovery_type="failover",
            backup_id=None,
            target=target,
            operator=operator,
            justification=why,
        )

    def record_refusal(error: str) -> None:
        audit_started(justification)
        audit_recovery_finished(audit_id, "failed", error=error)

    with (
        timed() as timings[Failover.APPROVAL],
        failure_reported(subject, details, close_audit=record_refusal),
    ):
        approvers = request_approval_and_wait(
            operation="failover",
            subject=subject,
            question=(
                f"Approve **failover** of {primary} to the standby {standby} "
                f"(operator {operator}): a break-glass change of production."
            ),
            production=True,
            operator=operator,
            justification=justification,
            timeout_seconds=approval_timeout_seconds,
            key=step_key(Failover.APPROVAL),
        )

    audit_started(f"{justification} [approved by {', '.join(approvers)}]")
    with (
        failure_reported(
            subject,
            details,
            close_audit=lambda error: audit_recovery_finished(audit_id, "failed", error=error),
        ),
        run_lock("failover", primary),
    ):
        with timed() as timings[Failover.FENCE]:
            fenced = steps.fence_old_primary(
                request, f"failover to {standby} by {operator} (flow run {flow_run.get_id()})"
            )
        try:
            with timed() as timings[Failover.ARCHIVING]:
                archive_env = steps.configure_archiving(request)
            with timed() as timings[Failover.PROMOTE]:
                promoted = steps.promote(request)
        except Exception as exc:
            if not fenced["fenced"]:
                raise
            with timed() as timings[Failover.ROLL_BACK]:
                rolled = steps.roll_back(request, fenced)
            raise RolledBack(f"{type(exc).__name__}: {exc}\n[{rolled}]") from exc
        with timed() as timings[Failover.CLUSTERS_FILE]:
            roles = steps.update_clusters_file(request, operator, justification)
        with timed() as timings[Failover.CONFIRM_ARCHIVE]:
            archived = steps.confirm_archive(request, promoted["timeline"])
    audit_recovery_finished(
        audit_id,
        "success",
        error=archived["problem"]
        or roles["operator_action"]
        or (None if fenced["fenced"] else fenced["note"]),
    )
    new = request["standby"]
    address = f"{new['host']}:{new['port']}"
    next_steps = steps.next_steps(primary, standby, address)
    result = {
        "new_primary": standby,
        "new_primary_address": address,
        "old_primary": primary,
        "timeline": promoted["timeline"],
        "promoted_at_lsn": promoted["promoted_at_lsn"],
        "fence": fenced,
        "archive_env": archive_env,
        "last_archived_wal": archived["last_archived_wal"],
        "archive_problem": archived["problem"],
        "clusters_file": roles,
        "next_steps": next_steps,
        "approvers": approvers,
        "timings": {step.value: round(t["seconds"], 3) for step, t in timings.items()},
        "finished_at": datetime.now(UTC).isoformat(),
    }
    send_notification(
        f"{subject}: {standby} is the primary (timeline {promoted['timeline']})",
        "success" if not (archived["problem"] or roles["operator_action"]) else "failure",
        {
            **details,
            "fenced": fenced["fenced"],
            "archive_problem": archived["problem"],
            "clusters_file": roles["operator_action"] or "updated",
        },
    )
    create_markdown_artifact(
        key="failover-report",
        markdown=(
            f"# Failover {primary} → {standby}\n\n| | |\n|---|---|\n"
            f"| new primary | {standby} at {result['new_primary_address']} |\n"
            f"| timeline | {promoted['timeline']} (from {promoted['promoted_at_lsn']}) |\n"
            f"| old primary | {fenced['stopped']}; fenced: {fenced['fenced']} |\n"
            f"| archive | last archived {archived['last_archived_wal']} |\n"
            f"| clusters file | {roles['operator_action'] or ', '.join(roles['changes'])} |\n"
            f"| approvers | {', '.join(approvers)} |\n"
            f"| next | {next_steps} |\n"
        ),
        description=f"failover to {standby}",
    )
    return result
