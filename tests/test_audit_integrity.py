"""The audit trail cannot be forged by the application, and tampering is detected.

As the application role (the flows' ops DSN): no direct write reaches an audit table, a
row can be finished only by the run that started it. As the superuser (who can bypass
any grant): an edited, deleted or reordered row is named by ``wedefi-dr audit verify``.
A run killed with SIGKILL leaves no row ``running`` for good: a sweep marks it abandoned.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql

from wedefi_dr.config import Settings
from wedefi_dr.observability import audit, audit_chain
from wedefi_dr.postgres import locks
from wedefi_dr.postgres.tools import connect

CLI = str(Path(sys.executable).parent / "wedefi-dr")


def _ops(settings: Settings) -> str:
    return settings.ops_dsn.get_secret_value()


def _status(dsn: str, table: str, audit_id: str) -> str:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT status FROM {table} WHERE id = %s", (audit_id,))
        return cur.fetchone()[0]


def test_the_application_role_cannot_write_audit_rows_directly(stack, settings: Settings):
    ops = _ops(settings)
    own = audit.recovery_started(
        ops,
        recovery_type="pytest_forgery",
        backup_id=None,
        target="forgery-check",
        operator="pytest",
        justification="a row of its own to attack",
    )
    forged = str(uuid.uuid4())
    attempts = [
        # A final row out of nothing: what silenced BackupAge before.
        (
            "INSERT INTO backup_audit_log (id, backup_type, backup_id, start_time, end_time, "
            "status, operator_id) VALUES (%s, 'logical', 'forged', now(), now(), 'success', 'x')",
            (forged,),
        ),
        (
            "INSERT INTO recovery_audit_log (id, recovery_type, start_time, status, operator_id, "
            "justification) VALUES (%s, 'dr_test', now(), 'success', 'x', 'y')",
            (forged,),
        ),
        ("UPDATE recovery_audit_log SET status = 'success' WHERE id = %s", (own,)),
        ("UPDATE backup_audit_log SET operator_id = 'someone else'", None),
        ("DELETE FROM retention_audit_log", None),
        ("TRUNCATE backup_audit_log", None),
        (
            "INSERT INTO audit_chain SELECT seq + 1000000, log, row_id, event, recorded_at, "
            "payload, prev_hash, hash FROM audit_chain LIMIT 1",
            None,
        ),
        ("SELECT audit_append('backup', %s, 'finish', '{}'::jsonb)", (forged,)),
        # Through the door it may use, it still may not choose the status or the times.
        (
            "SELECT audit_start('backup', %s, repeat('t', 40), "
            """'{"backup_type": "logical", "status": "success"}'::jsonb, NULL)""",
            (forged,),
        ),
        ("CREATE TABLE public.audit_lock (x int)", None),
    ]
    for statement, args in attempts:
        with (
            pytest.raises(psycopg2.errors.InsufficientPrivilege),
            connect(ops) as conn,
            conn.cursor() as cur,
        ):
            cur.execute(statement, args)
    with connect(ops) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM backup_audit_log WHERE id = %s OR backup_id = 'forged'",
            (forged,),
        )
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT current_user, session_user")
        assert cur.fetchone() == (audit.APP_ROLE, audit.APP_ROLE)
    assert _status(ops, "recovery_audit_log", own) == "running"
    audit.recovery_finished(ops, own, status="success")
    assert _status(ops, "recovery_audit_log", own) == "success"


def test_a_run_cannot_finish_a_row_it_did_not_start(stack, settings: Settings):
    ops = _ops(settings)
    theirs = audit.backup_started(
        ops,
        audit_id=str(uuid.uuid4()),
        backup_type="pytest_forgery",
        backup_id="their-backup",
        operator="pytest",
    )
    token = audit._TOKENS.pop(theirs)  # this process is now any other run
    try:
        with pytest.raises(audit.AuditRefused, match="not started by this run"):
            audit.backup_finished(ops, theirs, status="success", size_bytes=1, checksum="x")
        with (
            pytest.raises(psycopg2.errors.InsufficientPrivilege, match="not started by this run"),
            connect(ops) as conn,
            conn.cursor() as cur,
        ):
            cur.execute(
                "SELECT audit_finish('backup', %s, %s, 'success', '{}'::jsonb)",
                (theirs, "a-guess-" + "0" * 40),
            )
        with pytest.raises(audit.AuditRefused, match="started by another run"):
            audit.backup_started(
                ops,
                audit_id=theirs,
                backup_type="pytest_forgery",
                backup_id="their-backup",
                operator="pytest",
            )
        assert _status(ops, "backup_audit_log", theirs) == "running"
    finally:
        audit._TOKENS[theirs] = token
    audit.backup_finished(ops, theirs, status="failed", error="closed by its own run")
    audit.backup_finished(ops, theirs, status="success")  # a final row stays as it is
    assert _status(ops, "backup_audit_log", theirs) == "failed"


@pytest.fixture
def tamper_db(stack) -> Iterator[tuple[str, str]]:
    """A throwaway ops database with the audit schema and a few events: ``(admin, app)``
    DSNs. Tampering happens here, never in the session's ops database."""
    name = f"ops_tamper_{uuid.uuid4().hex[:8]}"
    stack.ops.create_database(name)
    admin = stack.ops.admin_dsn(name)
    try:
        audit.install(admin)
        password = stack._secret("ops_app_password")
        app = f"{stack.ops.dsn(name, user=audit.APP_ROLE)} password={password}"
        for n in range(3):
            audit_id = audit.backup_started(
                app,
                audit_id=str(uuid.uuid4()),
                backup_type="logical",
                backup_id=f"b{n}",
                operator="pytest",
            )
            audit.backup_finished(app, audit_id, status="failed", error="tamper fixture")
        yield admin, app
    finally:
        with connect(stack.ops.admin_dsn(), autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _as_superuser(admin: str, statement: str, args: tuple = ()) -> None:
    """What only a superuser can do: write with the guard triggers off."""
    with connect(admin) as conn, conn.cursor() as cur:
        cur.execute("SET LOCAL session_replication_role = replica")
        cur.execute(statement, args)


def _swap_events(admin: str, a: int, b: int) -> None:
    _as_superuser(admin, "UPDATE audit_chain SET seq = -seq WHERE seq IN (%s, %s)", (a, b))
    _as_superuser(
        admin,
        "UPDATE audit_chain SET seq = CASE seq WHEN -%s THEN %s ELSE %s END WHERE seq < 0",
        (a, b, a),
    )


def _cli_verify(app: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, "audit", "verify"],
        env={**os.environ, "WEDEFI_DR_OPS_DSN": app},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_verify_names_each_edited_deleted_or_reordered_row(tamper_db):
    admin, app = tamper_db
    clean = audit_chain.verify(app)
    assert (clean.intact, clean.events, clean.rows) == (True, 6, 3), clean.problems
    head = clean.head

    with connect(app) as conn, conn.cursor() as cur:
        cur.execute("SELECT id::text FROM backup_audit_log WHERE backup_id = 'b1'")
        (row,) = cur.fetchone()

    # 1. a row's outcome rewritten (failed -> success)
    _as_superuser(admin, "UPDATE backup_audit_log SET status = 'success' WHERE id = %s", (row,))
    report = audit_chain.verify(app)
    assert report.problems == [
        f"backup_audit_log row {row} differs from chain event 4 in status: "
        "edited outside the audit functions"
    ]
    _as_superuser(admin, "UPDATE backup_audit_log SET status = 'failed' WHERE id = %s", (row,))
    assert audit_chain.verify(app).intact

    # 2. the chain event itself edited
    _as_superuser(
        admin,
        "UPDATE audit_chain SET payload = replace(payload, 'failed', 'success') WHERE seq = 4",
    )
    report = audit_chain.verify(app)
    assert report.problems[0].startswith("chain event 4 (finish of backup row")
    assert "its hash does not match its content (edited)" in report.problems[0]
    _as_superuser(
        admin,
        "UPDATE audit_chain SET payload = replace(payload, 'success', 'failed') WHERE seq = 4",
    )
    assert audit_chain.verify(app).intact

    # 3. two events swapped
    _swap_events(admin, 2, 3)
    report = audit_chain.verify(app)
    assert report.problems[0].startswith("chain event 2 ")
    assert "prev_hash does not match" in report.problems[0]
    _swap_events(admin, 2, 3)
    assert audit_chain.verify(app).intact

    # 4. a row and its events deleted
    _as_superuser(admin, "DELETE FROM audit_chain WHERE row_id = %s", (row,))
    _as_superuser(admin, "DELETE FROM backup_audit_log WHERE id = %s", (row,))
    broken = _cli_verify(app)
    assert broken.returncode == 1
    assert "audit trail BROKEN: chain event 5 " in broken.stderr
    assert "events 3..4 were deleted" in broken.stderr

    # 5. the whole chain rewritten from the first change on: only a kept head tells
    with connect(admin) as conn, conn.cursor() as cur:
        cur.execute("SET LOCAL session_replication_role = replica")
        cur.execute("DELETE FROM audit_chain")
        cur.execute("SET LOCAL ROLE dr_audit_owner")
        cur.execute("SELECT audit_adopt()")
    assert audit_chain.verify(app).intact
    assert not audit_chain.verify(app, expect_head=head).intact


def _start_and_hold(settings: Settings, operator: str) -> subprocess.Popen:
    """A run in a process of its own: it takes its lock, opens its row and waits."""
    code = f"""
import sys, time
from wedefi_dr.observability import audit
from wedefi_dr.postgres import locks
ops = {_ops(settings)!r}
with locks.operation_lock(ops, "pytest-abandon", {operator!r}):
    audit_id = audit.recovery_started(ops, recovery_type="pytest_abandon", backup_id=None,
        target={operator!r}, operator={operator!r}, justification="killed on purpose")
    print(audit_id, flush=True)
    time.sleep(600)
"""
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    )


