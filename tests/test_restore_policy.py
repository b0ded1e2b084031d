"""A restore touches only what it was told to: the target policy, end to end.

Each refusal is a real flow run against the stack's servers: the target is left exactly
as it was, and the refusal is in the audit log with the operator and the justification
(unless the request named neither). Overwriting a database that counts as production
(here: any database on the primary's cluster) pauses for PITR's break-glass approval.
"""

from __future__ import annotations

import re
import uuid

import pytest
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn

from flows.restore import restore_backup
from tests.helpers import BREAK_GLASS, fingerprint, run_approved
from wedefi_dr.approval import ApprovalRefused
from wedefi_dr.config import Settings
from wedefi_dr.errors import InvalidInput, TargetRefused
from wedefi_dr.postgres.conninfo import with_dbname
from wedefi_dr.postgres.tools import connect


def _audit_rows(settings: Settings, justification: str) -> list[tuple]:
    with connect(settings.ops_dsn.get_secret_value()) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT status, operator_id, justification, target, error_message "
            "FROM recovery_audit_log WHERE justification LIKE %s ORDER BY start_time",
            (justification + "%",),
        )
        return cur.fetchall()


def _restore(target_dsn: str, justification: str, **extra: object) -> dict:
    return restore_backup(
        backup_id="latest",
        target_dsn=target_dsn,
        operator="pytest",
        justification=justification,
        **extra,
    )


@pytest.fixture
def holding_data(settings: Settings, scratch_dsn: str) -> str:
    """A database on the primary's cluster holding one table with one row."""
    admin = with_dbname(settings.primary_dsn.get_secret_value(), "postgres")
    with connect(admin, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(
            sql.SQL("CREATE DATABASE {}").format(sql.Identifier(parse_dsn(scratch_dsn)["dbname"]))
        )
    with connect(scratch_dsn) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE keep_me (id int); INSERT INTO keep_me VALUES (42)")
    return scratch_dsn


def _ops_target(settings: Settings, stack) -> str:
    """The ops database, as the superuser would name it (no password: PGPASSFILE)."""
    ops = parse_dsn(settings.ops_dsn.get_secret_value())
    primary = parse_dsn(settings.primary_dsn.get_secret_value())
    ops.pop("password", None)
    return make_dsn(**(ops | {"port": str(stack.ops.port), "user": primary["user"]}))


@pytest.mark.parametrize("dbname", ["template1", "postgres"])
def test_templates_and_maintenance_database_are_never_targets(
    good_backup, settings: Settings, dbname: str
):
    target = with_dbname(settings.primary_dsn.get_secret_value(), dbname)
    before = fingerprint(target)
    why = f"policy {dbname} {uuid.uuid4().hex[:6]}"
    with pytest.raises(TargetRefused, match=f"'{dbname}' is never a restore target"):
        _restore(target, why)
    assert fingerprint(target) == before
    [(status, operator, justification, where, error)] = _audit_rows(settings, why)
    assert (status, operator, justification) == ("refused", "pytest", why)
    assert where.endswith("/" + dbname) and "never a restore target" in error


def test_the_ops_database_is_never_a_target(good_backup, settings: Settings, stack):
    target = _ops_target(settings, stack)
    why = f"policy ops {uuid.uuid4().hex[:6]}"
    with pytest.raises(TargetRefused, match="it is the ops database"):
        _restore(target, why, overwrite=True)
    [(status, operator, _, _, error)] = _audit_rows(settings, why)
    assert (status, operator) == ("refused", "pytest") and "ops database" in error


def test_a_target_holding_data_is_refused_without_overwrite(
    good_backup, settings: Settings, holding_data: str
):
    why = f"policy data {uuid.uuid4().hex[:6]}"
    with pytest.raises(TargetRefused, match=r"holds 1 table\(s\).*--overwrite"):
        _restore(holding_data, why)
    with connect(holding_data) as conn, conn.cursor() as cur:
        cur.execute("SELECT array_agg(id) FROM keep_me")
        assert cur.fetchone()[0] == [42]
    [(status, _, _, _, _)] = _audit_rows(settings, why)
    assert status == "refused"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"approve": True, "emergency_declared": True, "approvers": ["alice"]}, "two distinct"),
        (
            {"approve": True, "emergency_declared": True, "approvers": ["pytest", "PyTest ", "a"]},
            "two distinct",
        ),
        ({"approve": True, "emergency_declared": False, "approvers": ["a", "b"]}, "emergency"),
        ({"approve": False, "emergency_declared": True, "approvers": ["a", "b"]}, "rejected"),
    ],
)
def test_overwriting_production_without_break_glass_is_refused(
    good_backup, settings: Settings, holding_data: str, answer: dict, message: str
):
    why = f"policy approval {uuid.uuid4().hex[:6]}"
    with pytest.raises(ApprovalRefused, match=message):
        run_approved(
            restore_backup,
            answer,
            backup_id="latest",
            target_dsn=holding_data,
            operator="pytest",
            justification=why,
            overwrite=True,
        )
    with connect(holding_data) as conn, conn.cursor() as cur:
        cur.execute("SELECT array_agg(id) FROM keep_me")
        assert cur.fetchone()[0] == [42]
    [(status, _, _, _, error)] = _audit_rows(settings, why)
    assert status == "refused" and message in error


