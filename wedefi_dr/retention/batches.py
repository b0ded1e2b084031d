"""Retention's SQL and its batches: the dry run, archive/summary tables, the batch loop.

- The dry run counts in policy order as the run deletes: rows an earlier rule removes
  (a digest's lock snapshots, say) are not counted again for a later one, so the run's
  numbers equal the preview's on a quiet database.
- Each batch is one short transaction with ``lock_timeout`` and ``statement_timeout``:
  its keys are locked (``FOR UPDATE``), its cascades counted, then it is deleted, moved
  to the archive table or folded into the summary table in one statement. A worker
  killed at any moment leaves whole batches moved or none: nothing is lost or
  half-moved, and the next run continues where it stopped (idempotent by construction:
  the rows it would act on are gone). A row that is back in the hot table although
  it was archived is only deleted when its archived copy is identical; a different copy
  stops the table (:class:`ArchiveConflict`) with both kept.
- Batches walk the primary key (keyset, ``key > last key``) so that no batch rescans
  the index entries its predecessors left dead.

Every identifier is quoted by :mod:`psycopg2.sql`; values (cutoffs, ``where`` values)
are literals adapted by psycopg2; keys travel as a bound array parameter.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
from prometheus_client import CollectorRegistry
from psycopg2 import sql

from wedefi_dr.errors import DRError
from wedefi_dr.observability.metrics import MetricSet
from wedefi_dr.postgres.tools import connect
from wedefi_dr.retention.policy import (
    APPLICATION_NAME,
    ForeignKey,
    TablePlan,
    load_policy,
    plan,
)


class RetentionBusy(DRError):
    """Another retention run holds this table's lock: two runs never overlap on a table."""


class RetentionFailed(DRError):
    """A table's batches stopped (lock timeouts, a batch that did not add up)."""


class ArchiveConflict(RetentionFailed):
    """Rows to archive already have a different copy in the archive table.

    Permanent: every rerun meets the same rows, so it is not retried. The batch is rolled
    back, so both copies are kept until someone decides which one is right.
    """


CONFLICT_IDS_SHOWN = 10
"""How many conflicting keys an ArchiveConflict names (the count says how many in all)."""


_MIN_MAX_COUNT = {
    "min": sql.SQL("min({})"),
    "max": sql.SQL("max({})"),
    "count": sql.SQL("count({})"),
}


# ---- SQL: which rows, and what a delete reaches ------------------------------------------
class _Aliases:
    """Fresh table aliases (t0, t1, ...) for nested EXISTS subqueries."""

    def __init__(self) -> None:
        self._n = itertools.count()

    def __call__(self) -> sql.Identifier:
        return sql.Identifier(f"t{next(self._n)}")


RootCondition = Callable[[sql.Identifier], sql.Composable]


def _col(alias: sql.Identifier, column: str) -> sql.Composable:
    return sql.SQL("{}.{}").format(alias, sql.Identifier(column))


def _join_on(fk: ForeignKey, child: sql.Identifier, parent: sql.Identifier) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(_col(child, c), _col(parent, p))
        for c, p in zip(fk.child_cols, fk.parent_cols, strict=True)
    )


def _any(parts: list[sql.Composable]) -> sql.Composable | None:
    if not parts:
        return None
    return sql.SQL("({})").format(sql.SQL(" OR ").join(parts))


def reach(
    p: TablePlan, table: str, alias: sql.Identifier, root: RootCondition, aliases: _Aliases
) -> sql.Composable | None:
    """A condition true for rows of ``table`` that deleting ``root`` rows of ``p`` removes."""
    parts: list[sql.Composable] = []
    if table == p.table:
        parts.append(root(alias))
    for fk in p.cascade_fks:
        if fk.child != table:
            continue
        parent = aliases()
        inner = reach(p, fk.parent, parent, root, aliases)
        if inner is None:
            continue
        parts.append(
            sql.SQL("EXISTS (SELECT 1 FROM {} {} WHERE {} AND {})").format(
                sql.Identifier(fk.parent), parent, _join_on(fk, alias, parent), inner
            )
        )
    return _any(parts)


