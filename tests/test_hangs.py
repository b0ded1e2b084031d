"""Nothing hangs: a child that dies early, a task's timeout or a full spool fails the run
in seconds, with the cause named, and leaves nothing behind (security review F4, F24).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from prefect.utilities.timeout import timeout
from pydantic import SecretStr

from flows.backup import logical_backup
from flows.restore import restore_backup
from tests.helpers import BREAK_GLASS, fingerprint, run_approved, sns_inbox
from wedefi_dr.catalog import listing
from wedefi_dr.config import Settings
from wedefi_dr.errors import BackupFailed, PreflightFailed, SpoolFull
from wedefi_dr.logical import backup
from wedefi_dr.postgres.conninfo import with_dbname
from wedefi_dr.postgres.tools import connect
from wedefi_dr.storage import encryption
from wedefi_dr.storage.pipeline import EncryptedUpload, Producer
from wedefi_dr.storage.s3 import ObjectStore

BAD_CIPHER = "AES257"  # gpg: "selected cipher algorithm is invalid", exit 2, reads nothing


@pytest.fixture(scope="module")
def dump_dsn(settings: Settings) -> str:
    """A database whose dump is many pipe buffers long, so a pg_dump nobody reads blocks."""
    admin = settings.primary_dsn.get_secret_value()
    dsn = with_dbname(admin, "hangs")
    with connect(with_dbname(admin, "postgres"), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS hangs WITH (FORCE)")
        cur.execute("CREATE DATABASE hangs")
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TABLE payload AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS body"
            " FROM generate_series(1, 300000) g"
        )
    return dsn


def _sessions(dsn: str, application_name: str) -> int:
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND pid <> "
            "pg_backend_pid()",
            (application_name,),
        )
        return cur.fetchone()[0]


def _children_named(command: str) -> list[int]:
    """This process's children running ``command`` (from /proc: no extra dependency)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            comm = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
        except (OSError, IndexError):
            continue
        if comm == command and int(fields[1]) == os.getpid():
            found.append(int(stat.parent.name))
    return found


def _open_uploads(store: ObjectStore, key: str) -> list[dict]:
    return store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=key).get("Uploads", [])


def test_a_bad_gpg_cipher_is_refused_in_preflight_audited_and_notified(
    seeded, prefect_api, settings: Settings, store: ObjectStore, env_override
):
    inbox = sns_inbox(settings, "wedefi-dr-hangs-inbox")
    inbox()  # earlier tests' notifications are not this test's
    operator = f"pytest-cipher-{uuid.uuid4().hex[:6]}"
    env_override(WEDEFI_DR_GPG_CIPHER=BAD_CIPHER)
    t0 = time.monotonic()
    with pytest.raises(
        PreflightFailed, match=rf"cipher '{BAD_CIPHER}'.*cipher algorithm is invalid"
    ):
        logical_backup(operator=operator)
    assert time.monotonic() - t0 < 60
    with connect(settings.ops_dsn.get_secret_value()) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT backup_id, status, error_message FROM backup_audit_log WHERE operator_id = %s",
            (operator,),
        )
        ((backup_id, status, error),) = cur.fetchall()
    assert status == "failed"
    assert BAD_CIPHER in error
    (notice,) = [m for m in inbox() if m.get("backup_id") == backup_id]
    assert notice["status"] == "failure"
    assert BAD_CIPHER in notice["error"]
    assert store.head(listing.data_key(store, backup_id)) is None
    assert store.head(listing.manifest_key(store, backup_id)) is None


