"""The audit trail: ``backup_audit_log``, ``recovery_audit_log`` and ``retention_audit_log``
in the ops database, hash-chained in ``audit_chain`` (:mod:`.audit_schema`).

The application cannot forge it: it holds no write privilege on any table, only the
``audit_start``/``audit_finish``/``audit_abandon`` functions, which set times and status
themselves. Each start is bound to a random token that only this process knows (the
server keeps its sha256), so a run finishes only the rows it started; a retried start or
finish in the same process reuses the token and changes nothing twice.

A run that dies (SIGKILL, a lost worker) cannot finish its row: the next start of the
same operation and target, or ``wedefi-dr audit sweep``, marks it ``abandoned`` — a new
chain event naming the evidence (the starter's process is gone, it holds no lock session).

Secrets never go in: targets are stored as redacted DSNs and error messages are passed
through :func:`scrub`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql

from wedefi_dr.errors import DRError, InvalidInput
from wedefi_dr.observability.audit_schema import APP_ROLE, LOGS, OWNER_ROLE, install
from wedefi_dr.postgres.tools import connect

__all__ = ["APP_ROLE", "OWNER_ROLE", "install"]

log = logging.getLogger(__name__)

# 'refused': a request turned down before anything changed.
FINAL_STATUSES = ("success", "failed", "refused")
OPERATOR_MAX = 100
# The database's own refusals (wrong token, a field the caller may not set, a live starter).
_REFUSALS = {"42501", "22023", "55006"}

# audit id -> the token its start was bound to; only this process ever knows it.
_TOKENS: dict[str, str] = {}


class AuditRefused(DRError):
    """The ops database refused an audit write: a row another run started, a field the
    application may not set, a starter that is still alive."""


_SECRETISH = re.compile(r"(password|passphrase|secret|aws_secret_access_key)\s*[=:]\s*\S+", re.I)
# Where PostgreSQL's messages quote row data (a key, a failing row, a value that did not
# parse, a COPY line: the quoted text after a colon): the value goes, the names and the
# reason stay. Each runs to the last bracket or quote of its line, as a value may itself
# hold brackets or quotes.
_ROW_DATA = (
    (re.compile(r"(\bKey \([^\n]*?\)=)\([^\n]*\)"), r"\1(***)"),
    (re.compile(r"(\bFailing row contains )\([^\n]*\)"), r"\1(***)"),
    (re.compile(r'(:\s+)"[^\n]*"'), r'\1"***"'),
    (re.compile(r'(\b(?:value|Token) )"[^\n]*?"(?= is )'), r'\1"***"'),
)


def scrub(message: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove anything that looks like a credential, every known secret, and the row data
    PostgreSQL quotes in its errors (audit rows and notifications outlive the data they
    would copy: a restored row's values must not reach a pager or the audit chain)."""
    message = _SECRETISH.sub(lambda m: f"{m.group(1)}=***", message)
    for pattern, replacement in _ROW_DATA:
        message = pattern.sub(replacement, message)
    for secret in secrets:
        if secret:
            message = message.replace(secret, "***")
    return message[:2000]


def _require_final(status: str) -> None:
    if status not in FINAL_STATUSES:
        raise ValueError(f"final status must be one of {FINAL_STATUSES}, not {status!r}")


def check_operator(operator: str) -> str:
    """``operator`` as the audit log can keep it, else :class:`InvalidInput` naming why.

    A run checks it before anything else (its first step), so a name the audit would
    refuse is not first met by the audit of that run's own failure. No control or format
    characters: a newline or a bidi override in a name forges lines in logs and reports.
    """
    if len(operator) > OPERATOR_MAX:
        raise InvalidInput(
            f"operator is {len(operator)} characters long; the audit log keeps at most "
            f"{OPERATOR_MAX}"
        )
    bad = next((ch for ch in operator if unicodedata.category(ch).startswith("C")), None)
    if bad is not None:
        raise InvalidInput(
            f"operator has a control character (U+{ord(bad):04X}); the audit log keeps a "
            "name on one printable line"
        )
    return operator


def _require_operator(operator: str | None) -> None:
    """Refused here too, before the audit write (not a driver error)."""
    if operator is not None:
        check_operator(operator)


