"""What the audit log says about health: totals per kind, the last DR tests, runs left open.

Read-only queries on the ops database. The audit log is the durable record, so every value
here is right after any restart of a worker or of the monitor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from wedefi_dr.postgres.tools import connect

DR_TEST_KIND = "dr_test"
AUDIT_LOGS = ("backup_audit_log", "recovery_audit_log", "retention_audit_log")


def backup_totals(ops_dsn: str, kind: str) -> dict[str, float]:
    """Successes, failures and the end of the newest success and failure of one backup kind
    (``logical``, ``base``): per kind, so a good base backup never makes a failing logical
    backup look fine."""
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """SELECT count(*) FILTER (WHERE status = 'success'),
                      count(*) FILTER (WHERE status = 'failed'),
                      extract(epoch FROM max(end_time) FILTER (WHERE status = 'success')),
                      extract(epoch FROM max(end_time) FILTER (WHERE status = 'failed'))
               FROM backup_audit_log WHERE backup_type = %s""",
            (kind,),
        )
        ok, failed, last_ok, last_failed = cur.fetchone()
    return {
        "success": float(ok),
        "failure": float(failed),
        "last_success": float(last_ok or 0),
        "last_failure": float(last_failed or 0),
    }


@dataclass
class DRTestRecord:
    """The newest passed and failed DR test (Unix times, 0: never) and the newest one."""

    last_success: float
    last_failure: float
    last_status: str | None
    last_started: float | None
    last_seconds: float | None
    last_backup_id: str | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def dr_tests(ops_dsn: str) -> DRTestRecord:
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """SELECT extract(epoch FROM max(end_time) FILTER (WHERE status = 'success')),
                      extract(epoch FROM max(end_time) FILTER (WHERE status = 'failed'))
               FROM recovery_audit_log WHERE recovery_type = %s""",
            (DR_TEST_KIND,),
        )
        ok, failed = cur.fetchone()
        cur.execute(
            """SELECT status, extract(epoch FROM start_time),
                      extract(epoch FROM end_time - start_time), backup_id
               FROM recovery_audit_log WHERE recovery_type = %s AND status <> 'running'
               ORDER BY start_time DESC LIMIT 1""",
            (DR_TEST_KIND,),
        )
        row = cur.fetchone() or (None, None, None, None)
    status, started, seconds, backup_id = row
    return DRTestRecord(
        last_success=float(ok or 0),
        last_failure=float(failed or 0),
        last_status=status,
        last_started=float(started) if started is not None else None,
        last_seconds=float(seconds) if seconds is not None else None,
        last_backup_id=backup_id,
    )


def stale_running(ops_dsn: str, older_than_seconds: float) -> dict[str, int]:
    """Rows still ``running`` that started longer ago than any step may take: a run that
    died without closing its row (invariant 9 says it must not; this is how it shows)."""
    counts = {}
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        for table in AUDIT_LOGS:
            cur.execute(
                f"""SELECT count(*) FROM {table}
                    WHERE status = 'running'
                      AND start_time < (now() AT TIME ZONE 'UTC') - make_interval(secs => %s)""",
                (older_than_seconds,),
            )
            counts[table] = int(cur.fetchone()[0])
    return counts
