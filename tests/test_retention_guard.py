"""Retention never becomes a mass deletion, and always finishes.

On copies of a seeded database, as in ``test_retention``: a future ``as_of``, a run
that would remove too much (or any Tier 1 row) and a run without a recent verified
backup are refused before any change; an archived row that comes back to the hot table
is removed when its archived copy is identical, and stops the table, unretried and with
both copies kept, when it is not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from flows.retention import RetentionIncomplete, retention
from tests.helpers import fingerprint
from tests.test_retention import (
    AS_OF,
    POLICY,
    _back_up,
    _Env,
    _policy,
    _rule,
    copy_db,
    template,
)
from wedefi_dr.config import Settings
from wedefi_dr.errors import InvalidInput
from wedefi_dr.postgres.tools import connect
from wedefi_dr.retention import batches, guard
from wedefi_dr.retention import policy as core
from wedefi_dr.storage.s3 import ObjectStore
from wedefi_dr_dev import seed as seeding

__all__ = ["copy_db", "template"]  # module fixtures, shared with test_retention


def _dbname(dsn: str) -> str:
    return dsn.split("dbname=")[1].split()[0]


def _audit_rows(settings: Settings, dsn: str) -> list[tuple[str, str, str, str | None]]:
    """``(run_id, table, status, error)`` of every retention audit row of the database."""
    with connect(settings.ops_dsn.get_secret_value()) as conn, conn.cursor() as cur:
        cur.execute(
            """SELECT run_id::text, table_name, status, error_message FROM retention_audit_log
               WHERE database_name = %s ORDER BY start_time""",
            (_dbname(dsn),),
        )
        return cur.fetchall()


def _run(dsn: str, **params) -> dict:
    env = _Env()
    env.set(WEDEFI_DR_PRIMARY_DSN=dsn)
    try:
        return retention(operator="pytest", **params)
    finally:
        env.restore()


@pytest.fixture(scope="module")
def unbacked(copy_db: Callable[[], str]) -> str:
    """A copy no backup was ever taken of; every refusal leaves it as it was."""
    return copy_db()


@pytest.fixture(scope="module")
def backed_up(prefect_api: None, copy_db: Callable[[], str]) -> str:
    """A copy with one real backup (taken once for the module)."""
    dsn = copy_db()
    _back_up(dsn)
    return dsn


# ---- a future moment ---------------------------------------------------------------------
def test_a_future_as_of_is_refused_before_any_change(
    prefect_api, backed_up: str, settings: Settings, tmp_path
):
    before = fingerprint(backed_up)
    future = datetime.now(UTC) + timedelta(days=1)
    with pytest.raises(guard.FutureMoment, match="is in the future"):
        _run(backed_up, as_of=future, allow_mass_deletion=True, policy_path=_policy(tmp_path))
    assert fingerprint(backed_up) == before
    assert _audit_rows(settings, backed_up) == []
    # The command line refuses it before asking any server (exit 2: fix the command).
    cli = [str(Path(sys.executable).parent / "wedefi-dr"), "retention"]
    cli += ["--as-of", (datetime.now(UTC) + timedelta(days=3650)).strftime("%Y-%m-%dT%H:%M:%S")]
    refused = subprocess.run(
        cli, env={**os.environ, "WEDEFI_DR_PRIMARY_DSN": backed_up}, capture_output=True, text=True
    )
    assert refused.returncode == 2, refused.stderr
    assert "is in the future" in refused.stderr
    assert fingerprint(backed_up) == before


def test_a_moment_within_the_clock_skew_allowance_is_accepted():
    now = datetime(2026, 11, 24, 1, 0, 0)
    assert guard.check_moment(now + guard.CLOCK_SKEW, now=now) == now + guard.CLOCK_SKEW
    with pytest.raises(guard.FutureMoment):
        guard.check_moment(now + guard.CLOCK_SKEW + timedelta(seconds=1), now=now)


# ---- mass deletion -----------------------------------------------------------------------
def _everything_may_go(raw):
    raw["defaults"]["max_share"] = 1.0


def test_a_mass_deletion_stops_before_its_first_batch_unless_allowed(
    prefect_api, backed_up: str, settings: Settings, tmp_path
):
    dsn = backed_up
    before = fingerprint(dsn)
    with pytest.raises(guard.MassDeletionRefused) as share:
        _run(dsn, as_of=AS_OF, policy_path=_policy(tmp_path))
    message = str(share.value)
    assert "nothing was changed" in message and "--allow-mass-deletion" in message
    assert "AlertDelivery: " in message and "more than max_share 25%" in message
    # Every share allowed: the Tier 1 rules still need the request to say so.
    with pytest.raises(guard.MassDeletionRefused) as tier1:
        _run(dsn, as_of=AS_OF, policy_path=_policy(tmp_path, _everything_may_go))
    assert "Transaction is Tier 1" in str(tier1.value)
    assert "GovernanceLock is Tier 1" in str(tier1.value)
    assert "more than max_share" not in str(tier1.value)
    # Refused before the first batch: no row moved, no archive or summary table made.
    assert fingerprint(dsn) == before
    assert _audit_rows(settings, dsn) == []

    run = _run(dsn, as_of=AS_OF, policy_path=_policy(tmp_path), allow_mass_deletion=True)
    removed = {r["table"]: r["removed"] for r in run["results"]}
    assert removed["AlertDelivery"] > 0 and removed["Transaction"] > 0
    assert {status for _, _, status, _ in _audit_rows(settings, dsn)} == {"success"}


# ---- a recent verified backup ----------------------------------------------------------
def test_no_recent_backup_of_the_database_is_refused(
    prefect_api, good_backup: str, unbacked: str, backed_up: str, settings: Settings, tmp_path
):
    # A backup of another database (good_backup's) is no backup of this one.
    before = fingerprint(unbacked)
    with pytest.raises(guard.NoRecentBackup, match=f"of database '{_dbname(unbacked)}'"):
        _run(unbacked, as_of=AS_OF, policy_path=_policy(tmp_path), allow_mass_deletion=True)
    assert fingerprint(unbacked) == before
    assert _audit_rows(settings, unbacked) == []
    # A backup older than the setting allows does not count either.
    store = ObjectStore(settings)
    name = _dbname(backed_up)
    assert guard.recent_backup(store, name, 26).age_hours < 1
    later = datetime.now(UTC) + timedelta(hours=27)
    with pytest.raises(guard.NoRecentBackup, match=r"h old"):
        guard.recent_backup(store, name, 26, now=later)


# ---- an archived row comes back ----------------------------------------------------------
def _prices_only(raw):
    raw["tables"] = [_rule(raw, "PriceSnapshot")]
    raw["tables"][0].update(batch_size=50, max_share=1.0)


def _archived_ids(dsn: str, n: int) -> list[str]:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute('SELECT id FROM "PriceSnapshotArchive" ORDER BY id LIMIT %s', (n,))
        return [i for (i,) in cur.fetchall()]


def _copies(dsn: str, key: str) -> tuple[list[tuple], list[tuple]]:
    """The row's copies in the hot table and in the archive."""
    out = []
    with connect(dsn) as conn, conn.cursor() as cur:
        for table in ("PriceSnapshot", "PriceSnapshotArchive"):
            cur.execute(f'SELECT * FROM "{table}" WHERE id = %s', (key,))
            out.append(cur.fetchall())
    return out[0], out[1]