# ---- who started a row ------------------------------------------------------------------
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None when it is gone
    or a zombie: with the boot id it tells a live starter from a reused pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def starter() -> dict[str, Any]:
    """This process as the starter of a row: host, pid, its start time and the boot."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "pid_start": _process_start(pid),
        "boot_id": _boot_id(),
    }


def starter_gone(started_by: dict[str, Any] | None) -> str | None:
    """Why the starter of a row is known to be gone, or None when it may still run (it is
    alive, or on another host, where this process cannot look)."""
    if not started_by or started_by.get("host") != socket.gethostname():
        return None
    pid = int(started_by.get("pid") or 0)
    if started_by.get("boot_id") and started_by["boot_id"] != _boot_id():
        return f"host {started_by['host']} rebooted since pid {pid} started it"
    now = _process_start(pid) if pid else None
    if now is None:
        return f"process {pid} on {started_by['host']} is gone"
    if now != started_by.get("pid_start"):
        return f"process {pid} on {started_by['host']} is gone (the pid now names another)"
    return None


# ---- the three database functions ---------------------------------------------------------
def _call(ops_dsn: str, sql: str, args: tuple) -> Any:
    try:
        with connect(ops_dsn) as conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchone()
    except psycopg2.Error as exc:
        if exc.pgcode in _REFUSALS:
            primary = exc.diag.message_primary or str(exc).strip()
            raise AuditRefused(f"audit trail refused: {primary}") from None
        raise


def _start(ops_dsn: str, log_name: str, audit_id: str, fields: dict[str, Any]) -> str:
    """Open (or, on a retry in this process, find again) the ``running`` row ``audit_id``."""
    _require_operator(fields.get("operator_id"))
    token = _TOKENS.setdefault(audit_id, secrets.token_urlsafe(32))
    _call(
        ops_dsn,
        "SELECT audit_id FROM audit_start(%s, %s, %s, %s::jsonb, %s::jsonb)",
        (log_name, audit_id, token, json.dumps(fields, default=str), json.dumps(starter())),
    )
    return audit_id


def _finish(ops_dsn: str, log_name: str, audit_id: str, status: str, fields: dict) -> None:
    """Close the row with the token its start was bound to (a row started by another
    process, or never, is refused by the database)."""
    _require_final(status)
    _call(
        ops_dsn,
        "SELECT audit_finish(%s, %s, %s, %s, %s::jsonb)",
        (log_name, audit_id, _TOKENS.get(audit_id), status, json.dumps(fields, default=str)),
    )


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _utc_text(moment: datetime | None) -> str | None:
    """A moment for a ``TIMESTAMP`` (UTC) column, sent as text: an aware one converted to
    UTC first, since PostgreSQL ignores an offset written into a timestamp literal."""
    if moment is None:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.isoformat()


# ---- abandoned runs -------------------------------------------------------------------------
@dataclass(frozen=True)
class Abandoned:
    """A ``running`` row marked abandoned, and why."""

    log: str
    audit_id: str
    started_at: datetime
    evidence: str


def sweep(
    ops_dsn: str,
    *,
    log_name: str | None = None,
    match: dict[str, Any] | None = None,
    older_than_seconds: float | None = None,
    exclude: str | None = None,
) -> list[Abandoned]:
    """Mark abandoned every ``running`` row whose starter is gone.

    A starter on this host is checked directly (its process, start time and boot). A row
    from another host is marked only when ``older_than_seconds`` says how old is too old.
    The database refuses either while the starter still holds a lock session. ``match``
    narrows to one operation and target (columns of the row)."""
    found: list[Abandoned] = []
    for name, table in LOGS.items():
        if log_name not in (None, name):
            continue
        where = [sql.SQL("status = 'running'")]
        args = []
        for column, value in (match or {}).items():
            where.append(sql.SQL("{} IS NOT DISTINCT FROM %s").format(sql.Identifier(column)))
            args.append(value)
        query = sql.SQL(
            "SELECT id::text, start_time, started_by, "
            "extract(epoch FROM (now() AT TIME ZONE 'UTC') - start_time) "
            "FROM {} WHERE {} ORDER BY start_time"
        ).format(sql.Identifier(table), sql.SQL(" AND ").join(where))
        with connect(ops_dsn) as conn, conn.cursor() as cur:
            cur.execute(query, args)
            rows = cur.fetchall()
        for audit_id, started_at, started_by, age in rows:
            if audit_id == exclude:
                continue
            why = starter_gone(started_by)
            if why is None and older_than_seconds is not None and float(age) > older_than_seconds:
                host = (started_by or {}).get("host", "an unknown host")
                why = (
                    f"started {float(age):.0f} s ago on {host}, older than {older_than_seconds:g} s"
                )
            if why is None:
                continue
            summary = (
                f"{why}; no lock session of it is connected "
                f"(started {started_at:%Y-%m-%d %H:%M:%S} UTC)"
            )
            evidence = {"summary": summary, "checked_by": starter()}
            try:
                marked = _call(
                    ops_dsn,
                    "SELECT audit_abandon(%s, %s, %s::jsonb)",
                    (name, audit_id, json.dumps(evidence)),
                )[0]
            except AuditRefused as exc:
                log.warning("audit row %s left running: %s", audit_id, exc)
                continue
            if marked:
                log.info("audit row %s (%s) marked abandoned: %s", audit_id, name, summary)
                found.append(Abandoned(name, audit_id, started_at, summary))
    return found


def _sweep_before(ops_dsn: str, log_name: str, match: dict[str, Any], audit_id: str) -> None:
    """The next run of an operation closes the rows its dead predecessors left running;
    a failure here never stops the run itself."""
    try:
        marked = sweep(ops_dsn, log_name=log_name, match=match, exclude=audit_id)
    except (DRError, psycopg2.Error) as exc:
        log.warning("could not sweep abandoned %s audit rows: %s", log_name, exc)
        return
    for m in marked:
        log.warning(
            "audit row %s of a dead earlier run marked abandoned: %s", m.audit_id, m.evidence
        )


# ---- backups -------------------------------------------------------------------------------
def backup_started(
    ops_dsn: str, *, audit_id: str, backup_type: str, backup_id: str, operator: str
) -> str:
    """Open the ``running`` row. Keyed by ``audit_id`` so a retried task opens it once."""
    _start(
        ops_dsn,
        "backup",
        audit_id,
        {"backup_type": backup_type, "backup_id": backup_id, "operator_id": operator},
    )
    _sweep_before(ops_dsn, "backup", {"backup_type": backup_type}, audit_id)
    return audit_id


def backup_finished(
    ops_dsn: str,
    audit_id: str,
    *,
    status: str,
    size_bytes: int | None = None,
    checksum: str | None = None,
    error: str | None = None,
) -> None:
    """Move the row this process started to its final state (once; the database enforces it)."""
    _finish(
        ops_dsn,
        "backup",
        audit_id,
        status,
        {"size_bytes": size_bytes, "checksum": checksum, "error_message": error},
    )


# ---- restores, DR tests, PITR -------------------------------------------------------------
def recovery_started(
    ops_dsn: str,
    *,
    recovery_type: str,
    backup_id: str | None,
    target: str,
    operator: str,
    justification: str,
    target_time: datetime | None = None,
    audit_id: str | None = None,
) -> str:
    """Open the ``running`` row of a restore, a DR test, a PITR, a teardown or a refusal."""
    audit_id = audit_id or str(uuid.uuid4())
    _start(
        ops_dsn,
        "recovery",
        audit_id,
        {
            "recovery_type": recovery_type,
            "backup_id": backup_id,
            "target": target,
            "target_time": _utc_text(target_time),
            "operator_id": operator,
            "justification": justification,
        },
    )
    _sweep_before(ops_dsn, "recovery", {"recovery_type": recovery_type, "target": target}, audit_id)
    return audit_id


def recovery_finished(
    ops_dsn: str, audit_id: str, *, status: str, error: str | None = None
) -> None:
    _finish(ops_dsn, "recovery", audit_id, status, {"error_message": error})


def recovery_refused(
    ops_dsn: str,
    *,
    recovery_type: str,
    target: str,
    operator: str,
    justification: str,
    error: str,
    backup_id: str | None = None,
) -> str:
    """A refusal on the record in one call: a row opened and closed ``refused`` (nothing
    was changed). Blank operator or justification cannot be recorded and are named so."""
    audit_id = recovery_started(
        ops_dsn,
        recovery_type=recovery_type,
        backup_id=backup_id,
        target=target[:300],
        operator=operator.strip() or "(not given)",
        justification=justification.strip() or "(not given)",
    )
    recovery_finished(ops_dsn, audit_id, status="refused", error=error)
    return audit_id


def backup_counts(ops_dsn: str, backup_type: str) -> dict[str, float]:
    """Totals and the last success time of one kind of backup (``logical``, ``base``), from
    the audit log: metrics that survive restarts. Per kind, so that a good base backup can
    never make a failing logical backup look recent. An abandoned run is a failure."""
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """SELECT count(*) FILTER (WHERE status = 'success'),
                      count(*) FILTER (WHERE status IN ('failed', 'abandoned')),
                      extract(epoch FROM max(end_time) FILTER (WHERE status = 'success'))
               FROM backup_audit_log WHERE backup_type = %s""",
            (backup_type,),
        )
        ok, failed, last = cur.fetchone()
    return {"success": ok, "failure": failed, "last_success": float(last or 0)}


# ---- data retention --------------------------------------------------------------------
def retention_started(
    ops_dsn: str,
    *,
    run_id: str,
    database: str,
    table: str,
    action: str,
    cutoff: datetime,
    operator: str,
    audit_id: str | None = None,
) -> str:
    """Open the ``running`` row for one table of one retention run."""
    audit_id = audit_id or str(uuid.uuid4())
    _start(
        ops_dsn,
        "retention",
        audit_id,
        {
            "run_id": run_id,
            "database_name": database,
            "table_name": table,
            "action": action,
            "cutoff": _utc_text(cutoff),
            "operator_id": operator,
        },
    )
    _sweep_before(ops_dsn, "retention", {"database_name": database, "table_name": table}, audit_id)
    return audit_id


def retention_finished(
    ops_dsn: str,
    audit_id: str,
    *,
    status: str,
    removed: int = 0,
    archived: int = 0,
    summarized: int = 0,
    cascaded: dict[str, int] | None = None,
    batches: int = 0,
    error: str | None = None,
) -> None:
    """Move the row to its final state with what the table's batches did (committed work)."""
    _finish(
        ops_dsn,
        "retention",
        audit_id,
        status,
        {
            "rows_removed": removed,
            "rows_archived": archived,
            "rows_summarized": summarized,
            "rows_cascaded": dict(sorted((cascaded or {}).items())),
            "batches": batches,
            "error_message": error,
        },
    )


