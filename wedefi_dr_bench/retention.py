"""``wedefi-dr bench retention``: archive throughput, and what it costs a concurrent writer.

The retention job runs on the live primary while collectors keep inserting prices, so
the two numbers that matter are how fast old ``PriceSnapshot`` rows move to the archive
(rows per second) and how much slower a writer's inserts get meanwhile (p99 latency
during the run divided by p99 without it). Measured, never asserted in tests.

The bench database (``wedefi_bench_retention`` on the primary's server) gets the
WeDefiDaily schema, a small seed for the reference rows, and ``rows`` extra price rows
from ``generate_series``, spread evenly over three years (so about a third is past the
2-year line), with random-looking UUID keys as the collectors make them. It is dropped
at the end: the run consumes it.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

from psycopg2 import sql

from wedefi_dr.config import Settings
from wedefi_dr.errors import DRError
from wedefi_dr.observability.stats import percentile
from wedefi_dr.postgres.conninfo import with_dbname
from wedefi_dr.postgres.primary import primary_dsn
from wedefi_dr.postgres.tools import connect
from wedefi_dr.retention import batches
from wedefi_dr.retention import policy as retention
from wedefi_dr_dev import seed as seeding

BENCH_DB = "wedefi_bench_retention"
WRITER_PAUSE_SECONDS = 0.005
THREE_YEARS_SECONDS = 3 * 365 * 86_400


class _Writer(threading.Thread):
    """Inserts one recent price per statement (autocommit), timing each insert."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with (
                connect(self.dsn, autocommit=True, application_name="bench-writer") as conn,
                conn.cursor() as cur,
            ):
                cur.execute('SELECT id FROM "Token" ORDER BY id LIMIT 1')
                token = cur.fetchone()[0]
                while not self.stop.is_set():
                    t0 = time.perf_counter()
                    cur.execute(
                        'INSERT INTO "PriceSnapshot" (id, "tokenId", "priceUsd", source, '
                        '"recordedAt") VALUES (gen_random_uuid()::text, %s, 1.0, '
                        "'bench-writer', now())",
                        (token,),
                    )
                    self.latencies.append(time.perf_counter() - t0)
                    time.sleep(WRITER_PAUSE_SECONDS)
        except BaseException as exc:  # reported by the caller
            self.error = exc


def _sample_writer(dsn: str, seconds: float | None) -> _Writer:
    """Start a writer; with ``seconds``, let it run that long alone and stop it."""
    writer = _Writer(dsn)
    writer.start()
    if seconds is not None:
        time.sleep(seconds)
        writer.stop.set()
        writer.join()
    return writer


def build(admin_dsn: str, rows: int, now: datetime) -> str:
    """A fresh bench database with ``rows`` generated prices; returns its DSN."""
    with connect(with_dbname(admin_dsn, "postgres"), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(BENCH_DB))
        )
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(BENCH_DB)))
    dsn = with_dbname(admin_dsn, BENCH_DB)
    seeding.prepare(dsn, reset=True)
    seeding.seed(dsn, 0.25, now=now)
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """INSERT INTO "PriceSnapshot" (id, "tokenId", "priceUsd", source, "recordedAt",
                                            "createdAt")
               SELECT md5('bench:' || i)::uuid::text, t.ids[1 + i %% t.n], 1 + (i %% 997) / 100.0,
                      'bench', %(now)s::timestamp - make_interval(secs => i * %(step)s),
                      %(now)s::timestamp - make_interval(secs => i * %(step)s)
               FROM generate_series(1, %(rows)s) i,
                    (SELECT array_agg(id ORDER BY id) ids, count(*)::int n FROM "Token") t""",
            {"now": now, "rows": rows, "step": THREE_YEARS_SECONDS / rows},
        )
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute('VACUUM ANALYZE "PriceSnapshot"')
    return dsn


def run(
    settings: Settings, *, rows: int, batch_size: int, baseline_seconds: float
) -> dict[str, Any]:
    """Build, measure the writer alone, then archive with the writer running; drop the db."""
    settings.require("primary_dsn")
    admin = primary_dsn(settings)
    now = datetime.now(UTC).replace(tzinfo=None)
    t0 = time.monotonic()
    dsn = build(admin, rows, now)
    build_seconds = time.monotonic() - t0
    try:
        base = retention.load_policy(settings.retention_policy)
        rule = base.rule("PriceSnapshot").model_copy(update={"batch_size": batch_size})
        policy = retention.RetentionPolicy(
            version=1, defaults=base.defaults, indefinite=["Token"], tables=[rule]
        )
        with connect(dsn) as conn:
            (p,) = retention.plan(conn, policy, now)
            with conn.cursor() as cur:
                cur.execute('SELECT count(*) FROM "PriceSnapshot"')
                before = cur.fetchone()[0]
            expected = batches.preview(conn, [p])[0].rows
        batches.ensure_targets(dsn, [p])
        alone = _sample_writer(dsn, baseline_seconds)
        writer = _sample_writer(dsn, None)
        result = batches.run_table(dsn, p, batches.new_result(p))
        writer.stop.set()
        writer.join()
        for w in (alone, writer):
            if w.error:
                raise DRError(f"bench writer failed: {w.error}")
        with connect(dsn) as conn, conn.cursor() as cur:
            cur.execute('SELECT count(*) FROM "PriceSnapshot"')
            after = cur.fetchone()[0]
            cur.execute('SELECT count(*) FROM "PriceSnapshotArchive"')
            archived = cur.fetchone()[0]
        inserted = len(alone.latencies) + len(writer.latencies)
        if after + archived != before + inserted or archived != expected:
            raise DRError(
                f"rows do not add up: {before} + {inserted} written, {after} + {archived} found"
            )
        p99_alone, p99_during = percentile(alone.latencies, 99), percentile(writer.latencies, 99)
        return {
            "price rows before": before,
            "rows archived": result.archived,
            "batches": result.batches,
            "batch size": batch_size,
            "archive seconds": result.seconds,
            "archive rows/s": result.archived / result.seconds,
            "writer inserts alone / during": f"{len(alone.latencies)} / {len(writer.latencies)}",
            "writer p50 alone (ms)": percentile(alone.latencies, 50) * 1000,
            "writer p50 during (ms)": percentile(writer.latencies, 50) * 1000,
            "writer p99 alone (ms)": p99_alone * 1000,
            "writer p99 during (ms)": p99_during * 1000,
            "writer p99 during / alone": p99_during / p99_alone,
            "writer max during (ms)": max(writer.latencies) * 1000,
            "lock_timeout (ms)": p.lock_timeout_ms,
            "build seconds": build_seconds,
        }
    finally:
        with connect(with_dbname(admin, "postgres"), autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(BENCH_DB))
            )
