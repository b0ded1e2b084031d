"""Bad input gets a clear, specific error before any side effect (invariants 5 and 7)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flows.restore import restore_backup
from tests.helpers import database_exists, recovery_audit_rows
from wedefi_dr.catalog import listing
from wedefi_dr.catalog.manifest import new_backup_id
from wedefi_dr.config import Settings
from wedefi_dr.errors import InvalidInput, TargetRefused, UnknownBackup
from wedefi_dr.postgres.conninfo import dbname_of


@pytest.mark.parametrize(
    ("overrides", "error", "message", "audited"),
    [
        ({"backup_id": "20200101T000000Z-abcdef"}, UnknownBackup, "unknown backup id", 1),
        ({"backup_id": "yesterday's"}, UnknownBackup, "is not a backup id", 1),
        ({"operator": "   "}, InvalidInput, "--operator is required", 0),
        ({"justification": ""}, InvalidInput, "--justification is required", 0),
    ],
    ids=["unknown-id", "malformed-id", "empty-operator", "empty-justification"],
)
def test_restore_refuses_bad_input_before_any_side_effect(
    good_backup, settings: Settings, scratch_dsn: str, overrides, error, message, audited
):
    """Refused before anything is created; on the record as 'refused' when the request
    says who and why, and not at all when it does not."""
    ops = settings.ops_dsn.get_secret_value()
    audit_rows = recovery_audit_rows(ops)
    args = {
        "backup_id": good_backup,
        "target_dsn": scratch_dsn,
        "operator": "pytest",
        "justification": "bad input test",
        **overrides,
    }
    with pytest.raises(error, match=message):
        restore_backup(**args)
    assert recovery_audit_rows(ops) == audit_rows + audited
    assert not database_exists(scratch_dsn, dbname_of(scratch_dsn))


def test_restore_refuses_the_backups_own_source(good_backup, settings: Settings):
    source = settings.primary_dsn.get_secret_value()
    ops = settings.ops_dsn.get_secret_value()
    audit_rows = recovery_audit_rows(ops)
    with pytest.raises(TargetRefused, match=r"holds \d+ table\(s\).*--overwrite"):
        restore_backup(
            backup_id=good_backup,
            target_dsn=source,
            operator="pytest",
            justification="would overwrite production",
        )
    assert recovery_audit_rows(ops) == audit_rows + 1  # the refusal, nothing else


def test_restore_refuses_a_password_in_the_target_dsn_before_a_flow_run(
    good_backup, scratch_dsn: str
):
    """The command line refuses it before ``run_flow``: Prefect records a run's
    parameters, so a flow that refused it itself would already have stored it."""
    from wedefi_dr_cli.restore import restore as restore_command

    with pytest.raises(InvalidInput, match="contains a password"):
        restore_command(
            good_backup,
            target_dsn=scratch_dsn + " password=not-a-real-secret",
            operator="pytest",
            justification="secret in parameter",
        )


def test_cli_reports_bad_input_with_exit_code_2(good_backup, scratch_dsn: str):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "wedefi_dr_cli.app",
            "restore",
            good_backup,
            "--target-dsn",
            scratch_dsn,
            "--operator",
            "pytest",
            "--justification",
            " ",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "--justification is required" in result.stderr
    assert not database_exists(scratch_dsn, dbname_of(scratch_dsn))


def test_cli_backups_list_and_show(good_backup):
    listed = subprocess.run(
        [sys.executable, "-m", "wedefi_dr_cli.app", "backups", "list", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert good_backup in listed.stdout
    unknown = subprocess.run(
        [sys.executable, "-m", "wedefi_dr_cli.app", "backups", "show", "20200101T000000Z-000000"],
        capture_output=True,
        text=True,
    )
    assert unknown.returncode == 2
    assert "unknown backup id" in unknown.stderr


def test_restore_refuses_a_backup_fingerprinted_another_way(
    good_backup, settings: Settings, store, scratch_dsn: str
):
    """A manifest whose hashes this version cannot reproduce is refused, not half-restored."""
    from tests.helpers import drop_backup

    manifest = listing.resolve(store, good_backup)
    old = manifest.model_copy(update={"backup_id": new_backup_id(), "fingerprint_method": "md5"})
    listing.put_manifest(store, listing.manifest_key(store, old.backup_id), old)
    ops = settings.ops_dsn.get_secret_value()
    audit_rows = recovery_audit_rows(ops)
    try:
        with pytest.raises(InvalidInput, match="fingerprinted with 'md5'"):
            restore_backup(
                backup_id=old.backup_id,
                target_dsn=scratch_dsn,
                operator="pytest",
                justification="old manifest",
            )
    finally:
        drop_backup(store, old.backup_id)
    assert recovery_audit_rows(ops) == audit_rows + 1  # the refusal, on the record
    assert not database_exists(scratch_dsn, dbname_of(scratch_dsn))