def _wait_for_lock_session_to_end(ops: str, pid: int) -> None:
    """The server ends a killed client's session when it sees the socket close."""
    for _ in range(200):
        with connect(ops) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s",
                (f"{locks.APPLICATION_PREFIX} % pid {pid}",),
            )
            if cur.fetchone()[0] == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"the lock session of killed pid {pid} never ended")


def test_a_killed_run_is_marked_abandoned_with_its_evidence(stack, settings: Settings):
    ops = _ops(settings)
    operator = f"pytest-{uuid.uuid4().hex[:6]}"
    child = _start_and_hold(settings, operator)
    try:
        audit_id = child.stdout.readline().strip()
        assert audit_id, "the child did not start its row"
        assert audit.sweep(ops, log_name="recovery", match={"target": operator}) == []
        assert _status(ops, "recovery_audit_log", audit_id) == "running"  # it is alive
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
        _wait_for_lock_session_to_end(ops, child.pid)
        # Its lock session lingering (here: one that claims to be it) keeps the row open.
        impostor = psycopg2.connect(
            ops,
            application_name=f"{locks.APPLICATION_PREFIX} pytest-abandon "
            f"{socket.gethostname()} pid {child.pid}",
        )
        try:
            assert audit.sweep(ops, log_name="recovery", match={"target": operator}) == []
        finally:
            impostor.close()
        assert _status(ops, "recovery_audit_log", audit_id) == "running"
        # The next run of the same operation and target closes it.
        nxt = audit.recovery_started(
            ops,
            recovery_type="pytest_abandon",
            backup_id=None,
            target=operator,
            operator=operator,
            justification="the next run",
        )
        audit.recovery_finished(ops, nxt, status="success")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
        child.stdout.close()
    with connect(ops) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT status, error_message, end_time IS NOT NULL FROM recovery_audit_log "
            "WHERE id = %s",
            (audit_id,),
        )
        status, error, ended = cur.fetchone()
    assert (status, ended) == ("abandoned", True)
    assert f"process {child.pid} on {socket.gethostname()} is gone" in error
    with connect(ops) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT event, payload::jsonb -> 'evidence' FROM audit_chain WHERE row_id = %s "
            "ORDER BY seq",
            (audit_id,),
        )
        events = cur.fetchall()
    assert [e for e, _ in events] == ["start", "abandon"]  # a new event, history kept
    evidence = events[1][1]
    assert evidence["lock_session"] == "none connected"
    assert evidence["started_by"]["pid"] == child.pid and evidence["started_at"]
    assert audit_chain.verify(ops).intact