def _earlier(
    earlier: list[TablePlan], table: str, alias: sql.Identifier, aliases: _Aliases
) -> sql.Composable | None:
    """Rows of ``table`` that rules run before this one remove (dry run only)."""
    parts = []
    for i, e in enumerate(earlier):
        if table != e.table and table not in e.cascaded_tables:
            continue
        cond = reach(e, table, alias, _root_qualifies(e, earlier[:i], aliases), aliases)
        if cond is not None:
            parts.append(cond)
    return _any(parts)


def qualifies(
    p: TablePlan, alias: sql.Identifier, earlier: list[TablePlan], aliases: _Aliases
) -> sql.Composable:
    """The rule's own test for a row: old enough, matching ``where``, not referenced from a
    ``skip_if_referenced_by`` table (by a row that will still exist at that point)."""
    rule = p.rule
    parts: list[sql.Composable] = [
        sql.SQL("{} < {}").format(_col(alias, rule.timestamp), sql.Literal(p.cutoff))
    ]
    for cond in rule.where:
        column = _col(alias, cond.column)
        if cond.op == "is_null":
            parts.append(sql.SQL("{} IS NULL").format(column))
        elif cond.op == "is_not_null":
            parts.append(sql.SQL("{} IS NOT NULL").format(column))
        else:
            op = sql.SQL("=" if cond.op == "eq" else "<>")
            parts.append(sql.SQL("{} {} {}").format(column, op, sql.Literal(cond.value)))
    for fk in p.skip_fks:
        child = aliases()
        gone = _earlier(earlier, fk.child, child, aliases)
        parts.append(
            sql.SQL("NOT EXISTS (SELECT 1 FROM {} {} WHERE {}{})").format(
                sql.Identifier(fk.child),
                child,
                _join_on(fk, child, alias),
                sql.SQL(" AND NOT {}").format(gone) if gone is not None else sql.SQL(""),
            )
        )
    return sql.SQL(" AND ").join(parts)


def _root_qualifies(p: TablePlan, earlier: list[TablePlan], aliases: _Aliases) -> RootCondition:
    def root(alias: sql.Identifier) -> sql.Composable:
        cond = qualifies(p, alias, earlier, aliases)
        gone = _earlier(earlier, p.table, alias, aliases)
        return cond if gone is None else sql.SQL("{} AND NOT {}").format(cond, gone)

    return root


def _root_in_batch(p: TablePlan) -> RootCondition:
    return lambda alias: sql.SQL("{} = ANY(%(keys)s)").format(_col(alias, p.key))


# ---- dry run -------------------------------------------------------------------------------
@dataclass
class TablePreview:
    """What a run would do to one table (and by cascade to others), at this cutoff."""

    table: str
    action: str
    cutoff: datetime
    rows: int
    cascaded: dict[str, int]
    target: str | None = None
    summary_groups: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def preview(conn, plans: list[TablePlan]) -> list[TablePreview]:
    """Count, read-only and in policy order, the rows each rule would remove."""
    out = []
    with conn.cursor() as cur:
        for i, p in enumerate(plans):
            aliases = _Aliases()
            earlier = plans[:i]
            root = _root_qualifies(p, earlier, aliases)
            counts: dict[str, int] = {}
            for table in [p.table, *p.cascaded_tables]:
                alias = aliases()
                cond = reach(p, table, alias, root, aliases)
                gone = _earlier(earlier, table, alias, aliases) if table != p.table else None
                if gone is not None:
                    cond = sql.SQL("{} AND NOT {}").format(cond, gone)
                cur.execute(
                    sql.SQL("SELECT count(*) FROM {} {} WHERE {}").format(
                        sql.Identifier(table), alias, cond
                    )
                )
                counts[table] = cur.fetchone()[0]
            groups = None
            if p.rule.summary:
                alias = aliases()
                cur.execute(
                    sql.SQL(
                        "SELECT count(*) FROM (SELECT DISTINCT {} FROM {} {} WHERE {}) g"
                    ).format(_summary_keys(p, alias), sql.Identifier(p.table), alias, root(alias))
                )
                groups = cur.fetchone()[0]
            out.append(
                TablePreview(
                    table=p.table,
                    action=p.rule.action,
                    cutoff=p.cutoff,
                    rows=counts.pop(p.table),
                    cascaded=counts,
                    target=p.rule.target(),
                    summary_groups=groups,
                )
            )
    conn.rollback()
    return out


