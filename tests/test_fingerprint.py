"""The content hash sees every change and ignores physical order."""

from __future__ import annotations

import json

from wedefi_dr.observability.audit import scrub
from wedefi_dr.postgres.conninfo import ConnTarget, with_dbname
from wedefi_dr.postgres.fingerprint import compare, fingerprint_tables
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
