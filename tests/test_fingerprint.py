"""The content hash sees every change and ignores physical order."""

from __future__ import annotations

import json

from wedefi_dr.observability.audit import scrub
from wedefi_dr.postgres.conninfo import ConnTarget, with_dbname
from wedefi_dr.postgres.fingerprint import (
    TEXT_METHOD,
    TYPED_METHOD,
    USER_TABLES_SQL,
    compare,
    fingerprint_tables,
)
from wedefi_dr.postgres.tools import connect


def _make(admin_dsn: str, name: str, rows: list[tuple]) -> str:
    with connect(with_dbname(admin_dsn, "postgres"), autocommit=True) as conn:
        conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.cursor().execute(f'CREATE DATABASE "{name}"')
    dsn = with_dbname(admin_dsn, name)
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            'CREATE TABLE "T" (id int, "usdValue" numeric(36,18), at timestamp(3), '
            "meta jsonb, f float8)"
        )
        cur.executemany('INSERT INTO "T" VALUES (%s, %s, %s, %s, %s)', rows)
    with connect(dsn) as conn:
        return fingerprint_tables(conn)


def test_hash_ignores_order_and_sees_every_change(settings):
    admin = settings.primary_dsn.get_secret_value()
    rows = [
        (
            i,
            f"{i}.000000000000000001",
            f"2026-01-0{i % 9 + 1} 00:00:00.123",
            json.dumps({"a": i}),
            i / 3,
        )
        for i in range(50)
    ]
    base = _make(admin, "fp_a", rows)
    assert base == _make(admin, "fp_b", list(reversed(rows)))
    changed = list(rows)
    changed[7] = (7, "7.000000000000000002", *rows[7][2:])  # one unit in the 18th decimal
    assert compare(base, _make(admin, "fp_c", changed)) == [
        "public.T: same row count, different content"
    ]
    duplicated = rows[:-1] + [rows[0]]  # same count, one row replaced by a duplicate
    assert compare(base, _make(admin, "fp_d", duplicated)) != []
    assert compare(base, _make(admin, "fp_e", rows[:-1])) == [
        "public.T: 49 rows, the backup holds 50"
    ]


def _fresh(admin_dsn: str, name: str) -> str:
    with connect(with_dbname(admin_dsn, "postgres"), autocommit=True) as conn:
        conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.cursor().execute(f'CREATE DATABASE "{name}"')
    return with_dbname(admin_dsn, name)