# ---- archive and summary tables ----------------------------------------------------------
def _summary_keys(p: TablePlan, alias: sql.Identifier) -> sql.Composable:
    s = p.rule.summary
    assert s is not None
    return sql.SQL(", ").join(
        [
            *(_col(alias, c) for c in s.group_by),
            sql.SQL("date_trunc({}, {})::timestamp(3)").format(
                sql.Literal(s.period), _col(alias, p.rule.timestamp)
            ),
        ]
    )


def _summary_select(p: TablePlan, source: sql.Composable, alias: sql.Identifier) -> sql.Composed:
    """``SELECT group, period, count(*), aggregates FROM source GROUP BY group, period``."""
    s = p.rule.summary
    assert s is not None
    exprs: list[sql.Composable] = [
        *(_col(alias, c) for c in s.group_by),
        sql.SQL("date_trunc({}, {})::timestamp(3)").format(
            sql.Literal(s.period), _col(alias, p.rule.timestamp)
        ),
    ]
    names = [*s.group_by, "periodStart"]
    for name, column, fn in s.output_columns():
        if fn == "rows":
            exprs.append(sql.SQL("count(*)"))
        elif fn == "sum":
            exprs.append(sql.SQL("sum({})::numeric").format(_col(alias, column)))
        else:
            exprs.append(_MIN_MAX_COUNT[fn].format(_col(alias, column)))
        names.append(name)
    n_keys = len(s.group_by) + 1
    return sql.SQL("SELECT {} FROM {} {} GROUP BY {}").format(
        sql.SQL(", ").join(
            sql.SQL("{} AS {}").format(e, sql.Identifier(n))
            for e, n in zip(exprs, names, strict=True)
        ),
        source,
        alias,
        sql.SQL(", ").join(sql.Literal(i) for i in range(1, n_keys + 1)),
    )


def ensure_targets(dsn: str, plans: list[TablePlan]) -> list[str]:
    """Create missing archive and summary tables (idempotent); returns those created."""
    created = []
    with connect(dsn, application_name=APPLICATION_NAME) as conn, conn.cursor() as cur:
        # Two runs starting together must not both find a table missing and both create it.
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('wedefi_dr_retention_targets'))")
        for p in plans:
            rule = p.rule
            target = rule.target()
            if not target:
                continue
            cur.execute(
                "SELECT to_regclass(%s) IS NOT NULL", (sql.Identifier(target).as_string(cur),)
            )
            if cur.fetchone()[0]:
                continue
            cur.execute(
                sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{p.lock_timeout_ms}ms"))
            )
            if rule.archive_table:
                # Same columns, types, defaults and indexes (the key stays unique: a row
                # can never be archived twice); no foreign keys, so the archive never
                # blocks or follows deletes elsewhere.
                cur.execute(
                    sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(
                        sql.Identifier(target), sql.Identifier(rule.table)
                    )
                )
            else:
                s = rule.summary
                assert s is not None
                alias = sql.Identifier("s")
                cur.execute(
                    sql.SQL("CREATE TABLE {} AS {} WITH NO DATA").format(
                        sql.Identifier(target),
                        _summary_select(p, sql.Identifier(rule.table), alias),
                    )
                )
                cur.execute(
                    sql.SQL(
                        "ALTER TABLE {} ADD COLUMN {} timestamp(3) NOT NULL DEFAULT now()"
                    ).format(sql.Identifier(target), sql.Identifier("updatedAt"))
                )
                cur.execute(
                    sql.SQL(
                        "ALTER TABLE {} ADD CONSTRAINT {} UNIQUE NULLS NOT DISTINCT ({})"
                    ).format(
                        sql.Identifier(target),
                        sql.Identifier(f"{target}_group_key"[:63]),
                        sql.SQL(", ").join(sql.Identifier(c) for c in [*s.group_by, "periodStart"]),
                    )
                )
            created.append(target)
    return created


