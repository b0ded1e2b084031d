"""The exact command lines of pg_dump, pg_restore and pg_basebackup (borgmatic style).

Each is built by a pure function from a ConnTarget; the connection travels whole in one
``--dbname=`` argument, so no key of the DSN can be lost on the way to the tool, and a
hostile value can never become a separate option.
"""

from __future__ import annotations

from psycopg2.extensions import parse_dsn

from wedefi_dr.logical.backup import dump_command
from wedefi_dr.logical.build import load_command
from wedefi_dr.logical.restore import apply_command, restore_command
from wedefi_dr.physical.basebackup import basebackup_command
from wedefi_dr.postgres.conninfo import ConnTarget, passfile_for
from wedefi_dr.postgres.tools import tool

TARGET = ConnTarget.parse(
    "hostaddr=127.0.0.1 port=5433 user=postgres dbname=wedefi_copy sslmode=disable password=s3cret",
    allow_password=True,
)
# The password travels in a private passfile the conninfo names, never on argv.
CONNINFO = (
    "--dbname=user=postgres dbname=wedefi_copy hostaddr=127.0.0.1 port=5433 sslmode=disable "
    f"passfile={passfile_for('s3cret')}"
)
# A dbname an attacker (or a typo) might pass: quote, newline, spaces, leading dash, '='.
HOSTILE_DB = "-x'; DROP DATABASE wedefi --\nhost=evil"
HOSTILE = ConnTarget.parse(
    "host=/tmp/sock port=5433 dbname='-x\\'; DROP DATABASE wedefi --\nhost=evil'",
    allow_password=False,
)


def test_pg_dump_command():
    assert dump_command(TARGET, "00000003-0000001B-1", 9) == [
        tool("pg_dump"),
        "--format=custom",
        "--compress=9",
        "--snapshot=00000003-0000001B-1",
        "--no-password",
        CONNINFO,
    ]


def test_pg_restore_command():
    """pg_restore connects nowhere: it turns the archive into SQL for psql."""
    assert restore_command() == [
        tool("pg_restore"),
        "--clean",
        "--if-exists",
        "--file=-",
    ]


def test_parallel_pg_restore_command():
    """A new database is loaded over several sessions, from the archive's memory file (a
    file it can seek in), stopping at the first error."""
    assert load_command(TARGET, 7, 2, no_owner=True) == [
        tool("pg_restore"),
        "--jobs=2",
        "--exit-on-error",
        "--verbose",
        "--no-password",
        "--no-owner",
        CONNINFO,
        "/dev/fd/7",
    ]


def test_psql_apply_command():
    assert apply_command(TARGET) == [
        tool("psql"),
        "--no-psqlrc",
        "--quiet",
        "--no-password",
        "--single-transaction",
        "--set=ON_ERROR_STOP=1",
        "--file=-",
        CONNINFO,
    ]


def test_pg_basebackup_command():
    assert basebackup_command(TARGET, "wedefi-dr 20261201T000000Z") == [
        tool("pg_basebackup"),
        CONNINFO,
        "-D",
        "-",
        "--format=tar",
        "--wal-method=fetch",
        "--checkpoint=fast",
        "--label=wedefi-dr 20261201T000000Z",
        "--no-password",
    ]


def test_no_command_line_shows_the_password():
    for argv in (
        dump_command(TARGET, "snap", 0),
        apply_command(TARGET),
        basebackup_command(TARGET, "l"),
    ):
        assert not any("s3cret" in a or "password=" in a for a in argv)


def test_hostile_values_stay_one_argument():
    for argv, extra in (
        (dump_command(HOSTILE, "snap", 9), 5),
        (apply_command(HOSTILE), 7),
        (basebackup_command(HOSTILE, "-l\n--label=x"), 8),
    ):
        assert len(argv) == extra + 1
        (conninfo,) = [a for a in argv if a.startswith("--dbname=")]
        # The tool's libpq reads back exactly the hostile name, as one value.
        assert parse_dsn(conninfo.removeprefix("--dbname=")) == {
            "host": "/tmp/sock",
            "port": "5433",
            "dbname": HOSTILE_DB,
        }
    assert basebackup_command(HOSTILE, "-l\n--label=x")[-2] == "--label=-l\n--label=x"
