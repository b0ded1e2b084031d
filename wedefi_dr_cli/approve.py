"""``wedefi-dr approve RUN_ID`` and ``wedefi-dr runs pending``: approvals by people whose
identity the ops database checks.

``approve`` connects to the ops database as the approver's own login role (``--as-dsn``,
password from ``--approver-passfile``), inserts the approval (the server records who, and
refuses the requester, a second answer, a role outside ``dr_approver``, an unknown or
expired request), and resumes the paused run once the rule is met, or at once on a
rejection. The run itself then reads the approvals from the database and decides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wedefi_dr_cli.common import print_json, ready, require_text, summarize

runs_app = typer.Typer(no_args_is_help=True, help="Runs waiting for people.")


@runs_app.command("pending")
def pending(
    as_json: Annotated[bool, typer.Option("--json", help="print the records")] = False,
) -> None:
    """Requests awaiting approval: run id, operation, operator, who has answered."""
    from wedefi_dr import approval_records

    settings = ready(settings=("ops_dsn",), servers=("ops_dsn",))
    found = approval_records.pending(settings.ops_dsn.get_secret_value())
    if as_json:
        print_json(found)
        return
    if not found:
        summarize(["no run is waiting for approval"])
        return
    summarize(
        [
            f"{r['run_id']}  {r['operation']}{' (break-glass)' if r['production'] else ''}"
            f"  operator {r['operator_id']}  expires {r['expires_at']:%Y-%m-%d %H:%M:%S %Z}"
            f"  answered by {', '.join(r['approved_by']) or 'nobody yet'}\n    {r['subject']}"
            for r in found
        ]
    )


def approve(
    run_id: Annotated[str, typer.Argument(help="the paused flow run's id")],
    justification: Annotated[str, typer.Option(help="why you approve (audit log)")] = "",
    as_dsn: Annotated[
        str,
        typer.Option(
            "--as-dsn",
            help="your own connection to the ops database (user=<your role>; no password) "
            "[default: WEDEFI_DR_APPROVER_DSN]",
        ),
    ] = "",
    approver_passfile: Annotated[
        Path | None,
        typer.Option(
            help="libpq password file holding your password [default: "
            "WEDEFI_DR_APPROVER_PASSFILE, else PGPASSFILE]"
        ),
    ] = None,
    emergency: Annotated[
        bool, typer.Option("--declare-emergency", help="declare the emergency (production)")
    ] = False,
    reject: Annotated[bool, typer.Option("--reject", help="refuse the run instead")] = False,
) -> None:
    """Approve (or reject) a paused run as yourself; resumes it once approval is complete."""
    import uuid

    from wedefi_dr import approval, approval_records
    from wedefi_dr.errors import InvalidInput
    from wedefi_dr.observability import audit

    try:
        run_id = str(uuid.UUID(run_id))
    except ValueError as exc:
        raise InvalidInput(f"run id {run_id!r} is not a flow run id (a UUID)") from exc
    require_text(justification, "--justification", "why you approve (audit log)")
    settings = ready(settings=("ops_dsn",), servers=("ops_dsn",))
    dsn = approval_records.approver_dsn(
        as_dsn or settings.approver_dsn or _missing_dsn(),
        approver_passfile or settings.approver_passfile,
    )
    ops = settings.ops_dsn.get_secret_value()
    request = approval_records.pending_for_run(ops, run_id)
    try:
        given = approval_records.record_approval(
            dsn,
            run_id,
            approve=not reject,
            emergency_declared=emergency,
            justification=justification,
        )
    except approval.ApprovalRefused as exc:
        audit_id = audit.recovery_started(
            ops,
            recovery_type="approval",
            backup_id=None,
            target=str(request["subject"])[:300],
            operator=_role_of(dsn),
            justification=f"approval of run {run_id} (operator {request['operator_id']}): "
            f"{justification}",
        )
        audit.recovery_finished(ops, audit_id, status="refused", error=str(exc))
        raise
    answers = approval_records.approvals(ops, str(request["request_id"]))
    complete = reject
    waiting = ""
    if not reject:
        try:
            approval.decide(
                production=bool(request["production"]),
                approvals=answers,
                operator=str(request["operator_id"]),
            )
            complete = True
        except approval.ApprovalRefused as exc:
            waiting = str(exc).replace("; nothing was changed", "")
    lines = [
        f"{'rejected' if reject else 'approved'} run {run_id} as {given.approver}"
        f"{' (emergency declared)' if given.emergency_declared else ''}"
    ]
    if complete:
        from flows.approval import resume_with_answer

        resume_with_answer(
            uuid.UUID(run_id), {"approve": not reject, "note": f"answered by {given.approver}"}
        )
        lines.append("the run was resumed; it reads the approvals from the ops database")
    else:
        lines.append(f"recorded; the run stays paused: {waiting}")
    summarize(lines)


def _missing_dsn() -> str:
    from wedefi_dr.errors import InvalidInput

    raise InvalidInput(
        "--as-dsn is required: your own connection to the ops database (or WEDEFI_DR_APPROVER_DSN)"
    )


def _role_of(dsn: str) -> str:
    from psycopg2.extensions import parse_dsn

    return parse_dsn(dsn).get("user", "unknown")[:100]
