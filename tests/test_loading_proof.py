"""The proof taken while pg_restore --jobs loads a new database: a table is fingerprinted
once pg_restore reports its rows committed, a table pg_restore holds locked is not waited
on (tried again when another item finishes), and a name the report cannot tell apart is
left for the proof after the load."""

from __future__ import annotations

import threading
import time
import uuid

import psycopg2

from tests.helpers import new_database
from wedefi_dr.config import Settings
from wedefi_dr.logical.proof import PARALLEL_START, LoadingProof
from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.postgres.fingerprint import FINGERPRINT_METHOD, fingerprint_tables
from wedefi_dr.postgres.tools import connect

SETUP = """
CREATE SCHEMA other;
CREATE TABLE loaded (id int PRIMARY KEY, note text);
INSERT INTO loaded SELECT i, md5(i::text) FROM generate_series(1, 500) i;
CREATE TABLE locked (id int);
INSERT INTO locked SELECT generate_series(1, 20);
CREATE TABLE twin (id int);
INSERT INTO twin VALUES (1);
CREATE TABLE other.twin (id int);
"""


def _until(found: dict, name: str, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while name not in found and time.monotonic() < deadline:
        time.sleep(0.02)
    return name in found


def test_tables_are_proven_as_reported_loaded_without_waiting_on_a_lock(settings: Settings):
    admin = settings.primary_dsn.get_secret_value()
    with new_database(admin, f"proof_{uuid.uuid4().hex[:8]}") as dsn:
        with connect(dsn) as conn, conn.cursor() as cur:
            cur.execute(SETUP)
        with connect(dsn) as conn:
            expected = fingerprint_tables(conn, sequences=False)
        # pg_restore's ALTER TABLE … ADD PRIMARY KEY, as another session would hold it.
        holder = psycopg2.connect(dsn)
        proving = LoadingProof(ConnTarget.parse(dsn, allow_password=True), FINGERPRINT_METHOD)
        try:
            holder.cursor().execute("LOCK TABLE locked IN ACCESS EXCLUSIVE MODE")
            proving.feed(PARALLEL_START)
            proving.feed("pg_restore: finished item 3352 TABLE DATA locked")
            proving.feed("pg_restore: finished item 3353 TABLE DATA twin")
            proving.feed("pg_restore: finished item 3351 TABLE DATA loaded")
            assert _until(proving.found, "public.loaded"), "waited on the locked table"
            assert "public.locked" not in proving.found
            holder.rollback()
            proving.feed("pg_restore: finished item 3208 CONSTRAINT locked locked_pkey")
            assert _until(proving.found, "public.locked"), "not tried again after the lock"
        finally:
            holder.close()
        finished: dict = {}
        closer = threading.Thread(target=lambda: finished.update(proving.finish()), daemon=True)
        closer.start()
        closer.join(10)
        assert not closer.is_alive()
    assert finished == {name: expected[name] for name in ("public.loaded", "public.locked")}


def test_a_proof_that_cannot_run_during_the_load_leaves_every_table_for_after_it(
    settings: Settings, caplog
):
    """No session for the proof beside pg_restore's (here: a database that is not there)
    stops nothing: the proof after the load takes every table, and the warning says so."""
    admin = settings.primary_dsn.get_secret_value()
    absent = ConnTarget.parse(admin, allow_password=True).with_dbname(
        f"gone_{uuid.uuid4().hex[:8]}"
    )
    proving = LoadingProof(absent, FINGERPRINT_METHOD)
    caplog.set_level("WARNING", logger="wedefi_dr.logical.proof")
    proving.feed(PARALLEL_START)
    proving.feed("pg_restore: finished item 3351 TABLE DATA loaded")
    assert proving.finish() == {}
    assert "the proof during the load stopped after 0 table(s)" in caplog.text
    assert absent.dbname in caplog.text
