"""A restore lands where its identity check looked, however the target DSN names it.

Invariant 5: the identity check (psycopg2) and ``pg_restore --clean`` are two libpq
clients. Given a target written with ``hostaddr``, with ``service=`` and a service file,
or leaning on the caller's ``PG*`` environment, both must reach the same server and
database, and nothing else may be written. The DSNs are built with libpq's own
``parse_dsn``/``make_dsn`` from the stack's primary DSN.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn

from flows.restore import restore_backup
from tests.helpers import fingerprint
from wedefi_dr.config import Settings
from wedefi_dr.postgres.tools import connect


def _primary(settings: Settings) -> dict[str, str]:
    return parse_dsn(settings.primary_dsn.get_secret_value())


def _restore(backup_id: str, target_dsn: str) -> dict:
    return restore_backup(
        backup_id=backup_id,
        target_dsn=target_dsn,
        operator="pytest",
        justification="conninfo test",
    )


@pytest.fixture
def decoy_dsn(settings: Settings) -> Iterator[str]:
    """Another database on the primary's server, holding one marker table."""
    name = f"decoy_{uuid.uuid4().hex[:10]}"
    admin = make_dsn(**(_primary(settings) | {"dbname": "postgres"}))
    with connect(admin, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = make_dsn(**(_primary(settings) | {"dbname": name}))
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE marker (id int)")
    yield dsn
    with connect(admin, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _tables(dsn: str) -> set[str]:
    """Every table in the database, whoever owns it (read as the superuser)."""
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT LIKE 'pg\\_%' "
            "AND n.nspname <> 'information_schema'"
        )
        return {row[0] for row in cur.fetchall()}


def _ops_as_superuser(settings: Settings, stack) -> str:
    ops = parse_dsn(settings.ops_dsn.get_secret_value())
    return make_dsn(**(ops | {"port": str(stack.ops.port), "user": _primary(settings)["user"]}))


def test_restore_into_a_target_named_by_hostaddr(good_backup, settings: Settings, scratch_dsn):
    """``hostaddr`` without ``host``: the address libpq connects to, no name lookup."""
    params = _primary(settings)
    target = make_dsn(
        hostaddr=params["host"],
        port=params["port"],
        user=params["user"],
        dbname=parse_dsn(scratch_dsn)["dbname"],
        connect_timeout="10",
    )
    result = _restore(good_backup, target)
    assert result["tables"] == 33
    assert (
        result["target"] == f"{params['host']}:{params['port']}/{parse_dsn(scratch_dsn)['dbname']}"
    )
    assert fingerprint(scratch_dsn) == fingerprint(settings.primary_dsn.get_secret_value())


def test_restore_into_a_target_named_by_service(
    good_backup, settings: Settings, scratch_dsn, tmp_path, monkeypatch
):
    """``service=NAME``: server, port and user come from the file PGSERVICEFILE names."""
    params = _primary(settings)
    service_file = tmp_path / "pg_service.conf"
    service_file.write_text(
        f"[wedefi_dr_target]\nhost={params['host']}\nport={params['port']}\nuser={params['user']}\n"
    )
    monkeypatch.setenv("PGSERVICEFILE", str(service_file))
    dbname = parse_dsn(scratch_dsn)["dbname"]
    result = _restore(good_backup, f"service=wedefi_dr_target dbname={dbname}")
    assert result["tables"] == 33
    assert result["target"] == f"service=wedefi_dr_target/{dbname}"
    assert fingerprint(scratch_dsn) == fingerprint(settings.primary_dsn.get_secret_value())


def test_restore_with_stray_pg_environment_lands_where_the_check_looked(
    good_backup, settings: Settings, stack, scratch_dsn, decoy_dsn, monkeypatch
):
    """The caller's shell has PG* defaults: PGPORT supplies the port the DSN leaves out;
    a stray PGHOST (the ops cluster's socket) and PGDATABASE (another database) are
    overridden by the DSN's own host and dbname, for the check and for pg_restore alike."""
    params = _primary(settings)
    dbname = parse_dsn(scratch_dsn)["dbname"]
    before_decoy = fingerprint(decoy_dsn)
    ops_tables = _tables(_ops_as_superuser(settings, stack))
    monkeypatch.setenv("PGPORT", params["port"])
    monkeypatch.setenv("PGHOST", str(stack.ops.home))
    monkeypatch.setenv("PGDATABASE", parse_dsn(decoy_dsn)["dbname"])
    target = make_dsn(host=params["host"], user=params["user"], dbname=dbname)
    result = _restore(good_backup, target)
    assert result["tables"] == 33
    monkeypatch.undo()
    assert fingerprint(scratch_dsn) == fingerprint(settings.primary_dsn.get_secret_value())
    assert _tables(decoy_dsn) == {"public.marker"}
    assert fingerprint(decoy_dsn) == before_decoy
    assert _tables(_ops_as_superuser(settings, stack)) == ops_tables


def test_restore_with_pg_environment_aimed_at_another_server(
    good_backup, settings: Settings, stack, scratch_dsn, monkeypatch
):
    """The caller's PGHOST/PGPORT/PGDATABASE name a real, different server (the ops
    cluster, whose audit tables a ``--clean`` must never touch); PGUSER supplies the user
    the DSN leaves out. The DSN's host, port and dbname win for both libpq clients."""
    params = _primary(settings)
    ops = parse_dsn(settings.ops_dsn.get_secret_value())
    ops_tables = _tables(_ops_as_superuser(settings, stack))
    assert "public.recovery_audit_log" in ops_tables  # the check can see what --clean would drop
    monkeypatch.setenv("PGHOST", ops["host"])
    monkeypatch.setenv("PGPORT", str(stack.ops.port))
    monkeypatch.setenv("PGDATABASE", ops["dbname"])
    monkeypatch.setenv("PGUSER", params["user"])
    dbname = parse_dsn(scratch_dsn)["dbname"]
    target = make_dsn(host=params["host"], port=params["port"], dbname=dbname)
    result = _restore(good_backup, target)
    assert result["tables"] == 33
    monkeypatch.undo()
    assert fingerprint(scratch_dsn) == fingerprint(settings.primary_dsn.get_secret_value())
    assert _tables(_ops_as_superuser(settings, stack)) == ops_tables