def test_columns_hash_by_their_types_where_equality_is_identity_else_by_their_text(settings):
    """Under the typed method a column counts by its type's own hash only when that type's
    equality is identity (equal values print the same); any other column counts by the
    hash of its text: json (no hash function), jsonb and undeclared-scale numeric
    (1.5 = 1.50), float (-0 = 0), interval ('1 day' = '24 hours'), a nondeterministic
    collation. Both methods see a change in any column, and they give different digests."""
    dsn = _fresh(settings.primary_dsn.get_secret_value(), "fp_types")
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TYPE mood AS ENUM ('calm', 'alert'); "
            "CREATE DOMAIN usd AS numeric(36, 18); "
            "CREATE COLLATION nocase (provider = icu, locale = 'und-u-ks-level2', "
            "deterministic = false); "
            "CREATE TABLE typed (id int8, tags text[], m mood, v usd, w numeric(10, 2), "
            "at timestamptz, b bytea, ok bool, u uuid); "
            "CREATE TABLE with_json (id int, j json); "
            "CREATE TABLE with_jsonb (id int, j jsonb); "
            "CREATE TABLE with_numeric (id int, v numeric); "
            "CREATE TABLE with_float (id int, f float8); "
            "CREATE TABLE with_interval (id int, span interval); "
            "CREATE TABLE with_interval_array (id int, spans interval[]); "
            "CREATE TABLE with_nocase (id int, name text COLLATE nocase); "
            "CREATE TABLE no_columns (); "
            "INSERT INTO typed VALUES (1, '{a,b}', 'calm', 1.5, 2.25, '2026-01-01 00:00+00', "
            "'\\x00ff', true, gen_random_uuid()); "
            """INSERT INTO with_json VALUES (1, '{"k": 1}'); """
            """INSERT INTO with_jsonb VALUES (1, '{"k": 1.5}'); """
            "INSERT INTO with_numeric VALUES (1, 1.5); "
            "INSERT INTO with_float VALUES (1, 0); "
            "INSERT INTO with_interval VALUES (1, '1 day'); "
            "INSERT INTO with_interval_array VALUES (1, '{1 day}'); "
            "INSERT INTO with_nocase VALUES (1, 'Alice'); "
            "INSERT INTO no_columns DEFAULT VALUES"
        )
        cur.execute(USER_TABLES_SQL)
        row_hash = {t: expression for _, t, expression in cur.fetchall()}
    assert row_hash["typed"] == (
        "hash_record_extended(ROW(t.id, t.tags, t.m, t.v, t.w, t.at, t.b, t.ok, t.u), 0)"
    )
    for table in ("with_json", "with_jsonb", "with_numeric", "with_float", "with_nocase"):
        column = row_hash[table].split(", ")[1]
        assert column.startswith("hashtextextended(t."), (table, row_hash[table])
    assert row_hash["with_interval_array"] == (
        'hash_record_extended(ROW(t.id, hashtextextended(t.spans::text COLLATE "C", 0)), 0)'
    )
    assert row_hash["no_columns"] == "hashtextextended(t::text, 0)"
    with connect(dsn) as conn:
        typed, text = fingerprint_tables(conn), fingerprint_tables(conn, method=TEXT_METHOD)
    assert typed["public.typed"]["content_hash"] != text["public.typed"]["content_hash"]
    changes = {
        "typed": "UPDATE typed SET tags = '{a,c}'",
        "with_json": """UPDATE with_json SET j = '{"k":  1}'""",  # only the spacing
        "with_jsonb": """UPDATE with_jsonb SET j = '{"k": 1.50}'""",
        "with_numeric": "UPDATE with_numeric SET v = 1.50",
        "with_float": "UPDATE with_float SET f = '-0'",
        "with_interval": "UPDATE with_interval SET span = '24 hours'",
        "with_nocase": "UPDATE with_nocase SET name = 'alice'",
    }
    for table, change in changes.items():
        with connect(dsn) as conn, conn.cursor() as cur:
            cur.execute(change)
        with connect(dsn) as conn:
            for method, before in ((TYPED_METHOD, typed), (TEXT_METHOD, text)):
                after = fingerprint_tables(conn, method=method)
                assert compare(before, after) == [
                    f"public.{table}: same row count, different content"
                ], (method, table)
                before.update(after)


def test_redaction_of_dsns_and_messages():
    redacted = ConnTarget.parse(
        "host=db user=u password=s3cret dbname=x", allow_password=True
    ).redacted
    assert "s3cret" not in redacted
    assert set(redacted.split()) == {"host=db", "user=u", "password=***", "dbname=x"}
    assert "s3cret" not in scrub("connect failed: password=s3cret host=db")
    assert "topsecret" not in scrub("gpg said topsecret", ("topsecret",))


def test_row_data_quoted_by_postgres_is_scrubbed_and_the_reason_kept():
    """The other shapes of PostgreSQL's quoted values (the restore test meets two)."""
    cases = {
        "DETAIL:  Key (id, w)=(42, (x)) already exists.": (
            "DETAIL:  Key (id, w)=(***) already exists."
        ),
        'DETAIL:  Key (wallet)=(0xabc) is not present in table "w".': (
            'DETAIL:  Key (wallet)=(***) is not present in table "w".'
        ),
        'ERROR:  invalid input syntax for type integer: "abc"': (
            'ERROR:  invalid input syntax for type integer: "***"'
        ),
        'ERROR:  value "99999999999" is out of range for type integer': (
            'ERROR:  value "***" is out of range for type integer'
        ),
        'DETAIL:  Token "s3" is invalid.': 'DETAIL:  Token "***" is invalid.',
        'FATAL:  password authentication failed for user "postgres"': (
            'FATAL:  password authentication failed for user "postgres"'
        ),
    }
    for message, expected in cases.items():
        assert scrub(message) == expected
