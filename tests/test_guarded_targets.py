"""Destructive commands act only on what this system made: ``dr-test teardown`` on a
marked DR environment folder, ``seed --reset`` on a sample database, the DR test's
``--provider dsn`` and damage drill on a database the DR test created."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg2 import sql

from wedefi_dr.config import PROJECT_ROOT, Settings
from wedefi_dr.drtest import drill
from wedefi_dr.drtest.environments import ENV_MARKER, ExistingServerProvider, LocalClusterProvider
from wedefi_dr.errors import InvalidInput, TargetRefused
from wedefi_dr.postgres.conninfo import dbname_of, with_dbname
from wedefi_dr.postgres.tools import connect
from wedefi_dr_dev import seed as seeding


@pytest.fixture
def env_root() -> Iterator[Path]:
    # Not pytest's tmp_path (mode 700): the postgres OS user must reach a DR cluster.
    root = Path(tempfile.mkdtemp(prefix="wedefi-guard-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _teardown(name: str, env_root: Path, operator: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WEDEFI_DR_DR_ENV_DIR": str(env_root / "envs")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "wedefi_dr_cli.app",
            "dr-test",
            "teardown",
            name,
            "--operator",
            operator,
        ],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _teardown_rows(settings: Settings, operator: str) -> list[tuple[str, str]]:
    with connect(settings.ops_dsn.get_secret_value()) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT status, coalesce(error_message, '') FROM recovery_audit_log "
            "WHERE recovery_type = 'dr_teardown' AND operator_id = %s ORDER BY start_time",
            (operator,),
        )
        return cur.fetchall()


def _fake_cluster(folder: Path) -> Path:
    """What teardown would stop and delete: a folder with a data directory."""
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "PG_VERSION").write_text("15\n")
    return folder


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "unmarked"])
def test_teardown_refuses_anything_but_a_marked_environment(
    settings: Settings, env_root: Path, kind: str
):
    (env_root / "envs").mkdir()
    victim = _fake_cluster(env_root / "victim")
    name = {
        "dotdot": "../victim",
        "absolute": str(victim),
        "unmarked": _fake_cluster(env_root / "envs" / "dr-unmarked").name,
    }[kind]
    operator = f"pytest-teardown-{uuid.uuid4().hex[:6]}"
    result = _teardown(name, env_root, operator)
    assert result.returncode == 2, result.stderr
    assert "nothing was stopped or removed" in result.stderr
    assert (victim / "data" / "PG_VERSION").exists()
    assert (env_root / "envs").exists()
    if kind == "unmarked":
        assert (env_root / "envs" / "dr-unmarked" / "data" / "PG_VERSION").exists()
    [(status, error)] = _teardown_rows(settings, operator)
    assert status == "refused" and "nothing was stopped" in error


def test_teardown_removes_a_provisioned_environment(settings: Settings, env_root: Path):
    provider = LocalClusterProvider(env_root / "envs", settings.dr_app_role, fast=True)
    env = provider.provision(f"dr-guard-{uuid.uuid4().hex[:6]}")
    assert (Path(env.home) / ENV_MARKER).is_file()
    operator = f"pytest-teardown-{uuid.uuid4().hex[:6]}"
    result = _teardown(env.name, env_root, operator)
    assert result.returncode == 0, result.stderr
    assert not Path(env.home).exists()
    assert _teardown_rows(settings, operator) == [("success", "")]


@pytest.fixture
def data_db(settings: Settings) -> Iterator[str]:
    """A database that holds one table the seed did not make."""
    name = f"guard_{uuid.uuid4().hex[:8]}"
    admin = with_dbname(settings.primary_dsn.get_secret_value(), "postgres")
    with connect(admin, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = with_dbname(settings.primary_dsn.get_secret_value(), name)
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            'CREATE TABLE "Wallet" (id text primary key); INSERT INTO "Wallet" VALUES (\'w\')'
        )
    yield dsn
    with connect(admin, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _wallets(dsn: str) -> int:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute('SELECT count(*) FROM "Wallet"')
        return cur.fetchone()[0]


def test_seed_reset_refuses_a_database_it_did_not_make(data_db: str):
    with pytest.raises(InvalidInput, match="not a sample database"):
        seeding.prepare(data_db, reset=True)
    assert _wallets(data_db) == 1


def test_seed_reset_accepts_the_sample_database_it_made(settings: Settings, scratch_dsn: str):
    admin = with_dbname(settings.primary_dsn.get_secret_value(), "postgres")
    name = dbname_of(scratch_dsn)
    with connect(admin, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    seeding.prepare(scratch_dsn)
    seeding.seed(scratch_dsn, 0.05)
    seeding.prepare(scratch_dsn, reset=True)
    assert _wallets(scratch_dsn) == 0


def test_the_dsn_provider_refuses_an_existing_database_holding_data(
    settings: Settings, data_db: str
):
    with pytest.raises(TargetRefused, match=r"holds 1 table\(s\)"):
        ExistingServerProvider(data_db, settings.dr_app_role).provision("dr-guard")
    assert _wallets(data_db) == 1


def test_the_damage_drill_runs_only_on_a_database_the_dr_test_created(data_db: str):
    with pytest.raises(InvalidInput, match="did not create"):
        drill.damage_copy(data_db, {}, ["delete_wallets"])
    assert _wallets(data_db) == 1
