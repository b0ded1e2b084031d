"""One lock per operation and target (security review F16): a second run of the same
operation on the same target is refused at once, naming the holder, and leaves nothing;
different targets run side by side; a crashed holder's lock goes with its connection."""

from __future__ import annotations

import uuid

import psycopg2
import pytest

from flows.backup import logical_backup
from flows.restore import restore_backup
from tasks.common import protected_database
from tests.helpers import sns_inbox
from wedefi_dr.catalog import listing
from wedefi_dr.config import Settings
from wedefi_dr.errors import BackupFailed, OperationBusy
from wedefi_dr.logical import restore
from wedefi_dr.postgres import locks
from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.postgres.tools import connect
from wedefi_dr.storage import encryption
from wedefi_dr.storage.pipeline import EncryptedUpload, Producer
from wedefi_dr_cli.common import EXIT_BUSY, exit_code


def _ops(settings: Settings) -> str:
    return settings.ops_dsn.get_secret_value()


def test_a_second_holder_is_refused_naming_the_first_and_a_dead_holder_frees_it(
    settings: Settings,
):
    target = f"db-{uuid.uuid4().hex[:6]}"
    with locks.operation_lock(_ops(settings), "backup", target):
        second = locks.operation_lock(_ops(settings), "backup", target)
        with pytest.raises(OperationBusy, match=r"backup of db-\w+ is already running") as busy:
            second.__enter__()
        assert locks.APPLICATION_PREFIX in str(busy.value)
        assert "backend pid" in str(busy.value)
        assert exit_code(busy.value) == EXIT_BUSY
        # Another operation on the same target, or the same operation elsewhere, is free.
        with locks.operation_lock(_ops(settings), "restore", target):
            pass
        with locks.operation_lock(_ops(settings), "backup", target + "-other"):
            pass
    # Released on exit.
    with locks.operation_lock(_ops(settings), "backup", target):
        pass
    # A holder that dies without releasing: its session ends, and so does the lock.
    crashed = psycopg2.connect(_ops(settings))
    crashed.autocommit = True
    with crashed.cursor() as cur:
        cur.execute(
            "SELECT pg_try_advisory_lock(%s, %s)",
            (locks.LOCK_CLASS, locks.lock_key("backup", target)),
        )
        assert cur.fetchone()[0] is True
    with pytest.raises(OperationBusy), locks.operation_lock(_ops(settings), "backup", target):
        pass
    with connect(_ops(settings), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (crashed.get_backend_pid(),))
    with locks.operation_lock(_ops(settings), "backup", target):
        pass


def test_a_second_backup_of_one_database_is_refused_and_leaves_nothing(
    seeded, prefect_api, settings: Settings, store
):
    """The first run holds the lock (here: the test, as a run of the CLI or a schedule
    would); the second, started like any other, is refused before it dumps anything."""
    inbox = sns_inbox(settings, "wedefi-dr-locks-inbox")
    inbox()
    operator = f"pytest-busy-{uuid.uuid4().hex[:6]}"
    keys_before = {o["Key"] for o in store.list_keys(store.key("logical"))}
    with (
        locks.operation_lock(_ops(settings), "backup", protected_database()),
        pytest.raises(OperationBusy, match="backup of .* is already running"),
    ):
        logical_backup(operator=operator)
    assert {o["Key"] for o in store.list_keys(store.key("logical"))} == keys_before
    assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []
    with connect(_ops(settings)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT backup_id, status, error_message FROM backup_audit_log WHERE operator_id = %s",
            (operator,),
        )
        ((backup_id, status, error),) = cur.fetchall()
    assert status == "failed"
    assert error.startswith("OperationBusy: ")
    (notice,) = [m for m in inbox() if m.get("backup_id") == backup_id]
    assert "already running" in notice["error"]
    assert store.head(listing.manifest_key(store, backup_id)) is None


def test_restores_of_two_targets_run_while_one_target_is_busy(
    good_backup, settings: Settings, scratch_dsn: str
):
    """Locks are per target: a restore into a busy target is refused, one into another
    target at the same moment goes ahead."""
    busy_dsn = scratch_dsn.replace("dbname=scratch_", "dbname=busy_")
    busy = ConnTarget.parse(busy_dsn, allow_password=False).location
    with locks.operation_lock(_ops(settings), "restore", busy):
        with pytest.raises(OperationBusy, match="restore of .*busy_.* is already running"):
            restore_backup(
                backup_id=good_backup,
                target_dsn=busy_dsn,
                operator="pytest-locks",
                justification="lock test: busy target",
            )
        result = restore_backup(
            backup_id=good_backup,
            target_dsn=scratch_dsn,
            operator="pytest-locks",
            justification="lock test: free target",
        )
    assert result["rows"] > 0


def test_an_upload_never_replaces_an_object_already_at_its_key(settings: Settings, store):
    """An earlier attempt's object (which a manifest may point at) is neither overwritten
    nor deleted by a later attempt under the same key (F15)."""
    key = store.key("pipeline-test", uuid.uuid4().hex, "data.gpg")
    store.client.put_object(Bucket=store.bucket, Key=key, Body=b"an earlier backup")
    upload = EncryptedUpload(
        producer=Producer("producer", ["head", "-c", "1000", "/dev/urandom"]),
        passphrase=settings.gpg_passphrase.get_secret_value(),
        gpg=encryption.GpgParams.from_settings(settings),
    )
    with pytest.raises(BackupFailed, match="already holds an object: not overwriting"):
        upload.run(store, key)
    body = store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    assert body == b"an earlier backup"
    store.delete(key)


def test_two_downloads_of_one_backup_spool_to_two_files(good_backup, settings: Settings, store):
    """Two restores of the same backup at once never share, or unlink, one spool file."""
    manifest = listing.resolve(store, good_backup)
    first = restore.fetch_verified(settings, manifest, settings.spool_path)
    second = restore.fetch_verified(settings, manifest, settings.spool_path)
    try:
        assert first != second
        assert first.stat().st_size == second.stat().st_size == manifest.object.size_bytes
    finally:
        first.unlink(missing_ok=True)
        second.unlink(missing_ok=True)
