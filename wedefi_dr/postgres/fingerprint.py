"""Per-table row counts and content hashes: the proof that a restore reproduces the source.

The hash is order-independent (a restore does not keep physical row order): each row's
text form is hashed with ``hashtextextended`` (64-bit, the portable hash PostgreSQL's hash
partitioning relies on) and the hashes are summed exactly as a numeric, so equal tables
give equal sums whatever their order, and any changed, added or removed row moves the sum
(a miss needs a 64-bit collision). It replaced md5 halves, which cost four times the CPU:
on a 1 GB database that difference was most of the backup flow's overhead over bare
pg_dump. ``FINGERPRINT_METHOD`` is recorded in each manifest so a restore never compares
hashes computed two different ways. Sessions run with ``TimeZone=UTC``, ``DateStyle=ISO`` and
``extra_float_digits=1`` so the text form is the same on every server that holds the
same data. A restore takes the tables' fingerprints inside its own transaction, through
psql (:func:`session_table_queries`); both paths build on ``USER_TABLES_SQL`` and
``ROW_HASH_SQL``, so they compute the same thing.

Not only tables: a restore also brings back what pg_dump dumps besides rows.

* Materialized views (populated ones) are hashed like tables: a restore refreshes them
  from the restored tables, so a view that was stale in the source shows up as a
  difference, which it is.
* Large objects: one entry for all of them, each object's oid and md5 summed the same way.
* Sequences are not transactional: pg_dump reads a sequence's position when it reaches it,
  not in the exported snapshot, and a writer moves it meanwhile. So a sequence's entry
  hashes its definition (type, bounds, step, cycle), and its position is a lower bound,
  read before pg_dump starts (:func:`sequence_fingerprints`): whatever pg_dump reads later
  is at or past it, so a restored sequence that stands before it would hand out numbers
  already used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from psycopg2 import sql
from psycopg2.extensions import connection

FINGERPRINT_METHOD = "hashtextextended64-sum/v2-sequences-lo-matviews"
LARGE_OBJECTS = "large objects"
SEQUENCE_PREFIX = "sequence "

# What is fingerprinted: the tables and the populated materialized views (schema, name).
USER_TABLES_SQL = """SELECT n.nspname, c.relname FROM pg_class c
   JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE (c.relkind IN ('r', 'p') OR (c.relkind = 'm' AND c.relispopulated))
     AND n.nspname NOT IN ('pg_catalog', 'information_schema')
     AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
   ORDER BY 1, 2"""
# One table's fingerprint, over the alias ``t``: its row count and its rows' hash sum.
ROW_HASH_SQL = "count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)"

FINGERPRINT_SETTINGS = (
    "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, YMD'; "
    "SET LOCAL extra_float_digits = 1; SET LOCAL IntervalStyle = 'postgres'"
)


def user_tables(conn: connection) -> list[tuple[str, str]]:
    """Every ordinary and partitioned table, and every populated materialized view,
    outside the system schemas, sorted."""
    with conn.cursor() as cur:
        cur.execute(USER_TABLES_SQL)
        return [(s, t) for s, t in cur.fetchall()]


def table_name(schema: str, table: str) -> str:
    """The manifest's key for a table: ``schema.Table`` (unquoted, unambiguous here)."""
    return f"{schema}.{table}"


def fingerprint_tables(
    conn: connection,
    tables: list[tuple[str, str]] | None = None,
    progress: Callable[[str, int], None] | None = None,
    *,
    sequences: bool = True,
) -> dict[str, dict[str, object]]:
    """``{"public.Wallet": {"rows": n, "content_hash": hex}}`` for each table.

    Runs inside the caller's transaction, so a REPEATABLE READ transaction that exported
    the snapshot pg_dump uses describes exactly what the dump holds. A backup passes
    ``sequences=False`` and reads them itself before the dump starts (they ignore snapshots).
    """
    result: dict[str, dict[str, object]] = {}
    with conn.cursor() as cur:
        cur.execute(FINGERPRINT_SETTINGS)
        for schema, table in tables if tables is not None else user_tables(conn):
            cur.execute(
                sql.SQL("SELECT " + ROW_HASH_SQL + " FROM {} t").format(
                    sql.Identifier(schema, table)
                )
            )
            rows, total = cur.fetchone()
            result[table_name(schema, table)] = table_entry(rows, total)
            if progress:
                progress(table_name(schema, table), int(rows))
        if tables is None:
            result.update(_large_objects(cur))
            if sequences:
                result.update(_sequences(cur))
    return result


