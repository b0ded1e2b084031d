"""Per-table row counts and content hashes: the proof that a restore reproduces the source.

The hash is order-independent (a restore does not keep physical row order): each row gets
a 64-bit hash (the portable hash functions PostgreSQL's hash partitioning relies on) and
the hashes are summed exactly as a numeric, so equal tables give equal sums whatever their
order, and any changed, added or removed row moves the sum (a miss needs a 64-bit
collision). A row's hash combines its columns' (``hash_record_extended``): a column whose
type's equality is identity counts by its type's own hash, any other by the hash of its
text form (``hashtextextended``); printing numerics and timestamps was most of a
fingerprint's CPU, which the backup pays beside pg_dump and a restore inside its
transaction. ``FINGERPRINT_METHOD`` is what a new backup records; a restore computes the
method its manifest names (:data:`METHODS`), so it never compares hashes computed two
different ways and older backups stay verifiable. Sessions run with ``TimeZone=UTC``,
``DateStyle=ISO`` and ``extra_float_digits=1`` so the text form is the same on every server
that holds the same data. A restore takes the tables' fingerprints inside its own
transaction, through psql (:func:`session_table_queries`); both paths run the queries of
:func:`table_queries_sql`, so they compute the same thing.

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

from psycopg2.extensions import connection

TEXT_METHOD = "hashtextextended64-sum/v2-sequences-lo-matviews"
TYPED_METHOD = "typed-hash64-sum/v3-sequences-lo-matviews"
# What a new backup records; a restore computes whichever of METHODS its manifest names.
FINGERPRINT_METHOD = TYPED_METHOD
METHODS = (TEXT_METHOD, TYPED_METHOD)
LARGE_OBJECTS = "large objects"
SEQUENCE_PREFIX = "sequence "
# Fingerprints by manifest entry name (tables, "large objects", "sequence <name>").
Fingerprints = dict[str, dict[str, object]]

# Types whose own 64-bit hash function (the one hash partitioning uses) hashes a value
# without printing it, and whose equality is identity: two equal values have the same text
# form, so a hash of the value proves what a hash of its text proves. numeric counts only
# with a declared scale (numeric(p, s): else 1.5 = 1.50); left out: float (-0 = 0), jsonb
# (its numbers compare as numeric), interval ('1 day' = '24 hours'), bpchar (trailing
# spaces), and text under a nondeterministic collation (equality may ignore case).
IDENTITY_TYPES = (
    "int2", "int4", "int8", "bool", "text", "varchar", "uuid", "timestamp", "timestamptz",
    "date", "bytea",
)  # fmt: skip
_IDENTITY = "ARRAY[" + ", ".join(f"'{t}'::regtype" for t in IDENTITY_TYPES) + "]::oid[]"
# The column ``a`` (type ``ty``; ``b``: a domain's base type) hashes itself: its type (an
# array: its element type) is one of IDENTITY_TYPES or an enum, its collation deterministic.
_HASHES_ITSELF = f"""coalesce((SELECT x.typtype = 'e' OR x.oid = ANY({_IDENTITY})
                  OR (x.oid = 'numeric'::regtype AND greatest(a.atttypmod, ty.typtypmod) <> -1)
                FROM pg_type x
                WHERE x.oid = CASE WHEN b.typcategory = 'A' THEN b.typelem ELSE b.oid END), false)
     AND coalesce((SELECT co.collisdeterministic FROM pg_collation co
                   WHERE co.oid = a.attcollation), true)"""
# A row's 64-bit hash, over the alias ``t``. TEXT_METHOD: its text form hashed. TYPED_METHOD:
# every column that hashes itself as it is, every other one as its text form's hash (in
# the C collation: a nondeterministic one would hash 'Alice' as 'alice'), the whole
# combined by hash_record_extended; printing numerics and timestamps was most of a
# fingerprint's CPU (on the bench's largest table 6.5 s of 7.1 s for the text form, 2.4 s
# typed).
TEXT_ROW_HASH = "hashtextextended(t::text, 0)"
_TYPED_ROW_HASH = f"""(SELECT coalesce('hash_record_extended(ROW(' || string_agg(
       CASE WHEN {_HASHES_ITSELF} THEN format('t.%I', a.attname)
            ELSE format('hashtextextended(t.%I::text COLLATE "C", 0)', a.attname) END,
       ', ' ORDER BY a.attnum) || '), 0)', '{TEXT_ROW_HASH}')
   FROM pg_attribute a
   JOIN pg_type ty ON ty.oid = a.atttypid
   JOIN pg_type b ON b.oid = CASE WHEN ty.typtype = 'd' THEN ty.typbasetype ELSE ty.oid END
   WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)"""

# What is fingerprinted: the tables and the populated materialized views (schema, name),
# with the SQL of a row's hash under TYPED_METHOD.
USER_TABLES_SQL = f"""SELECT n.nspname, c.relname, {_TYPED_ROW_HASH} AS typed_hash FROM pg_class c
   JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE (c.relkind IN ('r', 'p') OR (c.relkind = 'm' AND c.relispopulated))
     AND n.nspname NOT IN ('pg_catalog', 'information_schema')
     AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
   ORDER BY 1, 2"""

FINGERPRINT_SETTINGS = (
    "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, YMD'; "
    "SET LOCAL extra_float_digits = 1; SET LOCAL IntervalStyle = 'postgres'"
)


def table_name(schema: str, table: str) -> str:
    """The manifest's key for a table: ``schema.Table`` (unquoted, unambiguous here)."""
    return f"{schema}.{table}"


