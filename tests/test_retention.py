"""Retention by classification: exact, lossless, bounded, refused when unsafe.

Every test works on its own copy of a scale-1 WeDefiDaily database (``CREATE DATABASE
... TEMPLATE``, on the session's primary server), never on the shared ``wedefi``
database. The flow runs for real on the session's Prefect API; the kill drill runs the
``wedefi-dr retention`` command in a child process and SIGKILLs it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import yaml
from psycopg2 import sql

from flows.retention import retention
from tests.helpers import fingerprint
from wedefi_dr.config import PROJECT_ROOT, Settings, get_settings
from wedefi_dr.errors import InvalidInput
from wedefi_dr.postgres.conninfo import with_dbname
from wedefi_dr.postgres.tools import connect
from wedefi_dr.retention import batches
from wedefi_dr.retention import policy as core
from wedefi_dr_dev import seed as seeding

POLICY = PROJECT_ROOT / "deployments" / "retention.yaml"
# The data is placed an hour before the start of the current hour, so that the run's
# moment, an hour after it as a weekly job would see it, is in the past (never refused).
SEED_NOW = datetime.now(UTC).replace(tzinfo=None, minute=0, second=0, microsecond=0) - timedelta(
    hours=1
)
AS_OF = SEED_NOW + timedelta(hours=1)
LOCK_TIMEOUT_MS = 1000
INDEFINITE = ("Chain", "Protocol", "Wallet", "Token", "TokenBalance", "PriceThreshold", "Alert")


# ---- databases and policies --------------------------------------------------------------
def _admin(settings: Settings) -> str:
    return with_dbname(settings.primary_dsn.get_secret_value(), "postgres")


def _drop(settings: Settings, name: str) -> None:
    with connect(_admin(settings), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def template(settings: Settings) -> Iterator[str]:
    """A seeded scale-1 database that is only ever copied (no test connects to it)."""
    name = f"retention_tmpl_{uuid.uuid4().hex[:8]}"
    with connect(_admin(settings), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = with_dbname(settings.primary_dsn.get_secret_value(), name)
    seeding.prepare(dsn, reset=True)
    seeding.seed(dsn, 1, now=SEED_NOW)
    yield name
    _drop(settings, name)


@pytest.fixture(scope="module")
def copy_db(settings: Settings, template: str) -> Iterator[Callable[[], str]]:
    """Make fresh copies of the template; all dropped at the end of the module."""
    made: list[str] = []

    def make() -> str:
        name = f"retention_{uuid.uuid4().hex[:10]}"
        with connect(_admin(settings), autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
            # A database's comment is not copied with it: the copy of a sample database is
            # one too, and says so for seed --reset.
            cur.execute(
                sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                    sql.Identifier(name), sql.Literal(seeding.SAMPLE_DATABASE_MARKER)
                )
            )
        made.append(name)
        return with_dbname(settings.primary_dsn.get_secret_value(), name)

    yield make
    for name in made:
        _drop(settings, name)


class _Env:
    """Point get_settings() at a test database for a while (module-scoped fixtures too)."""

    def __init__(self) -> None:
        self.saved: dict[str, str | None] = {}

    def set(self, **values: str) -> None:
        for key, value in values.items():
            self.saved.setdefault(key, os.environ.get(key))
            os.environ[key] = value
        get_settings.cache_clear()

    def restore(self) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()


def _back_up(dsn: str) -> str:
    """A real backup of ``dsn`` by the ``logical-backup`` flow: a run that removes rows
    needs one (the flow backs up ``WEDEFI_DR_PRIMARY_DSN``)."""
    from flows.backup import logical_backup

    env = _Env()
    env.set(WEDEFI_DR_PRIMARY_DSN=dsn)
    try:
        return logical_backup(operator="pytest")
    finally:
        env.restore()


def _policy(tmp: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> str:
    raw = yaml.safe_load(POLICY.read_text())
    if edit:
        edit(raw)
    path = tmp / f"policy-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def _rule(raw: dict[str, Any], table: str) -> dict[str, Any]:
    return next(r for r in raw["tables"] if r["table"] == table)


def _counts(dsn: str) -> dict[str, int]:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1"
        )
        tables = [t for (t,) in cur.fetchall()]
        out = {}
        for table in tables:
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
            out[table] = cur.fetchone()[0]
    return out


def _indefinite_fingerprint(dsn: str) -> dict[str, dict[str, object]]:
    fp = fingerprint(dsn)
    return {t: fp[f"public.{t}"] for t in INDEFINITE}


# ---- a concurrent writer -----------------------------------------------------------------
class Writer(threading.Thread):
    """Inserts recent prices one statement at a time, recording how long each one took."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self.stop = dsn, threading.Event()
        self.latencies: list[float] = []
        self.ids: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with connect(self.dsn, autocommit=True) as conn, conn.cursor() as cur:
                cur.execute('SELECT id FROM "Token" ORDER BY id LIMIT 1')
                token = cur.fetchone()[0]
                while not self.stop.is_set():
                    new_id = str(uuid.uuid4())
                    t0 = time.perf_counter()
                    cur.execute(
                        'INSERT INTO "PriceSnapshot" (id, "tokenId", "priceUsd", source, '
                        '"recordedAt") VALUES (%s, %s, 1.0, %s, %s)',
                        (new_id, token, "pytest-writer", AS_OF),
                    )
                    self.latencies.append(time.perf_counter() - t0)
                    self.ids.append(new_id)
                    time.sleep(0.002)
        except BaseException as exc:
            self.error = exc


