"""The command line's one way to fail, through the real CLI in a child process.

Each operator-caused failure class gets its documented exit status (README, Commands),
exactly one line ``error: <message>`` on stderr naming the problem, and no traceback.
Refusals happen before Prefect: the child's PREFECT_HOME, an empty folder, stays empty
(a flow run, even a refused one, would start an ephemeral API there and write its db).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import drop_backup
from wedefi_dr.catalog import listing
from wedefi_dr.catalog.manifest import BACKUP_ID_RE
from wedefi_dr.config import PROJECT_ROOT
from wedefi_dr.postgres.conninfo import dbname_of, with_dbname
from wedefi_dr_cli.common import (
    EXIT_BAD_INPUT,
    EXIT_SERVER_UNREACHABLE,
    EXIT_SETTINGS_MISSING,
    EXIT_TOOL_MISSING,
)

SECRET = "sekrit-pw-7f3a"


def free_port() -> int:
    """A port nobody listens on (bound once by us, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_env(prefect_home: Path, **extra: str) -> dict[str, str]:
    """A child environment with no WEDEFI_DR_* or PREFECT_* settings but ``extra``."""
    keep = {
        k: v
        for k, v in os.environ.items()
        if k in ("PATH", "HOME", "USER", "LANG", "TMPDIR") and v is not None
    }
    return {**keep, "PREFECT_HOME": str(prefect_home), "COLUMNS": "200", **extra}


def unreachable_settings(port: int) -> dict[str, str]:
    server = f"host=127.0.0.1 port={port} user=u password={SECRET}"
    return {
        "WEDEFI_DR_PRIMARY_DSN": f"{server} dbname=wedefi",
        "WEDEFI_DR_OPS_DSN": f"{server} dbname=ops",
        "WEDEFI_DR_GPG_PASSPHRASE": SECRET,
    }


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wedefi_dr_cli.app", *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *names: str):
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert SECRET not in result.stderr + result.stdout
    return lines[0]


def assert_no_prefect(prefect_home: Path) -> None:
    assert not prefect_home.exists() or not any(prefect_home.iterdir()), sorted(
        p.name for p in prefect_home.iterdir()
    )


def test_settings_missing_exit_3_names_every_variable_and_the_fix(tmp_path):
    home = tmp_path / "prefect"
    result = cli("backup", "--operator", "pytest", env=bare_env(home))
    assert_one_line_error(
        result,
        EXIT_SETTINGS_MISSING,
        "WEDEFI_DR_PRIMARY_DSN",
        "WEDEFI_DR_OPS_DSN",
        "WEDEFI_DR_GPG_PASSPHRASE",
        'eval "$(wedefi-dr stack env)"',
    )
    assert_no_prefect(home)


def test_binary_missing_exit_4_names_the_directory(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    home = tmp_path / "prefect"
    env = bare_env(home, WEDEFI_DR_PG_BINDIR=str(empty), **unreachable_settings(free_port()))
    line = assert_one_line_error(
        cli("backup", "--operator", "pytest", env=env), EXIT_TOOL_MISSING, str(empty)
    )
    assert "WEDEFI_DR_PG_BINDIR" in line
    assert_no_prefect(home)


def test_server_unreachable_exit_5_names_the_server_without_its_password(tmp_path):
    port = free_port()
    home = tmp_path / "prefect"
    line = assert_one_line_error(
        cli("backup", "--operator", "pytest", env=bare_env(home, **unreachable_settings(port))),
        EXIT_SERVER_UNREACHABLE,
        "cannot connect to",
        f"port={port}",
        "dbname=wedefi",
    )
    assert "password=***" in line
    assert_no_prefect(home)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["restore", "latest", "--target-dsn", "dbname=x", "--operator", " "]
            + ["--justification", "cli test"],
            "--operator is required",
        ),
        (
            ["pitr", "run", "--target", "time", "--value", "yesterday"]
            + ["--operator", "pytest", "--justification", "cli test"],
            "target time 'yesterday' is not ISO 8601",
        ),
        (
            ["dr-test", "run", "--provider", "docker", "--target-dsn", "dbname=x"],
            "--target-dsn is only for --provider dsn",
        ),
        (["backup", "--operator", "o" * 101], "operator is 101 characters long"),
        (["backup", "--operator", "ops\nFORGED line"], "control character (U+000A)"),
        (
            ["restore", "latest", "--target-dsn", "dbname=x", "--operator", "r" * 101]
            + ["--justification", "cli test"],
            "operator is 101 characters long",
        ),
        (
            ["pitr", "run", "--operator", "ops\u202eFORGED", "--justification", "cli test"],
            "control character (U+202E)",
        ),
        (
            ["failover", "--operator", "ops\rFORGED", "--justification", "cli test"],
            "control character (U+000D)",
        ),
    ],
    ids=[
        "restore-empty-operator",
        "pitr-bad-target",
        "dr-test-dsn-without-dsn-provider",
        "backup-operator-too-long",
        "backup-operator-control-character",
        "restore-operator-too-long",
        "pitr-operator-format-character",
        "failover-operator-control-character",
    ],
)
def test_bad_input_exit_2_before_any_flow_run(stack, tmp_path, args, message):
    """With the real stack's settings (a flow could run), bad input is still refused first."""
    home = tmp_path / "prefect"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), COLUMNS="200")
    assert_one_line_error(cli(*args, env=env), EXIT_BAD_INPUT, message)
    assert_no_prefect(home)