def test_overwriting_production_with_break_glass_proceeds(
    good_backup, settings: Settings, scratch_dsn: str
):
    """A new database on the primary's cluster is no overwrite (no pause); replacing it
    once it holds the restored tables is, and proceeds with the break-glass approval."""
    why = f"policy break-glass {uuid.uuid4().hex[:6]}"
    _restore(scratch_dsn, why + " first")
    result = run_approved(
        restore_backup,
        BREAK_GLASS,
        backup_id="latest",
        target_dsn=scratch_dsn,
        operator="pytest",
        justification=why,
        overwrite=True,
    )
    assert result["tables"] > 0
    first, second = _audit_rows(settings, why)
    assert first[:3] == ("success", "pytest", why + " first")
    assert second[0] == "success" and "approved by alice, bob" in second[2]


def test_a_listed_production_database_needs_break_glass_anywhere(
    good_backup, settings: Settings, stack, env_override
):
    """WEDEFI_DR_PRODUCTION_TARGETS: a database on another server (here the ops cluster,
    which is not the primary's) that holds data counts as production when listed."""
    name = f"listed_{uuid.uuid4().hex[:8]}"
    ops_admin = with_dbname(_ops_target(settings, stack), "postgres")
    target = with_dbname(_ops_target(settings, stack), name)
    with connect(ops_admin, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        env_override(WEDEFI_DR_PRODUCTION_TARGETS=f'["{name}"]')
        _restore(target, f"policy listed first {name}")  # empty: no overwrite, no pause
        env_override(WEDEFI_DR_PRODUCTION_TARGETS=f'["{name}"]')
        why = f"policy listed {uuid.uuid4().hex[:6]}"
        with pytest.raises(ApprovalRefused, match="two distinct"):
            run_approved(
                restore_backup,
                {"approve": True, "emergency_declared": True, "approvers": ["a"]},
                backup_id="latest",
                target_dsn=target,
                operator="pytest",
                justification=why,
                overwrite=True,
            )
        [(_, _, _, _, error)] = _audit_rows(settings, why)
        assert "WEDEFI_DR_PRODUCTION_TARGETS lists it" in error
        env_override(WEDEFI_DR_PRODUCTION_TARGETS="[]")
        result = _restore(target, why + " unlisted", overwrite=True)  # no pause: not production
        assert result["tables"] > 0
    finally:
        with connect(ops_admin, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.mark.parametrize(
    ("operator", "message"),
    [
        (" ", "--operator is required"),
        ("o" * 101, "operator is 101 characters long"),
        ("ops\x85forged", "control character (U+0085)"),
    ],
)
def test_a_request_without_an_operator_the_audit_can_keep_is_refused_without_an_audit_row(
    good_backup, settings: Settings, operator: str, message: str
):
    target = with_dbname(settings.primary_dsn.get_secret_value(), "template1")
    why = f"policy anonymous {uuid.uuid4().hex[:6]}"
    with pytest.raises(InvalidInput, match=re.escape(message)):
        restore_backup(backup_id="latest", target_dsn=target, operator=operator, justification=why)
    assert _audit_rows(settings, why) == []
