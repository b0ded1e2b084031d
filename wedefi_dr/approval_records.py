"""Approval requests and authenticated approvals in the ops database.

A run that needs approval opens a request (as the application role, which the server
records as the requester); approvers answer it by inserting a row while connected as their
own login role. The tables, their trigger and row security (``approvals.sql``) refuse what
the rule forbids before it is written; this module turns those refusals into
:class:`~wedefi_dr.approval.ApprovalRefused` with the server's own message.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import psycopg2
from psycopg2.extensions import make_dsn, parse_dsn

from wedefi_dr.approval import Approval, ApprovalRefused
from wedefi_dr.errors import InvalidInput
from wedefi_dr.postgres.tools import connect

MAX_JUSTIFICATION = 1000


def open_request(
    ops_dsn: str,
    *,
    request_id: str,
    run_id: str,
    operation: str,
    subject: str,
    production: bool,
    operator: str,
    justification: str,
    timeout_seconds: int,
) -> str:
    """A pending request ``request_id`` for ``run_id`` that expires with the pause; an
    earlier pending request of the same run (a retried run) expires first. Idempotent."""
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE approval_request SET status = 'expired'"
            " WHERE run_id = %s AND status = 'pending' AND request_id <> %s",
            (run_id, request_id),
        )
        cur.execute(
            """INSERT INTO approval_request (request_id, run_id, operation, subject, production,
                   requester_role, operator_id, justification, created_at, expires_at)
               VALUES (%s, %s, %s, %s, %s, session_user, %s, %s, now(), now() + %s)
               ON CONFLICT (request_id) DO NOTHING""",
            (
                request_id,
                run_id,
                operation,
                subject[:300],
                production,
                operator,
                justification,
                timedelta(seconds=timeout_seconds),
            ),
        )
    return request_id


def close_request(ops_dsn: str, request_id: str, status: str) -> None:
    """``approved``, ``refused`` or ``expired``: once, from ``pending`` (the trigger)."""
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE approval_request SET status = %s WHERE request_id = %s AND status = 'pending'",
            (status, request_id),
        )


_REQUEST_COLUMNS = (
    "request_id, run_id, operation, subject, production, requester_role, operator_id,"
    " justification, created_at, expires_at"
)


def _request(row: tuple) -> dict[str, object]:
    keys = [k.strip() for k in _REQUEST_COLUMNS.split(",")]
    record = dict(zip(keys, row, strict=True))
    record["request_id"] = str(record["request_id"])
    return record


def pending(ops_dsn: str) -> list[dict[str, object]]:
    """Requests awaiting an answer (not expired), oldest first, with who already answered."""
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            f"""SELECT {_REQUEST_COLUMNS},
                   coalesce((SELECT array_agg(a.approver::text ORDER BY a.id) FROM approval a
                             WHERE a.request_id = r.request_id), '{{}}')
               FROM approval_request r
               WHERE status = 'pending' AND expires_at > now() ORDER BY created_at"""
        )
        return [{**_request(row[:-1]), "approved_by": list(row[-1])} for row in cur.fetchall()]


def pending_for_run(ops_dsn: str, run_id: str) -> dict[str, object]:
    """The pending request of ``run_id``; InvalidInput when there is none."""
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            f"SELECT {_REQUEST_COLUMNS} FROM approval_request"
            " WHERE run_id = %s AND status = 'pending'",
            (run_id,),
        )
        row = cur.fetchone()
    if row is None:
        raise InvalidInput(
            f"run {run_id} has no pending approval request (`wedefi-dr runs pending`)"
        )
    return _request(row)


def approvals(ops_dsn: str, request_id: str) -> list[Approval]:
    """What the approvers answered, as the server recorded it."""
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT approver, approve, emergency_declared, justification FROM approval"
            " WHERE request_id = %s ORDER BY id",
            (request_id,),
        )
        return [Approval(str(a), bool(ok), bool(e), str(j)) for a, ok, e, j in cur.fetchall()]


def approver_dsn(dsn: str, passfile: Path | str | None = None) -> str:
    """The approver's connection: no password inline (it would sit in shell history);
    libpq reads it from ``passfile`` (or PGPASSFILE)."""
    try:
        keywords = parse_dsn(dsn)
    except psycopg2.ProgrammingError as exc:
        raise InvalidInput(f"approver DSN is not a valid connection string: {exc}") from exc
    if "password" in keywords:
        raise InvalidInput("the approver DSN must not carry a password: use --approver-passfile")
    if not keywords.get("user"):
        raise InvalidInput("the approver DSN must name the approver's role (user=...)")
    if passfile is not None:
        path = Path(passfile)
        if not path.is_file():
            raise InvalidInput(f"approver passfile {path} does not exist")
        keywords["passfile"] = str(path)
    return make_dsn(**keywords)


def record_approval(
    approver_dsn: str,
    run_id: str,
    *,
    approve: bool,
    emergency_declared: bool,
    justification: str,
) -> Approval:
    """Insert the approval connected as the approver; the server fills in who they are
    and refuses what the rule forbids (ApprovalRefused, nothing written)."""
    justification = justification.strip()
    if not justification:
        raise InvalidInput("justification is required: why you approve (audit log)")
    if len(justification) > MAX_JUSTIFICATION:
        raise InvalidInput(f"justification: at most {MAX_JUSTIFICATION} characters")
    with connect(approver_dsn, application_name="wedefi-dr approve") as conn:
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT request_id FROM approval_request"
                    " WHERE run_id = %s AND status = 'pending'",
                    (run_id,),
                )
                row = cur.fetchone()
                if row is None:
                    raise ApprovalRefused(
                        f"approval refused: run {run_id} has no pending approval request"
                    )
                cur.execute(
                    """INSERT INTO approval (request_id, approve, emergency_declared, justification)
                       VALUES (%s, %s, %s, %s)
                       RETURNING approver, approve, emergency_declared, justification""",
                    (row[0], approve, emergency_declared, justification),
                )
                a, ok, e, j = cur.fetchone()
        except psycopg2.Error as exc:
            conn.rollback()
            message = (exc.diag.message_primary or str(exc)).strip()
            raise ApprovalRefused(f"{message}; nothing was changed") from exc
    return Approval(str(a), bool(ok), bool(e), str(j))
