"""Runbook: point-in-time recovery (the plan's PITR page, the PostgreSQL 12+ way).

check the target lies in the recoverable window → approval (the run pauses for input;
production is break-glass: emergency declared + two approvers) → audit row 'running' →
stop application services → fetch the newest base backup before the target → write
recovery settings → start and wait until replay pauses at the target → validate the
recovered data → promote with pg_promote() and confirm pg_is_in_recovery() is false →
start application services → audit row 'success' → report.

Resume a paused run from the UI (it shows the approval form) or with
``prefect.flow_runs.resume_flow_run(flow_run_id, run_input={...})``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run

from tasks import pitr as steps
from tasks.common import (
    attempt_scoped_uuid,
    audit_recovery_finished,
    scrub,
    send_notification,
)
from wedefi_dr.physical.pitr import check_approval

RTO_BUDGET_SECONDS = 15 * 60  # the plan's RTO


class PitrApproval(RunInput):
    """What an approver fills in to let a paused recovery continue."""

    approve: bool
    approvers: list[str] = []
    emergency_declared: bool = False
    note: str = ""


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
) -> dict[str, Any]:
    """Recover ``cluster`` to a time, LSN, named restore point or the latest archived WAL.

    ``cluster`` names a cluster of the stack: ``primary`` is production (its data is kept
    aside, never deleted); any other name is a scratch copy that does not archive, unless
    ``becomes_production`` (then it archives into the production archive on a new
    timeline, and the approval is break-glass too).
    """
    logger = get_run_logger()
    t_start = time.monotonic()
    timings: dict[str, float] = {}

    def step(name: str, t0: float) -> None:
        timings[name] = round(time.monotonic() - t0, 3)

    t = time.monotonic()
    request = steps.check_request(
        target_kind,
        target_value,
        inclusive,
        timeline,
        cluster,
        operator,
        justification,
        becomes_production,
    )
    step("check request", t)
    break_glass = request["production"] or request["archives_into_production"]
    logger.info(
        "recover cluster %s to %s from base backup %s; %s approval needed",
        request["cluster"],
        request["target_description"],
        request["base_backup_id"],
        "break-glass (emergency + two approvers)" if break_glass else "one",
    )
    t = time.monotonic()
    approval = pause_flow_run(
        wait_for_input=PitrApproval.with_initial_data(
            description=(
                f"Approve recovery of **{request['cluster']}** to "
                f"{request['target_description']} (operator {operator}). "
                + (
                    "Production: declare the emergency and name two approvers."
                    if break_glass
                    else "Scratch copy: one approver."
                )
            ),
            approve=False,
        ),
        timeout=approval_timeout_seconds,
        poll_interval=2,
        key="pitr-approval",
    )
    audit_id = attempt_scoped_uuid("pitr-audit")
    try:
        approvers = check_approval(
            production=break_glass,
            approve=approval.approve,
            approvers=approval.approvers,
            emergency_declared=approval.emergency_declared,
            operator=operator,
        )
    except Exception as exc:  # a refused request is on the record too; nothing changed
        steps.audit_recovery_started(audit_id, request, operator, justification)
        audit_recovery_finished(audit_id, "failed", error=scrub(str(exc)))
        raise
    step("approval", t)
    logger.info("approved by %s", ", ".join(approvers))

    steps.audit_recovery_started(
        audit_id, request, operator, f"{justification} [approved by {', '.join(approvers)}]"
    )
    try:
        t = time.monotonic()
        steps.stop_application_services()
        step("stop application services", t)
        t = time.monotonic()
        fetched = steps.fetch_base_backup(request)
        step("fetch base backup", t)
        t = time.monotonic()
        steps.write_recovery_settings(request, f"flow run {flow_run.get_id()}")
        step("write recovery settings", t)
        t = time.monotonic()
        reached = steps.start_and_wait(request)
        step("replay to target", t)
        t = time.monotonic()
        validated = steps.validate_recovered(request)
        step("validate", t)
        t = time.monotonic()
        promoted = steps.promote(request)
        step("promote", t)
        t = time.monotonic()
        steps.start_application_services()
        step("start application services", t)
    except Exception as exc:
        error = scrub(f"{type(exc).__name__}: {exc}")
        audit_recovery_finished(audit_id, "failed", error=error)
        send_notification(
            f"WeDefiDaily point-in-time recovery of {request['cluster']} FAILED",
            "failure",
            {
                "cluster": request["cluster"],
                "target": request["target_description"],
                "error": error,
            },
        )
        raise
    audit_recovery_finished(audit_id, "success")
    total = round(time.monotonic() - t_start, 3)
    recovery_seconds = round(total - timings.get("approval", 0) - timings["check request"], 3)
    result = {
        "cluster": request["cluster"],
        "port": request["cluster_port"],
        "base_backup_id": request["base_backup_id"],
        "target": request["target_description"],
        "recovery_point": reached,
        "timeline": promoted["timeline"],
        "tables": validated["tables"],
        "rows": validated["rows"],
        "kept_aside": fetched["kept_aside"],
        "approvers": approvers,
        "timings": timings,
        "recovery_seconds": recovery_seconds,
        "finished_at": datetime.now(UTC).isoformat(),
    }
    create_markdown_artifact(
        key="pitr-report",
        markdown=(
            f"# Point-in-time recovery of {request['cluster']}: promoted\n\n"
            f"- target: {request['target_description']}\n"
            f"- base backup: {request['base_backup_id']} (ended {request['base_backup_end']})\n"
            f"- recovery point reached: LSN {reached['replay_lsn']}, last commit replayed "
            f"{reached['last_replayed_commit']}\n"
            f"- new timeline: {promoted['timeline']}\n"
            f"- validated: {validated['tables']} tables, {validated['rows']:,} rows\n"
            f"- approved by: {', '.join(approvers)}\n"
            f"- time taken (without the approval wait): {recovery_seconds:.1f} s of the "
            f"{RTO_BUDGET_SECONDS // 60}-minute RTO budget\n\n"
            "| step | seconds |\n|---|---|\n"
            + "".join(f"| {k} | {v:.1f} |\n" for k, v in timings.items())
        ),
        description=f"PITR {request['cluster']}",
    )
    return result