def retention_totals(ops_dsn: str, database: str) -> list[dict[str, object]]:
    """Per table: rows removed/archived/summarized by successful runs, and failures.

    The durable source of the retention counters (same reason as :func:`backup_counts`).
    """
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """SELECT table_name, action,
                      coalesce(sum(rows_removed) FILTER (WHERE status = 'success'), 0),
                      coalesce(sum(rows_archived) FILTER (WHERE status = 'success'), 0),
                      coalesce(sum(rows_summarized) FILTER (WHERE status = 'success'), 0),
                      count(*) FILTER (WHERE status IN ('failed', 'abandoned')),
                      extract(epoch FROM max(end_time) FILTER (WHERE status = 'success'))
               FROM retention_audit_log WHERE database_name = %s
               GROUP BY table_name, action ORDER BY table_name""",
            (database,),
        )
        return [
            {
                "table": t,
                "action": a,
                "removed": int(rm),
                "archived": int(ar),
                "summarized": int(su),
                "failed": int(f),
                "last_success": float(last or 0),
            }
            for t, a, rm, ar, su, f, last in cur.fetchall()
        ]


def recent(ops_dsn: str, *, log_name: str | None = None, limit: int = 20) -> list[dict]:
    """The latest rows of one log or all three, newest first (``wedefi-dr audit list``)."""
    parts = []
    for name, table in LOGS.items():
        if log_name in (None, name):
            kind = {"backup": "backup_type", "recovery": "recovery_type"}.get(name, "action")
            target = {"backup": "backup_id", "recovery": "target"}.get(name, "table_name")
            parts.append(
                f"SELECT '{name}' AS log, id::text, {kind} AS kind, {target}::text AS target, "
                f"status, operator_id, start_time, end_time, error_message FROM {table}"
            )
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(" UNION ALL ".join(parts) + " ORDER BY start_time DESC LIMIT %s", (limit,))
        columns = [d[0] for d in cur.description]
        return [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]
