"""The audit trail is append-only; secrets reach no log, parameter, artifact or row."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import psycopg2
import pytest

from wedefi_dr.catalog import listing
from wedefi_dr.config import Settings
from wedefi_dr.postgres.tools import connect


def test_audit_log_is_append_only_for_the_application_role(good_backup, settings: Settings):
    ops = settings.ops_dsn.get_secret_value()
    with connect(ops) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_user, count(*) FROM backup_audit_log WHERE status='success'")
        user, successes = cur.fetchone()
    assert user == "wedefi_dr_app" and successes >= 1
    for statement in (
        "DELETE FROM backup_audit_log",
        "TRUNCATE backup_audit_log",
        "UPDATE backup_audit_log SET status = 'failed' WHERE status = 'success'",
        "UPDATE backup_audit_log SET operator_id = 'someone else'",
        "DELETE FROM recovery_audit_log",
    ):
        with pytest.raises(psycopg2.Error), connect(ops) as conn, conn.cursor() as cur:
            cur.execute(statement)
    with connect(ops) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM backup_audit_log WHERE status='success'")
        assert cur.fetchone()[0] == successes


def test_metrics_textfile_has_the_plans_metrics(good_backup, settings: Settings):
    text = (Path(settings.metrics_dir) / "wedefi_dr_logical_backup.prom").read_text()
    for name in (
        "backup_duration_seconds",
        "backup_size_bytes",
        "backup_success_total",
        "backup_failure_total",
        "backup_last_success_timestamp_seconds",
    ):
        assert f"\n{name}{{" in "\n" + text, name
    success = [ln for ln in text.splitlines() if ln.startswith("backup_success_total")]
    assert float(success[0].split()[-1]) >= 1


def _secrets(settings: Settings) -> list[str]:
    import os

    found = [settings.gpg_passphrase.get_secret_value(), os.environ["AWS_SECRET_ACCESS_KEY"]]
    for line in Path(os.environ["PGPASSFILE"]).read_text().splitlines():
        found.append(line.rsplit(":", 1)[1])
    owner = Path(os.environ["WEDEFI_DR_STACK_DIR"]) / "audit-owner.password"
    found.append(owner.read_text().strip())
    return [s for s in found if s]


def test_secrets_never_reach_logs_parameters_artifacts_or_audit(
    good_backup, settings: Settings, store
):
    from prefect.client.orchestration import get_client

    async def everything_prefect_recorded() -> str:
        async with get_client() as client:
            runs = await client.read_flow_runs()
            logs = await client.read_logs()
            artifacts = await client.read_artifacts()
        return json.dumps(
            {
                "parameters": [r.parameters for r in runs],
                "logs": [entry.message for entry in logs],
                "artifacts": [a.data for a in artifacts],
            },
            default=str,
        )

    recorded = asyncio.run(everything_prefect_recorded())
    assert "backup" in recorded and good_backup in recorded  # the check can see real content
    with connect(settings.ops_dsn.get_secret_value()) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT row_to_json(b)::text FROM backup_audit_log b "
            "UNION ALL SELECT row_to_json(r)::text FROM recovery_audit_log r"
        )
        recorded += "".join(row[0] for row in cur.fetchall())
    manifest = listing.resolve(store, good_backup)
    recorded += manifest.model_dump_json()
    for secret in _secrets(settings):
        assert secret not in recorded


def test_setting_the_app_role_password_never_sends_the_password(stack, settings: Settings):
    """The server logs DDL here (``log_statement=ddl``): what it logged for the password
    change must be the SCRAM verifier, never the password, and the role must still log in."""
    from wedefi_dr.observability import audit
    from wedefi_dr.postgres.conninfo import with_dbname

    admin = stack.ops.admin_dsn("wedefi_ops")
    secret = "app-role-password-under-test"
    owner_secret = "owner-role-password-under-test"
    log = stack.ops.log
    with connect(admin, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("ALTER SYSTEM SET log_statement = 'ddl'")
        cur.execute("SELECT pg_reload_conf()")
    start = log.stat().st_size
    try:
        audit.install(admin, app_password=secret, owner_password=owner_secret)
        with connect(admin) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_sleep(0.2)")  # the log line is flushed by then
    finally:
        with connect(admin, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("ALTER SYSTEM RESET log_statement")
            cur.execute("SELECT pg_reload_conf()")
        audit.install(
            admin,
            app_password=stack._secret("ops_app_password"),
            owner_password=stack._audit_owner_password(),
        )
    logged = log.read_bytes()[start:].decode(errors="replace")
    assert "ALTER ROLE wedefi_dr_app PASSWORD 'SCRAM-SHA-256$" in logged
    assert "ALTER ROLE dr_audit_owner LOGIN PASSWORD 'SCRAM-SHA-256$" in logged
    assert secret not in logged and owner_secret not in logged
    app = with_dbname(settings.ops_dsn.get_secret_value(), "wedefi_ops")
    with connect(app) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_user")
        assert cur.fetchone()[0] == "wedefi_dr_app"


def _metric(path: Path, name: str) -> float:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith(name + "{")]
    assert len(lines) == 1, (name, lines)
    return float(lines[0].split()[-1])


def test_a_good_base_backup_does_not_hide_a_failing_logical_backup(
    good_backup, settings: Settings, env_override
):
    """Each kind counts its own runs: after a base backup succeeds and then a logical
    backup fails, the logical backup's metrics still say failed and stale."""
    from flows.backup import logical_backup
    from flows.base_backup import base_backup
    from wedefi_dr.postgres.conninfo import with_dbname

    logical = Path(settings.metrics_dir) / "wedefi_dr_logical_backup.prom"
    last_good = _metric(logical, "backup_last_success_timestamp_seconds")
    failures = _metric(logical, "backup_failure_total")

    base_backup(operator="pytest-metrics")
    env_override(
        WEDEFI_DR_PRIMARY_DSN=with_dbname(settings.primary_dsn.get_secret_value(), "no_such_db")
    )
    with pytest.raises(Exception, match="no_such_db"):
        logical_backup(operator="pytest-metrics")

    assert _metric(logical, "backup_failure_total") == failures + 1
    assert _metric(logical, "backup_last_success_timestamp_seconds") == last_good
    base = Path(settings.metrics_dir) / "wedefi_dr_base_backup.prom"
    assert _metric(base, "backup_success_total") >= 1
    assert _metric(base, "backup_last_success_timestamp_seconds") > last_good
    assert 'kind="base"' in base.read_text() and 'kind="logical"' in logical.read_text()