# ---- the run -------------------------------------------------------------------------------
@dataclass
class TableResult:
    """What one table's committed batches did; filled batch by batch (partial on failure)."""

    table: str
    action: str
    cutoff: datetime
    removed: int = 0
    archived: int = 0
    # Rows whose identical copy was already in the archive: only deleted from the table.
    already_archived: int = 0
    summarized: int = 0
    cascaded: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    lock_timeouts: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _select_batch(p: TablePlan, after: Any) -> sql.Composed:
    alias = sql.Identifier("r")
    keyset = (
        sql.SQL(" AND {} > %(after)s").format(_col(alias, p.key))
        if after is not None
        else sql.SQL("")
    )
    return sql.SQL(
        "SELECT {} FROM {} {} WHERE {}{} ORDER BY {} LIMIT %(limit)s FOR UPDATE OF {}"
    ).format(
        _col(alias, p.key),
        sql.Identifier(p.table),
        alias,
        qualifies(p, alias, [], _Aliases()),
        keyset,
        _col(alias, p.key),
        alias,
    )


def _cascade_counts(p: TablePlan) -> list[tuple[str, sql.Composed]]:
    out = []
    for table in p.cascaded_tables:
        aliases = _Aliases()
        alias = aliases()
        cond = reach(p, table, alias, _root_in_batch(p), aliases)
        out.append(
            (
                table,
                sql.SQL("SELECT count(*) FROM {} {} WHERE {}").format(
                    sql.Identifier(table), alias, cond
                ),
            )
        )
    return out


def _action_statement(p: TablePlan) -> sql.Composed:
    """One statement: delete the batch and (archive|summarize) exactly the deleted rows.

    Returns ``(rows deleted, rows written to the target, rows already archived as they
    are, rows whose archived copy differs, some of those keys)``. A row that comes back to
    the hot table after it was archived (a table-level restore, a re-insert) is not
    archived twice: an identical archived copy makes the move already done, so the row is
    only deleted; a different one is reported and the caller rolls the batch back.
    """
    rule = p.rule
    src = sql.Identifier(rule.table)
    key = sql.Identifier(p.key)
    if rule.action == "delete":
        return sql.SQL(
            "WITH gone AS (DELETE FROM {} WHERE {} = ANY(%(keys)s) RETURNING 1) "
            "SELECT count(*), 0, 0, 0, NULL FROM gone"
        ).format(src, key)
    if rule.action == "archive":
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in p.columns)
        g, a = sql.Identifier("g"), sql.Identifier("a")

        def row(alias: sql.Identifier) -> sql.Composable:
            # As text: every type has one (json has no equality operator), and a copy
            # is identical only if it reads back the same.
            return sql.SQL("ROW({})::text").format(
                sql.SQL(", ").join(_col(alias, c) for c in p.columns)
            )

        # The archive as it was before this statement (its snapshot): rows already there.
        return sql.SQL(
            "WITH gone AS (DELETE FROM {src} WHERE {key} = ANY(%(keys)s) RETURNING {cols}), "
            "moved AS (INSERT INTO {dst} ({cols}) SELECT {cols} FROM gone "
            "ON CONFLICT ({key}) DO NOTHING RETURNING 1), "
            "present AS (SELECT {gk} AS k, {grow} = {arow} AS same "
            "FROM gone {g} JOIN {dst} {a} ON {ak} = {gk}) "
            "SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM moved), "
            "(SELECT count(*) FROM present WHERE same), "
            "(SELECT count(*) FROM present WHERE NOT same), "
            "(SELECT array_agg(k ORDER BY k) FROM (SELECT k FROM present WHERE NOT same "
            "ORDER BY k LIMIT {shown}) d)"
        ).format(
            src=src,
            key=key,
            cols=cols,
            dst=sql.Identifier(rule.archive_table),
            g=g,
            a=a,
            gk=_col(g, p.key),
            ak=_col(a, p.key),
            grow=row(g),
            arow=row(a),
            shown=sql.Literal(CONFLICT_IDS_SHOWN),
        )
    s = rule.summary
    assert s is not None
    dst = sql.Identifier(s.table)
    merged = sql.Identifier("m")
    keys = [*s.group_by, "periodStart"]
    outputs = s.output_columns()
    sets = []
    for name, _, fn in outputs:
        old, new = _col(merged, name), sql.SQL("EXCLUDED.{}").format(sql.Identifier(name))
        if fn in ("rows", "count"):
            expr = sql.SQL("{} + {}").format(old, new)
        elif fn == "sum":
            expr = sql.SQL(
                "CASE WHEN {o} IS NULL THEN {n} WHEN {n} IS NULL THEN {o} ELSE {o} + {n} END"
            ).format(o=old, n=new)
        else:
            expr = sql.SQL("LEAST({}, {})" if fn == "min" else "GREATEST({}, {})").format(old, new)
        sets.append(sql.SQL("{} = {}").format(sql.Identifier(name), expr))
    sets.append(sql.SQL("{} = now()").format(sql.Identifier("updatedAt")))
    names = [*keys, *(n for n, _, _ in outputs)]
    return sql.SQL(
        "WITH gone AS (DELETE FROM {src} WHERE {key} = ANY(%(keys)s) RETURNING *), "
        "merged AS (INSERT INTO {dst} AS m ({names}) {select} "
        "ON CONFLICT ({keys}) DO UPDATE SET {sets} RETURNING 1) "
        "SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM merged), 0, 0, NULL"
    ).format(
        src=src,
        key=key,
        dst=dst,
        names=sql.SQL(", ").join(sql.Identifier(n) for n in names),
        select=_summary_select(p, sql.Identifier("gone"), sql.Identifier("g")),
        keys=sql.SQL(", ").join(sql.Identifier(k) for k in keys),
        sets=sql.SQL(", ").join(sets),
    )