def test_gpg_exiting_early_fails_the_stream_in_seconds_and_leaves_nothing(
    settings: Settings, store: ObjectStore, dump_dsn: str
):
    """Bypassing preflight: gpg exits 2 before reading a byte while pg_dump has megabytes
    to write. This deadlocked (F4); now it fails fast with gpg's stderr, no object, no
    open multipart upload, and the snapshot connection and pg_dump both gone."""
    bad = settings.model_copy(update={"gpg_cipher": BAD_CIPHER, "primary_dsn": SecretStr(dump_dsn)})
    backup_id = f"hangs-{uuid.uuid4().hex[:8]}"
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            backup.dump_encrypt_upload(bad, backup_id, "pytest-gpg-early-exit")
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    t0 = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    hung = worker.is_alive()
    if hung:  # unblock the deadlock so the session can go on, then fail
        for pid in _children_named("pg_dump"):
            os.kill(pid, signal.SIGKILL)
        worker.join(60)
    assert not hung, "the backup hung after gpg exited early"
    assert time.monotonic() - t0 < 30
    error = outcome.get("error")
    assert isinstance(error, BackupFailed), error
    assert "gpg --symmetric failed (exit 2)" in str(error)
    assert "cipher algorithm is invalid" in str(error)
    key = listing.data_key(store, backup_id)
    assert store.head(key) is None
    assert _open_uploads(store, key) == []
    assert _sessions(dump_dsn, "wedefi-dr snapshot") == 0
    assert _sessions(dump_dsn, "pg_dump") == 0


def test_an_interrupted_stream_kills_its_producer_and_aborts_the_upload(
    settings: Settings, store: ObjectStore
):
    """A task's timeout is Prefect's alarm raising TimeoutError in the flow's thread (the
    same ``timeout`` the task engine wraps every task in). The pipeline must not wait for
    a producer that never ends: the producer is killed, the upload aborted, in seconds."""
    pidfile = Path(tempfile.mkdtemp()) / "producer.pid"
    slow = f"echo $$ > {pidfile}; head -c {7 * 1024 * 1024} /dev/urandom; exec sleep 40"
    key = store.key("pipeline-test", uuid.uuid4().hex, "data.gpg")
    upload = EncryptedUpload(
        producer=Producer("slow producer", ["sh", "-c", slow]),
        passphrase=settings.gpg_passphrase.get_secret_value(),
        gpg=encryption.GpgParams.from_settings(settings),
    )
    t0 = time.monotonic()
    with pytest.raises(TimeoutError), timeout(seconds=3):
        upload.run(store, key)
    assert time.monotonic() - t0 < 15, "the interrupted stream waited for its producer"
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert store.head(key) is None
    assert _open_uploads(store, key) == []


def test_a_full_spool_fails_the_restore_naming_the_spool_and_leaves_the_target(
    good_backup, settings: Settings, store: ObjectStore, scratch_dsn: str, env_override
):
    """A 64 KiB tmpfs as the spool (we are root; the sandbox allows mounts)."""
    size = listing.resolve(store, good_backup).object.size_bytes
    assert size > 64 * 1024
    spool = Path(tempfile.mkdtemp(prefix="wedefi-dr-tiny-spool-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(spool)], check=True)
    try:
        admin = with_dbname(scratch_dsn, "postgres")
        name = scratch_dsn.split("dbname=")[1].split()[0]
        with connect(admin, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        with connect(scratch_dsn) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE sentinel AS SELECT 1 AS kept")
        before = fingerprint(scratch_dsn)
        env_override(WEDEFI_DR_SPOOL_DIR=str(spool))
        with pytest.raises(SpoolFull, match=rf"no space left in the spool {spool}"):
            # The target holds data on the primary's cluster: a break-glass overwrite.
            run_approved(
                restore_backup,
                BREAK_GLASS,
                backup_id=good_backup,
                target_dsn=scratch_dsn,
                operator="pytest-spool",
                justification="disk-full spool test",
                overwrite=True,
            )
        assert fingerprint(scratch_dsn) == before
        assert list(spool.iterdir()) == []
        with connect(settings.ops_dsn.get_secret_value()) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT status, error_message FROM recovery_audit_log "
                "WHERE operator_id = 'pytest-spool' ORDER BY start_time DESC LIMIT 1"
            )
            status, error = cur.fetchone()
        assert status == "failed"
        assert "SpoolFull" in error
    finally:
        subprocess.run(["umount", str(spool)], check=True)
        spool.rmdir()