def sequence_fingerprints(conn: connection) -> dict[str, dict[str, object]]:
    """Each user sequence's entry, its position as of now: a lower bound for a later dump."""
    with conn.cursor() as cur:
        return _sequences(cur)


def table_entry(rows: object, total: object) -> dict[str, object]:
    """A table's manifest entry from its row count and hash sum (as numbers or their text:
    the text of an integer sum is what ``str`` gives of the number)."""
    return {"rows": int(str(rows)), "content_hash": _digest(int(str(rows)), total)}


def fingerprint_extras(conn: connection) -> dict[str, dict[str, object]]:
    """The entries that are not tables: the large objects and each sequence."""
    with conn.cursor() as cur:
        cur.execute(FINGERPRINT_SETTINGS)
        return {**_large_objects(cur), **_sequences(cur)}


def is_table_entry(name: str) -> bool:
    """A manifest entry of a table or materialized view (not large objects, a sequence)."""
    return name != LARGE_OBJECTS and not name.startswith(SEQUENCE_PREFIX)


def session_table_queries() -> str:
    """A query whose rows are, per table, the SQL of that table's fingerprint as one JSON
    array ``[name, rows, sum as text]``: run with psql's ``\\gexec`` in the restore's own
    session, it fingerprints the restored tables inside the restore transaction with the
    same expression :func:`fingerprint_tables` uses."""
    return (
        "SELECT format('SELECT json_build_array(%L, count, sum::text) FROM (SELECT "
        + ROW_HASH_SQL.replace("'", "''")
        + " FROM %I.%I t) AS f(count, sum)', "
        "nspname || '.' || relname, nspname, relname) FROM (" + USER_TABLES_SQL + ") AS user_tables"
    )


def _digest(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, (FINGERPRINT_METHOD, *parts))).encode()).hexdigest()


def _large_objects(cur) -> dict[str, dict[str, object]]:
    """All large objects as one entry (none: no entry, as for a database without any)."""
    cur.execute(
        "SELECT count(*), coalesce(sum(hashtextextended(m.oid::text || ':' || "
        "md5(lo_get(m.oid)), 0)), 0) FROM pg_largeobject_metadata m"
    )
    count, total = cur.fetchone()
    if not count:
        return {}
    return {LARGE_OBJECTS: {"rows": int(count), "content_hash": _digest(count, total)}}


def _sequences(cur) -> dict[str, dict[str, object]]:
    """Each user sequence: its definition hashed, its position kept as a bound."""
    cur.execute(
        """SELECT schemaname, sequencename, data_type::text, start_value, min_value,
                  max_value, increment_by, cycle, last_value
           FROM pg_sequences
           WHERE schemaname NOT IN ('pg_catalog', 'information_schema')
           ORDER BY 1, 2"""
    )
    result: dict[str, dict[str, object]] = {}
    for schema, name, *definition, last_value in cur.fetchall():
        result[SEQUENCE_PREFIX + table_name(schema, name)] = {
            "rows": 0,
            "content_hash": _digest(*definition),
            "last_value": None if last_value is None else int(last_value),
            "increment_by": int(definition[4]),
        }
    return result


def _sequence_behind(want: dict[str, object], got: dict[str, object]) -> bool:
    """The restored sequence stands before the position the backup saw."""
    seen = want.get("last_value")
    if seen is None:
        return False
    now = got.get("last_value")
    if now is None:
        return True
    ascending = int(want.get("increment_by") or 1) > 0
    return int(now) < int(seen) if ascending else int(now) > int(seen)


def compare(
    expected: dict[str, dict[str, object]], actual: dict[str, dict[str, object]]
) -> list[str]:
    """Human-readable differences; empty when the two fingerprints are identical."""
    problems = []
    for name in sorted(set(expected) | set(actual)):
        want, got = expected.get(name), actual.get(name)
        if want is None:
            problems.append(f"{name}: present in the restore, not in the backup")
        elif got is None:
            problems.append(f"{name}: missing from the restore")
        elif want["rows"] != got["rows"]:
            problems.append(f"{name}: {got['rows']} rows, the backup holds {want['rows']}")
        elif want["content_hash"] != got["content_hash"]:
            problems.append(f"{name}: same row count, different content")
        elif name.startswith(SEQUENCE_PREFIX) and _sequence_behind(want, got):
            problems.append(
                f"{name}: at {got.get('last_value')}, before {want.get('last_value')} where "
                "the backup saw it (it would hand out numbers already used)"
            )
    return problems
