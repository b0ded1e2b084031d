"""Runbook: point-in-time recovery (the plan's PITR page, the PostgreSQL 12+ way).

1. check the request: the target lies in the recoverable window (an LSN inside the
   archive, a numeric timeline archived, a restore-point name the server can read), the
   cluster is described
2. approval: the run opens a request and pauses; approvers answer as their own database
   role (``wedefi-dr approve RUN_ID``); production is break-glass (emergency declared +
   two authenticated approvers other than the operator); a timeout is audited and changes
   nothing
3. audit row 'running'
4. stage and verify the base backup beside the data directory (the cluster still runs);
   with ``delta``, a stopped non-production copy of the same system instead gets the base
   backup applied to its own directory, only what differs rewritten, then verified
5. stop application services
6. stop the cluster, keep its data aside, rename the verified backup into place
7. push WAL the old server had not archived (production; what fails is kept and named)
8. write recovery settings (recovery.signal, restore_command, targets)
9. start the server and wait for replay to reach the target
10. validate the recovered data
11. promote with pg_promote() and confirm pg_is_in_recovery() is false; a cluster that
    becomes production is marked so in the clusters file (atomic, audited; a file we may
    not write is named with the key the operator must set)
12. start application services; audit row 'success'; report against the RTO objective

A failure after step 5 rolls back: the recovered server stopped and kept aside, the
original data directory renamed back and started as it was, the application started
again; the error and the audit row say so.

Each step is a task named by ``wedefi_dr.runbook.PITR``; the timings and the report use
the same names. ``wedefi-dr approve RUN_ID`` records an approval and resumes the run once
the rule is met; the UI's Resume works too, but only approvals in the database count.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.approval import request_approval_and_wait
from tasks import pitr as steps
from tasks.common import (
    attempt_scoped_uuid,
    audit_recovery_finished,
    audit_recovery_started,
    failure_reported,
    run_lock,
)
from wedefi_dr.config import get_settings
from wedefi_dr.physical.pitr.recovery import RolledBack
from wedefi_dr.physical.pitr.report import render_markdown
from wedefi_dr.runbook import PITR, step_key, timed


@flow(name="point-in-time-recovery", log_prints=True)
def point_in_time_recovery(
    target_kind: str,
    operator: str,
    justification: str,
    target_value: str = "",
    inclusive: bool = False,
    timeline: str = "latest",
    cluster: str = "pitr-scratch",
    becomes_production: bool = False,
    approval_timeout_seconds: int = 3600,
    delta: bool = False,
) -> dict[str, Any]:
    """Recover ``cluster`` to a time, LSN, named restore point or the latest archived WAL.

    ``cluster`` names a cluster of the clusters file (``WEDEFI_DR_CLUSTERS_FILE``). One
    described ``production: true`` is recovered break-glass, its old data kept aside; any
    other is a scratch copy that does not archive, unless ``becomes_production`` (then it
    archives into the production archive on a new timeline, and the approval is
    break-glass too).

    Args:
        target_kind: ``time``, ``lsn``, ``name`` (a restore point) or ``latest``.
        operator: Who asks for the recovery, recorded in the audit row.
        justification: Why, recorded in the audit row and shown to the approvers.
        target_value: The time (ISO 8601, with zone), LSN or restore point name.
        inclusive: Stop just after the target instead of just before it.
        timeline: The timeline to recover along (``latest`` or a number).
        cluster: The cluster of the clusters file to recover into.
        becomes_production: The recovered cluster becomes the primary (break-glass).
        approval_timeout_seconds: How long the run waits for its approval.
        delta: Apply the base backup to the cluster's own data directory, rewriting only
            what differs, instead of staging a full copy beside it: for a stopped,
            non-production copy of the same system (refused otherwise); there is no old
            directory to roll back to.
    """
    timings: dict[PITR, dict[str, float]] = {}
    with timed() as timings[PITR.CHECK_REQUEST]:
        request = steps.check_request(
            target_kind,
            target_value,
            inclusive,
            timeline,
            cluster,
            operator,
            justification,
            becomes_production,
            approval_timeout_seconds,
            delta,
        )
    subject = f"WeDefiDaily point-in-time recovery of {request['cluster']}"
    details = {"cluster": request["cluster"], "target": request["target_description"]}
    audit_id = attempt_scoped_uuid("pitr-audit")

    def audit_started(why: str) -> None:
        audit_recovery_started(
            audit_id=audit_id,
            recovery_type="pitr",
            backup_id=request["base_backup_id"],
            target=f"cluster {request['cluster']}: {request['target_description']}",
            target_time=(
                datetime.fromisoformat(request["target_time"]) if request["target_time"] else None
            ),
            operator=operator,
            justification=why,
        )

    def record_refusal(error: str) -> None:
        """A refused request is on the record too (nothing was changed)."""
        audit_started(justification)
        audit_recovery_finished(audit_id, "failed", error=error)

    with timed() as timings[PITR.APPROVAL]:
        question = steps.request_approval(request, operator)
        with failure_reported(subject, details, close_audit=record_refusal):
            approvers = request_approval_and_wait(
                operation="pitr",
                subject=subject,
                question=question,
                production=request["archives_into_production"],
                operator=operator,
                justification=justification,
                timeout_seconds=approval_timeout_seconds,
                key=step_key(PITR.APPROVAL),
            )

    recovery_started = time.monotonic()
    audit_started(f"{justification} [approved by {', '.join(approvers)}]")
    with (
        failure_reported(
            subject,
            details,
            close_audit=lambda error: audit_recovery_finished(audit_id, "failed", error=error),
        ),
        run_lock("pitr", request["cluster"]),
    ):
        staged: str | None = None
        applied: dict[str, int] | None = None
        if request["delta"]:
            with timed() as timings[PITR.DELTA_RESTORE]:
                applied = steps.delta_restore_base_backup(request)
        else:
            with timed() as timings[PITR.STAGE_BASE_BACKUP]:
                staged = steps.stage_base_backup(request)
        with timed() as timings[PITR.STOP_APPLICATION]:
            stopped_apps = steps.stop_application_services()
        swapped: dict[str, Any] | None = None
        try:
            if staged is None:  # delta: the stopped copy's own directory holds the backup
                swapped = {"kept_aside": None, "was_running": False}
            else:
                with timed() as timings[PITR.STOP_AND_SWAP]:
                    swapped = steps.stop_and_swap(request, staged)
            with timed() as timings[PITR.PUSH_UNARCHIVED_WAL]:
                salvaged = steps.push_unarchived_wal(request, swapped["kept_aside"])
            with timed() as timings[PITR.WRITE_RECOVERY_SETTINGS]:
                steps.write_recovery_settings(request, f"flow run {flow_run.get_id()}")
            with timed() as timings[PITR.START_AND_REPLAY]:
                reached = steps.start_and_wait(request)
            with timed() as timings[PITR.VALIDATE]:
                validated = steps.validate_recovered(request)
            with timed() as timings[PITR.PROMOTE]:
                promoted = steps.promote(request)
        except Exception as exc:
            if swapped is None:
                rolled = "the data directory was not replaced"
            else:
                with timed() as timings[PITR.ROLL_BACK]:
                    try:
                        rolled = steps.roll_back(request, swapped)
                    except Exception as failed:
                        rolled = (
                            f"ROLLBACK FAILED ({type(failed).__name__}: {failed}); the original "
                            f"data directory is at {swapped['kept_aside']}"
                        )
            if stopped_apps:
                steps.start_application_services()
                rolled += "; application services started again"
            raise RolledBack(f"{type(exc).__name__}: {exc}\n[{rolled}]") from exc
        roles = None
        if request["becomes_production"]:
            with timed() as timings[PITR.CLUSTERS_FILE]:
                roles = steps.record_production(request, operator, justification)
        with timed() as timings[PITR.START_APPLICATION]:
            steps.start_application_services()
    audit_recovery_finished(audit_id, "success", error=roles and roles["operator_action"])

    result = {
        "cluster": request["cluster"],
        "port": request["cluster_port"],
        "base_backup_id": request["base_backup_id"],
        "base_backup_end": request["base_backup_end"],
        "target": request["target_description"],
        "recovery_point": reached,
        "timeline": promoted["timeline"],
        "tables": validated["tables"],
        "rows": validated["rows"],
        "kept_aside": swapped["kept_aside"],
        "unarchived_wal": salvaged,
        "delta": applied,
        "clusters_file": roles,
        "approvers": approvers,
        "timings": {step.value: round(t["seconds"], 3) for step, t in timings.items()},
        "recovery_seconds": round(time.monotonic() - recovery_started, 3),
        "rto_objective_seconds": get_settings().dr_rto_objective_seconds,
        "finished_at": datetime.now(UTC).isoformat(),
    }
    create_markdown_artifact(
        key="pitr-report",
        markdown=render_markdown(result),
        description=f"PITR {request['cluster']}",
    )
    return result
