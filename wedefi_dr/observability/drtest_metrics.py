"""The DR test's metrics: recovery_test_success_rate, dr_test_duration_seconds, rto_seconds.

Like the backup metrics, the rate is derived from the durable record (the
``recovery_audit_log`` rows of kind ``dr_test``), not from process memory: every attempt
of every DR test is a row there, so the rate is right after any restart.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from wedefi_dr.observability.metrics import MetricSet
from wedefi_dr.observability.records import DR_TEST_KIND
from wedefi_dr.postgres.tools import connect

AUDIT_KIND = DR_TEST_KIND
RATE_WINDOW = 12  # the last 12 attempts: a year of monthly tests


def success_rate(ops_dsn: str, window: int = RATE_WINDOW) -> tuple[float, int]:
    """Share of successful DR test attempts among the last ``window`` finished ones."""
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """SELECT count(*) FILTER (WHERE status = 'success'), count(*) FROM (
                   SELECT status FROM recovery_audit_log
                   WHERE recovery_type = %s AND status IN ('success', 'failed')
                   ORDER BY start_time DESC LIMIT %s) recent""",
            (AUDIT_KIND, window),
        )
        ok, total = cur.fetchone()
    return (ok / total if total else 0.0), total


def dr_test_registry(
    *,
    database: str,
    success: bool,
    rate: float,
    duration_seconds: float,
    rto_seconds: float | None,
    rto_objective_seconds: float,
) -> CollectorRegistry:
    """The DR test job's group (``wedefi_dr_dr_test``, by database)."""
    db = {"database": database}
    m = MetricSet()
    m.gauge(
        "recovery_test_success_rate",
        f"Share of successful DR tests among the last {RATE_WINDOW} attempts.",
        rate,
        **db,
    )
    m.gauge(
        "recovery_test_last_success",
        "1 when the last DR test passed, 0 when it failed.",
        1 if success else 0,
        **db,
    )
    m.gauge(
        "dr_test_duration_seconds",
        "Wall time of the last DR test run, provisioning to teardown.",
        duration_seconds,
        **db,
    )
    m.gauge(
        "rto_seconds",
        "Measured recovery time of the last DR test (restore start to validated); "
        "-1 when the copy was never validated.",
        rto_seconds if rto_seconds is not None else -1,
        **db,
    )
    m.gauge("rto_objective_seconds", "The recovery time objective.", rto_objective_seconds, **db)
    return m.registry()
