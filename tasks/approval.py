"""The approval steps every runbook shares: open the request, decide from the database.

Each decision and each timeout is one row of ``recovery_audit_log`` (``recovery_type``
``approval``): who approved as the server recorded it, or why the run was refused.
"""

from __future__ import annotations

from prefect import get_run_logger, task

from tasks import timeouts
from tasks.common import scrub
from wedefi_dr import approval, approval_records
from wedefi_dr.config import get_settings
from wedefi_dr.observability import audit
from wedefi_dr.runbook import Approvals


def _ops_dsn() -> str:
    settings = get_settings()
    settings.require("ops_dsn")
    return settings.ops_dsn.get_secret_value()


def audit_approval(
    *, run_id: str, subject: str, operator: str, status: str, detail: str, who: list[str]
) -> None:
    """One final row: approvals and refusals are on the record like the recoveries."""
    dsn = _ops_dsn()
    audit_id = audit.recovery_started(
        dsn,
        recovery_type="approval",
        backup_id=None,
        target=subject[:300],
        operator=(", ".join(who) or operator)[:100],
        justification=f"approval of run {run_id} (operator {operator}): {detail}",
    )
    audit.recovery_finished(
        dsn, audit_id, status=status, error=None if status == "success" else scrub(detail)
    )


@task(name=Approvals.OPEN_REQUEST, timeout_seconds=timeouts.SHORT)
def open_request(
    request_id: str,
    run_id: str,
    operation: str,
    subject: str,
    production: bool,
    operator: str,
    justification: str,
    timeout_seconds: int,
) -> str:
    """The pending request approvers answer (`wedefi-dr runs pending` lists it)."""
    approval_records.open_request(
        _ops_dsn(),
        request_id=request_id,
        run_id=run_id,
        operation=operation,
        subject=subject,
        production=production,
        operator=operator,
        justification=justification,
        timeout_seconds=timeout_seconds,
    )
    get_run_logger().info(
        "approval requested for run %s (%s): approve with `wedefi-dr approve %s "
        "--justification ...` as an approver%s",
        run_id,
        operation,
        run_id,
        "; production: two approvers and a declared emergency" if production else "",
    )
    return request_id


@task(name=Approvals.EXPIRE, timeout_seconds=timeouts.SHORT)
def expire(request_id: str, run_id: str, subject: str, operator: str, seconds: int) -> None:
    approval_records.close_request(_ops_dsn(), request_id, "expired")
    audit_approval(
        run_id=run_id,
        subject=subject,
        operator=operator,
        status="refused",
        detail=f"approval timed out after {seconds} s; nothing was changed",
        who=[],
    )


@task(name=Approvals.DECIDE, timeout_seconds=timeouts.SHORT)
def decide(
    request_id: str,
    run_id: str,
    subject: str,
    production: bool,
    operator: str,
    claimed: list[str],
    rejected_in_form: bool,
) -> list[str]:
    """The rule applied to the approvals the database holds for this request; the form's
    names are only compared with them (a name nobody authenticated is refused)."""
    dsn = _ops_dsn()
    found = approval_records.approvals(dsn, request_id)
    who = [a.approver for a in found]
    answers = "; ".join(
        f"{a.approver} {'approved' if a.approve else 'rejected'}"
        f"{' (emergency declared)' if a.emergency_declared else ''}: {a.justification}"
        for a in found
    )
    try:
        approved = approval.decide(
            production=production,
            approvals=found,
            operator=operator,
            claimed=claimed,
            rejected_in_form=rejected_in_form,
            subject=subject,
        )
    except approval.ApprovalRefused as exc:
        approval_records.close_request(dsn, request_id, "refused")
        audit_approval(
            run_id=run_id,
            subject=subject,
            operator=operator,
            status="refused",
            detail=f"{exc} [{answers or 'no authenticated approval'}]",
            who=who,
        )
        raise
    approval_records.close_request(dsn, request_id, "approved")
    audit_approval(
        run_id=run_id, subject=subject, operator=operator, status="success", detail=answers, who=who
    )
    get_run_logger().info("approved by %s (authenticated by the ops database)", ", ".join(approved))
    return approved