def _set_timeouts(cur, p: TablePlan) -> None:
    cur.execute(
        "SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)",
        (f"{p.lock_timeout_ms}ms", f"{p.statement_timeout_ms}ms"),
    )


def run_table(
    dsn: str,
    p: TablePlan,
    result: TableResult,
    *,
    pause_seconds: float = 0.0,
    progress: Callable[[TableResult], None] | None = None,
) -> TableResult:
    """Apply one rule batch by batch until no row qualifies; ``result`` grows per commit.

    A lock timeout rolls the batch back and retries it (``lock_retries`` times, with a
    growing pause); a statement timeout also halves the batch. Two runs never work on the
    same table at once (a session advisory lock, released if this process dies).
    """
    started = time.monotonic()
    # Named per table in pg_stat_activity, so an operator sees which table a batch is on.
    conn = psycopg2.connect(
        dsn, application_name=f"{APPLICATION_NAME}:{p.table}", options="-c TimeZone=UTC"
    )
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_try_advisory_lock(hashtext('wedefi_dr_retention'), hashtext(%s))",
                (p.table,),
            )
            if not cur.fetchone()[0]:
                raise RetentionBusy(f"another retention run is working on {p.table}")
            if conn.server_version >= 140000:
                # A killed worker's backend notices at once and lets its row locks go.
                cur.execute("SET client_connection_check_interval = '1s'")
            conn.commit()
            select, cascades, action = None, _cascade_counts(p), _action_statement(p)
            after, limit, failures = None, p.batch_size, 0
            while True:
                try:
                    _set_timeouts(cur, p)
                    select = _select_batch(p, after)
                    cur.execute(select, {"after": after, "limit": limit})
                    keys = [row[0] for row in cur.fetchall()]
                    if not keys:
                        conn.rollback()
                        break
                    counted = {}
                    for table, statement in cascades:
                        cur.execute(statement, {"keys": keys})
                        counted[table] = cur.fetchone()[0]
                    cur.execute(action, {"keys": keys})
                    gone, written, identical, differing, some = cur.fetchone()
                    if differing:
                        raise ArchiveConflict(
                            f"{p.table}: {differing} rows to archive already have a different "
                            f"copy in {p.rule.archive_table} ({p.key} "
                            f"{', '.join(map(str, some))}"
                            f"{', ...' if differing > len(some) else ''}); batch rolled back, "
                            "both copies kept. A rerun cannot finish this table until each "
                            f"row is resolved: delete the copy from {p.table} or from "
                            f"{p.rule.archive_table}"
                        )
                    if gone != len(keys) or (
                        p.rule.action == "archive" and written + identical != gone
                    ):
                        raise RetentionFailed(
                            f"{p.table}: batch after {after!r} locked {len(keys)} rows but "
                            f"deleted {gone} and wrote {written} ({identical} already "
                            "archived); rolled back"
                        )
                    conn.commit()
                except (psycopg2.errors.LockNotAvailable, psycopg2.errors.QueryCanceled) as exc:
                    conn.rollback()
                    failures += 1
                    result.lock_timeouts += 1
                    if isinstance(exc, psycopg2.errors.QueryCanceled):
                        limit = max(1, limit // 2)
                    if failures > p.lock_retries:
                        raise RetentionFailed(
                            f"{p.table}: batch after {after!r} gave up after {failures} "
                            f"timeouts ({type(exc).__name__}); committed batches stay done, "
                            "the next run continues from there"
                        ) from exc
                    time.sleep(min(30.0, 0.5 * 2**failures))
                    continue
                except BaseException:
                    conn.rollback()
                    raise
                failures = 0
                after = keys[-1]
                result.batches += 1
                result.removed += gone
                if p.rule.action == "archive":
                    result.archived += written
                    result.already_archived += identical
                elif p.rule.action == "summarize":
                    result.summarized += gone
                for table, n in counted.items():
                    result.cascaded[table] = result.cascaded.get(table, 0) + n
                result.seconds = time.monotonic() - started
                if progress:
                    progress(result)
                if pause_seconds:
                    time.sleep(pause_seconds)
    finally:
        conn.close()
    result.seconds = time.monotonic() - started
    return result


def new_result(p: TablePlan) -> TableResult:
    return TableResult(table=p.table, action=p.rule.action, cutoff=p.cutoff)


def dry_run(dsn: str, policy_path: str | Path, as_of: datetime | None) -> list[TablePreview]:
    """Validate and count: what a run at ``as_of`` would do, changing nothing."""
    policy = load_policy(policy_path)
    with connect(dsn, application_name=APPLICATION_NAME) as conn:
        return preview(conn, plan(conn, policy, as_of))


# ---- metrics ---------------------------------------------------------------------------------
def retention_registry(
    *, database: str, results: list[dict[str, Any]], totals: list[dict[str, Any]]
) -> CollectorRegistry:
    """This run's rows and durations per table, plus totals from the audit log (durable)."""
    m = MetricSet()
    for t in totals:
        labels = {"database": database, "table": str(t["table"])}
        m.counter(
            "retention_rows_removed",
            "Rows deleted from the table by retention (all runs).",
            t["removed"],
            **labels,
        )
        m.counter(
            "retention_rows_archived",
            "Rows moved to the archive table (all runs).",
            t["archived"],
            **labels,
        )
        m.counter(
            "retention_rows_summarized",
            "Detail rows folded into the summary table.",
            t["summarized"],
            **labels,
        )
        m.counter(
            "retention_failures", "Retention runs of the table that failed.", t["failed"], **labels
        )
        m.gauge(
            "retention_last_success_timestamp_seconds",
            "Unix time of the table's last successful retention.",
            t["last_success"],
            **labels,
        )
    for r in results:
        labels = {"database": database, "table": str(r["table"])}
        for kind in ("removed", "archived", "summarized"):
            m.gauge(
                "retention_run_rows",
                "Rows this run acted on, by kind.",
                r[kind],
                **labels,
                kind=kind,
            )
        for child, n in r["cascaded"].items():
            m.gauge(
                "retention_run_cascaded_rows",
                "Rows this run deleted by cascade, by child table.",
                n,
                **labels,
                child=child,
            )
        m.gauge(
            "retention_duration_seconds",
            "Duration of this run's work on the table.",
            r["seconds"],
            **labels,
        )
    return m.registry()