def test_a_refused_seed_reset_is_on_the_record(settings: Settings, scratch_dsn: str, env_override):
    from wedefi_dr.errors import InvalidInput
    from wedefi_dr.postgres.conninfo import with_dbname
    from wedefi_dr_cli.seed import seed

    name = scratch_dsn.split("dbname=")[1].split()[0]
    admin = with_dbname(scratch_dsn, "postgres")
    with connect(admin, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with connect(scratch_dsn) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE precious (x int); INSERT INTO precious VALUES (1)")
    operator = f"pytest-{uuid.uuid4().hex[:6]}"
    env_override(WEDEFI_DR_PRIMARY_DSN=scratch_dsn)
    with pytest.raises(InvalidInput):
        seed(scale=0.01, reset=True, operator=operator, justification="wipe it, please")
    with connect(scratch_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM precious")
        assert cur.fetchone()[0] == 1
    with connect(_ops(settings)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT recovery_type, status, target, justification, error_message "
            "FROM recovery_audit_log WHERE operator_id = %s",
            (operator,),
        )
        ((kind, status, target, why, error),) = cur.fetchall()
    assert (kind, status, why) == ("seed_reset", "refused", "wipe it, please")
    assert target.endswith(f"/{name}") and error


def test_the_audit_owner_is_a_role_the_flows_cannot_log_in_as(stack, settings: Settings):
    """Everything belongs to the owner; its password is in its own mode-600 file, never in
    the pgpass, the state file or the environment the flows run with."""
    path = stack.audit_owner_password_file
    password = path.read_text().strip()
    assert len(password) >= 24 and path.stat().st_mode & 0o777 == 0o600
    assert password not in stack.pgpass.read_text()
    assert password not in stack.state_path.read_text()
    assert all(password not in value for value in stack.env().values())
    with connect(_ops(settings)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_class c "
            "WHERE c.relname IN ('backup_audit_log', 'recovery_audit_log', "
            "'retention_audit_log', 'audit_chain') ORDER BY 1"
        )
        owners = dict(cur.fetchall())
        cur.execute(
            "SELECT p.proname, p.prosecdef, p.proconfig FROM pg_proc p "
            "WHERE p.proname IN ('audit_start', 'audit_finish', 'audit_abandon')"
        )
        functions = cur.fetchall()
        cur.execute("SELECT pg_has_role(current_user, %s, 'MEMBER')", (audit.OWNER_ROLE,))
        (member,) = cur.fetchone()
    assert set(owners.values()) == {audit.OWNER_ROLE} and len(owners) == 4
    assert len(functions) == 3
    for name, definer, config in functions:
        assert definer and "search_path=pg_catalog, public, pg_temp" in config, name
    assert member is False


def test_an_ops_dsn_that_could_rewrite_the_trail_is_refused(stack):
    """The superuser (or the owner) as the flows' ops login is a misconfiguration that
    would make every guarantee above void: the first audit write says so."""
    with pytest.raises(audit.AuditRefused, match="point WEDEFI_DR_OPS_DSN at the application"):
        audit.backup_started(
            stack.ops.admin_dsn("wedefi_ops"),
            audit_id=str(uuid.uuid4()),
            backup_type="pytest_misconfigured",
            backup_id="none",
            operator="pytest",
        )