def _require_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown fingerprint method {method!r} (known: {', '.join(METHODS)})")


def table_queries_sql(method: str = FINGERPRINT_METHOD) -> str:
    """A query whose rows are ``(name, query)``: per table, the SQL of its fingerprint,
    ``SELECT count, sum`` of its rows' hashes as ``method`` computes them. The backup runs
    each through psycopg2, a restore through psql's ``\\gexec`` in its own transaction:
    one definition, so both compute the same thing."""
    _require_method(method)
    row_hash = "typed_hash" if method == TYPED_METHOD else f"'{TEXT_ROW_HASH}'"
    return (
        "SELECT nspname || '.' || relname, format('SELECT count(*), "
        "coalesce(sum(%s), 0) FROM %I.%I t', "
        + row_hash
        + ", nspname, relname) FROM ("
        + USER_TABLES_SQL
        + ") AS user_tables"
    )


def fingerprint_tables(
    conn: connection,
    progress: Callable[[str, int], None] | None = None,
    *,
    sequences: bool = True,
    method: str = FINGERPRINT_METHOD,
) -> dict[str, dict[str, object]]:
    """``{"public.Wallet": {"rows": n, "content_hash": hex}}`` for each table.

    Runs inside the caller's transaction, so a REPEATABLE READ transaction that exported
    the snapshot pg_dump uses describes exactly what the dump holds. A backup passes
    ``sequences=False`` and reads them itself before the dump starts (they ignore snapshots).
    """
    result: dict[str, dict[str, object]] = {}
    with conn.cursor() as cur:
        cur.execute(FINGERPRINT_SETTINGS)
        cur.execute(table_queries_sql(method))
        for name, query in cur.fetchall():
            cur.execute(query)
            rows, total = cur.fetchone()
            result[name] = table_entry(rows, total, method)
            if progress:
                progress(name, int(rows))
        result.update(_large_objects(cur, method))
        if sequences:
            result.update(_sequences(cur, method))
    return result


def sequence_fingerprints(conn: connection) -> dict[str, dict[str, object]]:
    """Each user sequence's entry, its position as of now: a lower bound for a later dump."""
    with conn.cursor() as cur:
        return _sequences(cur, FINGERPRINT_METHOD)


def table_entry(rows: object, total: object, method: str) -> dict[str, object]:
    """A table's manifest entry from its row count and hash sum (as numbers or their text:
    the text of an integer sum is what ``str`` gives of the number)."""
    return {"rows": int(str(rows)), "content_hash": _digest(method, int(str(rows)), total)}


def fingerprint_extras(
    conn: connection, method: str = FINGERPRINT_METHOD
) -> dict[str, dict[str, object]]:
    """The entries that are not tables: the large objects and each sequence."""
    with conn.cursor() as cur:
        cur.execute(FINGERPRINT_SETTINGS)
        return {**_large_objects(cur, method), **_sequences(cur, method)}


def is_table_entry(name: str) -> bool:
    """A manifest entry of a table or materialized view (not large objects, a sequence)."""
    return name != LARGE_OBJECTS and not name.startswith(SEQUENCE_PREFIX)


def session_table_queries(method: str = FINGERPRINT_METHOD) -> str:
    """A query whose rows are, per table, the SQL of that table's fingerprint as one JSON
    array ``[name, rows, sum as text]``: run with psql's ``\\gexec`` in the restore's own
    session, it fingerprints the restored tables inside the restore transaction with the
    queries :func:`fingerprint_tables` runs."""
    return (
        "SELECT format('SELECT json_build_array(%L, count, sum::text) FROM (%s) "
        "AS f(count, sum)', name, query) FROM (" + table_queries_sql(method) + ") AS q(name, query)"
    )


def _digest(method: str, *parts: object) -> str:
    return hashlib.sha256(":".join(map(str, (method, *parts))).encode()).hexdigest()


def _large_objects(cur, method: str) -> dict[str, dict[str, object]]:
    """All large objects as one entry (none: no entry, as for a database without any)."""
    cur.execute(
        "SELECT count(*), coalesce(sum(hashtextextended(m.oid::text || ':' || "
        "md5(lo_get(m.oid)), 0)), 0) FROM pg_largeobject_metadata m"
    )
    count, total = cur.fetchone()
    if not count:
        return {}
    return {LARGE_OBJECTS: {"rows": int(count), "content_hash": _digest(method, count, total)}}


def _sequences(cur, method: str) -> dict[str, dict[str, object]]:
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
            "content_hash": _digest(method, *definition),
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