def test_an_archived_row_back_in_the_table_is_removed_or_stops_the_table(
    prefect_api, backed_up: str, settings: Settings, tmp_path
):
    dsn = backed_up
    policy = _policy(tmp_path, _prices_only)
    _run(dsn, as_of=AS_OF, policy_path=policy)  # archives what is old (if not done yet)
    same, other = _archived_ids(dsn, 2)
    _, (archived_same,) = _copies(dsn, same)
    _, (archived_other,) = _copies(dsn, other)
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            'INSERT INTO "PriceSnapshot" SELECT * FROM "PriceSnapshotArchive" WHERE id = %s',
            (same,),
        )

    # Identical copy in the archive: the move is already done, the row only leaves.
    run = _run(dsn, as_of=AS_OF, policy_path=policy)
    (result,) = run["results"]
    assert (result["removed"], result["archived"], result["already_archived"]) == (1, 0, 1)
    assert _copies(dsn, same) == ([], [archived_same])

    # A different copy: the table stops, naming the row; both copies are kept.
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """INSERT INTO "PriceSnapshot" SELECT * FROM "PriceSnapshotArchive" WHERE id = %s""",
            (other,),
        )
        cur.execute(
            'UPDATE "PriceSnapshot" SET "priceUsd" = "priceUsd" + 1 WHERE id = %s', (other,)
        )
        cur.execute('SELECT * FROM "PriceSnapshot" WHERE id = %s', (other,))
        (changed,) = cur.fetchall()
    with pytest.raises(RetentionIncomplete) as failed:
        _run(dsn, as_of=AS_OF, policy_path=policy)
    assert "rerun cannot finish until that conflict is resolved" in str(failed.value)
    assert "rerun to finish" not in str(failed.value)
    assert _copies(dsn, other) == ([changed], [archived_other])
    # One attempt, not retried: one audit row for the table in that run, naming the row.
    rows = _audit_rows(settings, dsn)
    last_run = rows[-1][0]
    attempts = [r for r in rows if r[0] == last_run]
    assert len(attempts) == 1, attempts
    failure = attempts[0]
    assert failure[1:3] == ("PriceSnapshot", "failed")
    assert "ArchiveConflict" in failure[3] and other in failure[3]


# ---- sample-data resets --------------------------------------------------------------------
def test_seed_reset_drops_the_product_tables_and_checks_the_scale_first(copy_db):
    dsn = copy_db()
    plans = core.plans_for(dsn, POLICY, AS_OF)
    assert batches.ensure_targets(dsn, plans) == [
        "PriceSnapshotArchive",
        "PerformanceMetricMonthly",
    ]
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            'INSERT INTO "PriceSnapshotArchive" SELECT * FROM "PriceSnapshot" ORDER BY id LIMIT 1'
        )
    before = fingerprint(dsn)
    with pytest.raises(InvalidInput, match="scale must be positive"):
        seeding.prepare(dsn, reset=True, scale=0)
    assert fingerprint(dsn) == before  # nothing dropped
    seeding.prepare(dsn, reset=True, scale=1)
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT to_regclass('\"PriceSnapshotArchive\"'), "
            "to_regclass('\"PerformanceMetricMonthly\"')"
        )
        assert cur.fetchone() == (None, None)
        cur.execute('SELECT count(*) FROM "PriceSnapshot"')
        assert cur.fetchone()[0] == 0