@pytest.fixture
def cli_env(stack, seeded, prefect_api) -> dict[str, str]:
    """The session stack's settings and its Prefect API, for a child process."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "COLUMNS": "200"}


def test_backup_prints_the_id_alone_and_a_summary_or_the_full_record(cli_env, store):
    plain = cli("backup", "--operator", "pytest-cli", env=cli_env)
    assert plain.returncode == 0, plain.stderr[-2000:]
    backup_id = plain.stdout.strip()
    as_json = None
    try:
        assert BACKUP_ID_RE.match(backup_id) and plain.stdout == backup_id + "\n"
        manifest = listing.resolve(store, backup_id)
        obj = manifest.object
        for expected in (
            f"backup {backup_id}: database {manifest.source.dbname}",
            f"{len(manifest.tables)} tables, {manifest.total_rows:,} rows",
            f"stored at s3://{obj.bucket}/{obj.key}",
            "report: flow run ",
        ):
            assert expected in plain.stderr, (expected, plain.stderr[-2000:])

        as_json = cli("backup", "--operator", "pytest-cli", "--json", env=cli_env)
        assert as_json.returncode == 0, as_json.stderr[-2000:]
        record = json.loads(as_json.stdout)
        stored = listing.resolve(store, record["backup_id"])
        assert record["backup_id"] != backup_id
        assert record["manifest"] == stored.model_dump(mode="json")
        assert record["flow_run_id"] in as_json.stderr  # the summary still goes to stderr
    finally:
        drop_backup(store, backup_id)
        if as_json is not None and as_json.returncode == 0:
            drop_backup(store, json.loads(as_json.stdout)["backup_id"])


def _drop_database(dsn: str) -> None:
    from psycopg2 import sql

    from wedefi_dr.postgres.tools import connect

    with connect(with_dbname(dsn, "postgres"), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(dbname_of(dsn))
            )
        )


def test_restore_prints_a_summary_or_the_full_record(cli_env, good_backup, scratch_dsn):
    args = ["restore", good_backup, "--target-dsn", scratch_dsn, "--operator", "pytest-cli"]
    args += ["--justification", "cli summary test"]
    summary = cli(*args, env=cli_env)
    assert summary.returncode == 0, summary.stderr[-2000:]
    lines = summary.stdout.splitlines()
    assert len(lines) == 3, summary.stdout
    assert lines[0].startswith(f"restored backup {good_backup} into ")
    assert "rows identical to the manifest" in lines[0]
    assert "RTO objective" in lines[1] and "(within)" in lines[1]
    assert lines[2].startswith("report: flow run ")

    # A second restore into the same database would be an overwrite: another new one.
    args[3] = with_dbname(scratch_dsn, dbname_of(scratch_dsn) + "_json")
    try:
        as_json = cli(*args, "--json", env=cli_env)
    finally:
        _drop_database(args[3])
    assert as_json.returncode == 0, as_json.stderr[-2000:]
    record = json.loads(as_json.stdout)
    assert record["backup_id"] == good_backup
    assert record["rows"] > 0 and record["tables"] > 0
    assert record["rto_objective_seconds"] == 900.0
    assert set(record["timings"]) == {"download_verify", "decrypt_restore", "verify"}
