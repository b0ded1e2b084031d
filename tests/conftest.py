"""One real stack per test session: PostgreSQL clusters, a moto S3 server, a Prefect API.

Like pghoard's conftest: real servers started once in a temporary folder (fsync off)
and shared by every test, so the suite is both real and fast. Tests that need their own
state make their own databases or backups; none patches boto3, psycopg2 or Prefect.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg2 import sql

from wedefi_dr.config import Settings, apply_prefect_run_defaults, get_settings
from wedefi_dr.postgres.conninfo import with_dbname
from wedefi_dr.postgres.tools import connect
from wedefi_dr.storage.s3 import ObjectStore
from wedefi_dr_dev import seed as seeding
from wedefi_dr_dev.stack import Stack

# Before any test imports Prefect; persisted results whatever the caller's shell says.
os.environ["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] = "true"
apply_prefect_run_defaults()

SEED_SCALE = float(os.environ.get("WEDEFI_DR_TEST_SCALE", "1"))


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    # Not under pytest's tmp_path: that is mode 700 and the postgres user must enter it.
    root = Path(tempfile.mkdtemp(prefix="wedefi-dr-test-"))
    root.chmod(0o755)
    # The control plane comes with the tests that use it (tests/test_control_plane.py).
    s = Stack(root / "stack", fast=True, control_plane=False)
    s.up()
    saved = dict(os.environ)
    os.environ.update(s.env())
    os.environ["PREFECT_HOME"] = str(root / "prefect")
    os.environ["WEDEFI_DR_MULTIPART_CHUNK_BYTES"] = str(5 * 1024 * 1024)
    get_settings.cache_clear()
    try:
        yield s
    finally:
        s.down()
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(stack: Stack) -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
def seeded(settings: Settings) -> dict[str, int]:
    """The WeDefiDaily schema and sample data in the primary database."""
    dsn = settings.primary_dsn.get_secret_value()
    seeding.prepare(dsn, reset=True)
    return seeding.seed(dsn, SEED_SCALE)


@pytest.fixture(scope="session")
def prefect_api(stack: Stack) -> Iterator[None]:
    """A real Prefect API (SQLite, in-process server) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def good_backup(seeded: dict[str, int], prefect_api: None) -> str:
    """One backup of the seeded database taken by the real flow, shared by many tests."""
    from flows.backup import logical_backup

    return logical_backup(operator="pytest")


@pytest.fixture(scope="session")
def store(settings: Settings) -> ObjectStore:
    return ObjectStore(settings)


@pytest.fixture
def scratch_dsn(settings: Settings) -> Iterator[str]:
    """A database name on the primary's server that no one uses; dropped afterwards."""
    name = f"scratch_{uuid.uuid4().hex[:10]}"
    admin = settings.primary_dsn.get_secret_value()
    yield with_dbname(admin, name)
    with connect(with_dbname(admin, "postgres"), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def env_override():
    """Temporarily change WEDEFI_DR_* settings for code that reads get_settings()."""
    saved: dict[str, str | None] = {}

    def apply(**values: str) -> None:
        for key, value in values.items():
            saved.setdefault(key, os.environ.get(key))
            os.environ[key] = value
        get_settings.cache_clear()

    yield apply
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    get_settings.cache_clear()