# ---- one full run, shared by the assertions below ----------------------------------------
@pytest.fixture(scope="module")
def applied(
    prefect_api: None, copy_db: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Dry run, then a real run (small batches, a writer inserting meanwhile), then again.

    The run removes most of several tables and Tier 1 rows: it is started as a mass
    deletion, after a backup of its copy."""
    dsn = copy_db()
    _back_up(dsn)
    policy = _policy(
        tmp_path_factory.mktemp("retention"),
        lambda raw: raw["defaults"].update(batch_size=40, lock_timeout_ms=LOCK_TIMEOUT_MS),
    )
    env = _Env()
    env.set(WEDEFI_DR_PRIMARY_DSN=dsn)
    try:
        before = _counts(dsn)
        kept_before = _indefinite_fingerprint(dsn)
        dry = retention(dry_run=True, as_of=AS_OF, operator="pytest", policy_path=policy)
        after_dry = _counts(dsn)
        from prefect.artifacts import Artifact

        artifact = Artifact.get("retention-preview")
        writer = Writer(dsn)
        writer.start()
        run = retention(
            as_of=AS_OF, operator="pytest", policy_path=policy, allow_mass_deletion=True
        )
        writer.stop.set()
        writer.join()
        after = _counts(dsn)
        again = retention(as_of=AS_OF, operator="pytest", policy_path=policy)
        yield {
            "dsn": dsn,
            "before": before,
            "after_dry": after_dry,
            "dry": dry,
            "artifact": artifact,
            "run": run,
            "after": after,
            "again": again,
            "after_again": _counts(dsn),
            "kept_before": kept_before,
            "kept_after": _indefinite_fingerprint(dsn),
            "writer": writer,
        }
    finally:
        env.restore()


def test_dry_run_changes_nothing_and_publishes_the_counts(applied):
    assert applied["after_dry"] == applied["before"]
    preview = {p["table"]: p for p in applied["dry"]["preview"]}
    # The seed puts rows on both sides of every line: each rule has something to do.
    assert all(p["rows"] > 0 for p in preview.values()), preview
    assert set(preview["DigestRun"]["cascaded"]) == {
        "WalletBalanceSnapshot",
        "GovernanceLockSnapshot",
        "RewardOpportunitySnapshot",
        "GammaswapPositionSnapshot",
    }
    assert all(n > 0 for n in preview["DigestRun"]["cascaded"].values())
    artifact = applied["artifact"]
    assert artifact is not None and artifact.type == "table"
    assert str(artifact.flow_run_id) == str(applied["dry"]["flow_run_id"])
    assert '"PriceSnapshot"' in artifact.data and str(preview["PriceSnapshot"]["rows"]) in (
        artifact.data
    )


def test_run_removes_exactly_what_the_dry_run_counted(applied):
    before, after = applied["before"], applied["after"]
    preview = {p["table"]: p for p in applied["dry"]["preview"]}
    results = {r["table"]: r for r in applied["run"]["results"]}
    assert applied["run"]["preview"] == applied["dry"]["preview"]
    expected_gone: dict[str, int] = {}
    for table, p in preview.items():
        assert results[table]["removed"] == p["rows"], table
        assert results[table]["cascaded"] == p["cascaded"], table
        expected_gone[table] = expected_gone.get(table, 0) + p["rows"]
        for child, n in p["cascaded"].items():
            expected_gone[child] = expected_gone.get(child, 0) + n
    inserted = len(applied["writer"].ids)
    for table in before:
        added = inserted if table == "PriceSnapshot" else 0
        assert before[table] + added - after[table] == expected_gone.get(table, 0), table
    # Moved, not lost: the archive holds exactly the archived rows, the summary every row.
    assert after["PriceSnapshotArchive"] == preview["PriceSnapshot"]["rows"]
    with connect(applied["dsn"]) as conn, conn.cursor() as cur:
        cur.execute('SELECT sum(samples), count(*) FROM "PerformanceMetricMonthly"')
        samples, groups = cur.fetchone()
        assert samples == preview["PerformanceMetric"]["rows"]
        assert groups == preview["PerformanceMetric"]["summary_groups"]
        cur.execute(
            """SELECT count(*) FROM "PriceSnapshotArchive" a
               JOIN "PriceSnapshot" p ON p.id = a.id"""
        )
        assert cur.fetchone()[0] == 0


def test_indefinite_tables_are_untouched(applied):
    assert applied["kept_after"] == applied["kept_before"]


def test_a_second_run_does_nothing(applied):
    again = applied["again"]
    assert all(p["rows"] == 0 and not any(p["cascaded"].values()) for p in again["preview"])
    assert all(r["removed"] == 0 and r["batches"] == 0 for r in again["results"])
    assert applied["after_again"] == applied["after"]


def test_a_concurrent_writer_waits_no_longer_than_the_lock_timeout(applied):
    writer = applied["writer"]
    assert writer.error is None
    assert len(writer.latencies) > 20
    batches = sum(r["batches"] for r in applied["run"]["results"])
    assert batches > len(applied["run"]["results"])  # many short transactions, not one
    assert max(writer.latencies) < LOCK_TIMEOUT_MS / 1000 + 2.0
    with connect(applied["dsn"]) as conn, conn.cursor() as cur:
        cur.execute('SELECT count(*) FROM "PriceSnapshot" WHERE id = ANY(%s)', (writer.ids,))
        assert cur.fetchone()[0] == len(writer.ids)


def test_audit_rows_and_metrics_record_each_table(applied, settings: Settings):
    dbname = applied["dsn"].split("dbname=")[1].split()[0]
    with connect(settings.ops_dsn.get_secret_value()) as conn, conn.cursor() as cur:
        cur.execute(
            """SELECT table_name, status, rows_removed, rows_archived, rows_summarized,
                      rows_cascaded, operator_id
               FROM retention_audit_log WHERE database_name = %s AND run_id = (
                   SELECT run_id FROM retention_audit_log WHERE database_name = %s
                   ORDER BY start_time LIMIT 1)""",
            (dbname, dbname),
        )
        rows = {r[0]: r[1:] for r in cur.fetchall()}
    for r in applied["run"]["results"]:
        status, removed, archived, summarized, cascaded, operator = rows[r["table"]]
        assert (status, removed, operator) == ("success", r["removed"], "pytest")
        assert (archived, summarized, cascaded) == (r["archived"], r["summarized"], r["cascaded"])
    prom = Path(settings.metrics_dir, "wedefi_dr_retention.prom").read_text()
    archived = applied["run"]["results"][
        [r["table"] for r in applied["run"]["results"]].index("PriceSnapshot")
    ]["archived"]
    assert (
        f'retention_rows_archived_total{{database="{dbname}",table="PriceSnapshot"}} '
        f"{float(archived)}" in prom
    )
    # The file is the second (empty) run's: its own rows are 0, the totals survive it.
    assert (
        f'retention_run_rows{{database="{dbname}",kind="archived",table="PriceSnapshot"}} 0.0'
        in prom
    )
    digests = next(r for r in applied["run"]["results"] if r["table"] == "DigestRun")
    assert (
        f'retention_rows_removed_total{{database="{dbname}",table="DigestRun"}} '
        f"{float(digests['removed'])}" in prom
    )


def test_retention_audit_log_is_append_only(applied, settings: Settings):
    ops = settings.ops_dsn.get_secret_value()
    with connect(ops) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_user, count(*) FROM retention_audit_log")
        user, rows = cur.fetchone()
    assert user == "wedefi_dr_app" and rows >= len(applied["run"]["results"])
    for statement in (
        "DELETE FROM retention_audit_log",
        "TRUNCATE retention_audit_log",
        "UPDATE retention_audit_log SET rows_removed = 0 WHERE status = 'success'",
        "UPDATE retention_audit_log SET operator_id = 'someone else'",
    ):
        with pytest.raises(psycopg2.Error), connect(ops) as conn, conn.cursor() as cur:
            cur.execute(statement)
    with connect(ops) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM retention_audit_log")
        assert cur.fetchone()[0] == rows


# ---- refused before any change -----------------------------------------------------------
@pytest.fixture(scope="module")
def refusal_db(copy_db: Callable[[], str]) -> str:
    """One copy serves every refusal case: none of them may change it."""
    return copy_db()


def _missing_table(raw):
    _rule(raw, "AlertDelivery")["table"] = "AlertDeliveries"


def _missing_column(raw):
    _rule(raw, "Transaction")["timestamp"] = "occuredAt"


def _sql_in_a_name(raw):
    _rule(raw, "PriceSnapshot")["archive_table"] = 'X"; DROP TABLE "Wallet"; --'


def _cascade_into_indefinite(raw):
    _rule(raw, "RiskEvent").pop("skip_if_referenced_by")


def _unlisted_cascade(raw):
    _rule(raw, "DigestRun")["cascade"].remove("GammaswapPositionSnapshot")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_missing_table, "table 'AlertDeliveries' does not exist"),
        (_missing_column, "column 'occuredAt' does not exist"),
        (_sql_in_a_name, "is not a plain table or column name"),
        (_cascade_into_indefinite, "set null in Alert, which is kept indefinitely"),
        (_unlisted_cascade, "would cascade to GammaswapPositionSnapshot"),
    ],
    ids=["missing-table", "missing-column", "sql-in-a-name", "into-indefinite", "unlisted-cascade"],
)
def test_a_bad_policy_is_refused_before_any_change(
    prefect_api, refusal_db: str, tmp_path, settings: Settings, edit, message
):
    dsn = refusal_db
    before = fingerprint(dsn)
    env = _Env()
    env.set(WEDEFI_DR_PRIMARY_DSN=dsn)
    try:
        with pytest.raises(InvalidInput, match=message) as info:
            retention(as_of=AS_OF, operator="pytest", policy_path=_policy(tmp_path, edit))
    finally:
        env.restore()
    assert "nothing was changed" in str(info.value)
    assert fingerprint(dsn) == before  # no row moved, no archive or summary table made
    dbname = dsn.split("dbname=")[1].split()[0]
    with connect(settings.ops_dsn.get_secret_value()) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM retention_audit_log WHERE database_name = %s", (dbname,))
        assert cur.fetchone()[0] == 0


def test_cli_dry_run_prints_the_preview_and_refuses_a_bad_policy(
    prefect_api, refusal_db: str, tmp_path
):
    from prefect.settings import PREFECT_API_URL

    before = fingerprint(refusal_db)
    env = {
        **os.environ,
        "WEDEFI_DR_PRIMARY_DSN": refusal_db,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
    }
    cli = [str(Path(sys.executable).parent / "wedefi-dr"), "retention", "--dry-run"]
    cli += ["--as-of", AS_OF.isoformat()]
    expected = {p.table: p.rows for p in batches.dry_run(refusal_db, POLICY, AS_OF)}
    good = subprocess.run(cli, env={**env, "COLUMNS": "200"}, capture_output=True, text=True)
    assert good.returncode == 0, good.stderr[-2000:]
    for table, rows in expected.items():
        assert re.search(rf"{table}\s.*\s{rows:,}\s", good.stdout), (table, good.stdout)
    bad = subprocess.run(
        [*cli, "--policy", _policy(tmp_path, _missing_column)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "column 'occuredAt' does not exist" in bad.stderr
    assert fingerprint(refusal_db) == before


# ---- summaries merge across batches and runs ---------------------------------------------
def test_summaries_merge_across_batches_and_runs(copy_db, tmp_path):
    dsn = copy_db()
    path = _policy(tmp_path, lambda raw: raw["defaults"].update(batch_size=7))
    (p,) = [x for x in core.plans_for(dsn, path, AS_OF) if x.table == "PerformanceMetric"]
    batches.ensure_targets(dsn, [p])
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute('SELECT count(*), sum("totalReturn") FROM "PerformanceMetric"')
        total_rows, _ = cur.fetchone()
        # The oldest detail row of one group, to add a second sample to it after the run.
        cur.execute(
            """SELECT "walletId", timeframe, "computedAt", "totalReturn" FROM "PerformanceMetric"
               WHERE "computedAt" < %s AND "walletId" IS NOT NULL AND "totalReturn" IS NOT NULL
               ORDER BY id LIMIT 1""",
            (p.cutoff,),
        )
        wallet, timeframe, at, first_return = cur.fetchone()
    first = batches.run_table(dsn, p, batches.new_result(p))
    assert first.batches > 1 and first.summarized == first.removed > 0
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """INSERT INTO "PerformanceMetric" (id, "walletId", timeframe, "totalReturn",
                   "tradesCount", "computedAt") VALUES (%s, %s, %s, 5, 3, %s)""",
            (str(uuid.uuid4()), wallet, timeframe, at + timedelta(seconds=1)),
        )
    second = batches.run_table(dsn, p, batches.new_result(p))
    assert (second.removed, second.summarized, second.batches) == (1, 1, 1)
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """SELECT samples, "totalReturnSum", "totalReturnMin", "totalReturnMax"
               FROM "PerformanceMetricMonthly"
               WHERE "walletId" = %s AND timeframe = %s
                 AND "periodStart" = date_trunc('month', %s::timestamp)""",
            (wallet, timeframe, at),
        )
        samples, total, low, high = cur.fetchone()
        assert samples == 2 and total == first_return + 5
        assert (low, high) == (min(first_return, 5), max(first_return, 5))
        cur.execute(
            'SELECT (SELECT count(*) FROM "PerformanceMetric"), sum(samples) '
            'FROM "PerformanceMetricMonthly"'
        )
        remaining, summarized = cur.fetchone()
        assert remaining + summarized == total_rows + 1  # every detail row is accounted for


# ---- the kill drill ----------------------------------------------------------------------
def _worker_backend(dsn: str, dbname: str) -> tuple[int, str, str | None, str] | None:
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(
            """SELECT pid, state, wait_event_type, query FROM pg_stat_activity
               WHERE datname = %s AND application_name = %s""",
            (dbname, f"{core.APPLICATION_NAME}:PriceSnapshot"),
        )
        return cur.fetchone()


def _totals(dsn: str) -> tuple[int, int]:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute('SELECT count(*) FROM "PriceSnapshot"')
        source = cur.fetchone()[0]
        cur.execute("SELECT to_regclass('\"PriceSnapshotArchive\"') IS NOT NULL")
        if not cur.fetchone()[0]:
            return source, 0
        cur.execute('SELECT count(*) FROM "PriceSnapshotArchive"')
        return source, cur.fetchone()[0]


def _wait(predicate: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _gone(dsn: str, pid: int) -> bool:
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
        return cur.fetchone()[0] == 0


def test_killed_worker_loses_nothing_and_a_rerun_completes(prefect_api, copy_db, tmp_path):
    from prefect.settings import PREFECT_API_URL

    dsn = copy_db()
    dbname = dsn.split("dbname=")[1].split()[0]
    batch = 50

    def only_prices(raw):
        raw["tables"] = [_rule(raw, "PriceSnapshot")]
        raw["tables"][0].update(batch_size=batch, lock_timeout_ms=30_000)

    policy = _policy(tmp_path, only_prices)
    _back_up(dsn)
    expected = batches.dry_run(dsn, policy, AS_OF)[0].rows
    assert expected > 10 * batch
    total = sum(_totals(dsn))
    env = {
        **os.environ,
        "WEDEFI_DR_PRIMARY_DSN": dsn,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
    }
    cli = [str(Path(sys.executable).parent / "wedefi-dr"), "retention", "--policy", policy]
    cli += ["--as-of", AS_OF.isoformat(), "--operator", "pytest-kill", "--allow-mass-deletion"]

    def start(pause: float) -> subprocess.Popen:
        return subprocess.Popen(
            cli,
            env={**env, "WEDEFI_DR_RETENTION_BATCH_PAUSE_SECONDS": str(pause)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    # 1. Between batches: some batches committed, the worker idle in its pause.
    child = start(pause=0.5)
    _wait(lambda: _totals(dsn)[1] >= 2 * batch, "two committed batches")
    pid, _, _, _ = _wait(
        lambda: (b := _worker_backend(dsn, dbname)) and b[1] == "idle" and b,
        "the worker between batches",
    )
    child.send_signal(signal.SIGKILL)
    child.wait()
    _wait(lambda: _gone(dsn, pid), "the killed worker's backend to end")
    source, archived = _totals(dsn)
    assert source + archived == total
    assert 0 < archived < expected and archived % batch == 0  # whole batches only

    # 2. Inside a batch: its rows are deleted and partly archived, waiting on a row lock
    # (an uncommitted archive row with a key of the batch after next), when it dies.
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """SELECT id FROM "PriceSnapshot" WHERE "recordedAt" < %s
               ORDER BY id OFFSET %s LIMIT 1""",
            (core.plans_for(dsn, policy, AS_OF)[0].cutoff, 2 * batch + batch // 2),
        )
        key = cur.fetchone()[0]
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                'INSERT INTO "PriceSnapshotArchive" SELECT * FROM "PriceSnapshot" WHERE id = %s',
                (key,),
            )
        child = start(pause=0.0)
        pid, _, _, query = _wait(
            lambda: (b := _worker_backend(dsn, dbname)) and b[2] == "Lock" and b,
            "the worker to block inside a batch",
        )
        # Blocked in the archive-and-delete statement itself: rows already deleted and
        # partly copied inside the open transaction.
        assert query.startswith("WITH gone AS (DELETE FROM")
        assert _totals(dsn)[1] >= archived + 2 * batch  # two batches of this run committed
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        conn.rollback()
        conn.close()
    _wait(lambda: _gone(dsn, pid), "the killed worker's backend to end")
    source, archived = _totals(dsn)
    assert source + archived == total
    assert archived < expected and archived % batch == 0

    # 3. A rerun finishes the job, to the dry run's number.
    done = subprocess.run(
        cli, env={**env, "WEDEFI_DR_RETENTION_BATCH_PAUSE_SECONDS": "0"}, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    source, archived = _totals(dsn)
    assert (source + archived, archived) == (total, expected)
    assert batches.dry_run(dsn, policy, AS_OF)[0].rows == 0
