"""Failures are loud and leave nothing that looks good (invariants 2 and 3)."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from flows.backup import logical_backup
from flows.restore import restore_backup
from tests.helpers import (
    BREAK_GLASS,
    clone_backup,
    drop_backup,
    fingerprint,
    run_approved,
    sns_inbox,
)
from wedefi_dr.catalog import listing
from wedefi_dr.config import Settings
from wedefi_dr.errors import (
    BackupFailed,
    ChecksumMismatch,
    NotAuthentic,
    RestoreFailed,
    TruncatedObject,
)
from wedefi_dr.postgres.conninfo import ConnTarget, with_dbname
from wedefi_dr.postgres.tools import connect


@pytest.fixture(scope="module")
def bulk_dsn(settings: Settings) -> str:
    """A database big enough (~200 MB of hex text) that its dump takes seconds to stream."""
    admin = settings.primary_dsn.get_secret_value()
    dsn = with_dbname(admin, "bulk")
    with connect(with_dbname(admin, "postgres"), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS bulk")
        cur.execute("CREATE DATABASE bulk")
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TABLE payload AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) || "
            "md5((g * 13)::text) || md5((g * 31)::text) AS body "
            "FROM generate_series(1, 1500000) g"
        )
    return dsn


def _target_with_sentinel(dsn: str) -> dict:
    """A target database holding data a failed restore must not touch."""
    admin = with_dbname(dsn, "postgres")
    with connect(admin, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{dsn.split("dbname=")[1].split()[0]}"')
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute('CREATE TABLE "Wallet" (id text PRIMARY KEY, address text)')
        cur.execute("""INSERT INTO "Wallet" VALUES ('w1', '0xsentinel')""")
    return fingerprint(dsn)


def test_backup_interrupted_mid_upload_leaves_no_backup(
    good_backup, settings: Settings, store, bulk_dsn: str, env_override
):
    env_override(WEDEFI_DR_PRIMARY_DSN=bulk_dsn)
    inbox = sns_inbox(settings, "wedefi-dr-failures-inbox")
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["id"] = logical_backup(operator="pytest-interrupt")
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    prefix = store.key("logical") + "/"
    # The dump task retries once (safe: nothing of a failed attempt survives), so kill
    # pg_dump's server connection in the middle of the stream of every attempt.
    seen: set[str] = set()
    deadline = time.monotonic() + 180
    while worker.is_alive() and time.monotonic() < deadline:
        uploads = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=prefix)
        new = {u["UploadId"]: u["Key"] for u in uploads.get("Uploads", [])}
        new = {k: v for k, v in new.items() if k not in seen}
        if new:
            with connect(bulk_dsn, autocommit=True) as conn, conn.cursor() as cur:
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'pg_dump' AND datname = 'bulk'"
                )
                assert cur.fetchone()[0] is True
            seen |= set(new)
            uploads_keys = list(new.values())
        time.sleep(0.05)
    worker.join(60)

    assert len(seen) == 2, "expected the first attempt and its one retry to be interrupted"
    assert isinstance(outcome.get("error"), BackupFailed), outcome
    backup_id = uploads_keys[0].split("/")[-2]
    assert store.head(listing.manifest_key(store, backup_id)) is None
    assert store.head(listing.data_key(store, backup_id)) is None
    assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []
    with connect(settings.ops_dsn.get_secret_value()) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT status, error_message FROM backup_audit_log WHERE backup_id = %s",
            (backup_id,),
        )
        status, error = cur.fetchone()
    assert status == "failed"
    assert "pg_dump" in error
    # The pager hears of it: one failure notification naming the backup.
    (notice,) = [m for m in inbox() if m.get("backup_id") == backup_id]
    assert notice["status"] == "failure"
    assert "pg_dump" in notice["error"]
    assert settings.gpg_passphrase.get_secret_value() not in json.dumps(notice)
    env_override(WEDEFI_DR_PRIMARY_DSN=settings.primary_dsn.get_secret_value())
    assert listing.resolve(store, "latest").backup_id != backup_id
    assert good_backup in {m.backup_id for m in listing.list_backups(store)}


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (lambda b: b[:1000] + bytes([b[1000] ^ 0x01]) + b[1001:], ChecksumMismatch),
        (lambda b: b[: len(b) // 2], TruncatedObject),
    ],
    ids=["flipped-byte", "truncated"],
)
def test_damaged_object_fails_restore_and_leaves_target_untouched(
    good_backup, store, scratch_dsn: str, damage, error
):
    damaged = clone_backup(store, listing.resolve(store, good_backup), damage)
    before = _target_with_sentinel(scratch_dsn)
    try:
        with pytest.raises(error):
            # The target holds data on the primary's cluster: a break-glass overwrite.
            run_approved(
                restore_backup,
                BREAK_GLASS,
                backup_id=damaged.backup_id,
                target_dsn=scratch_dsn,
                operator="pytest",
                justification="corruption test",
                overwrite=True,
            )
    finally:
        drop_backup(store, damaged.backup_id)
    assert fingerprint(scratch_dsn) == before


def test_wrong_passphrase_fails_restore_and_leaves_target_untouched(
    good_backup, scratch_dsn: str, env_override
):
    before = _target_with_sentinel(scratch_dsn)
    env_override(WEDEFI_DR_GPG_PASSPHRASE="not-the-passphrase")
    with pytest.raises(NotAuthentic, match="wrong passphrase"):
        restore_backup(
            backup_id=good_backup,
            target_dsn=scratch_dsn,
            operator="pytest",
            justification="wrong passphrase test",
        )
    assert fingerprint(scratch_dsn) == before


def test_retrying_a_failed_backup_run_keeps_its_id_and_audits_each_attempt(
    good_backup, settings: Settings, store, env_override, prefect_api
):
    """The on-call path at 3 a.m.: a backup run failed, the cause is fixed, Retry is pressed
    on the same flow run (as the UI and `prefect flow-run retry` do). The retried run
    names the same backup, and the audit log keeps the failed attempt as it was."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import Scheduled

    env_override(WEDEFI_DR_BUCKET="wedefi-no-such-bucket")  # preflight: bucket not writable
    state = logical_backup(operator="pytest-retry", return_state=True)
    assert state.is_failed(), state.message
    flow_run_id = state.state_details.flow_run_id

    env_override(WEDEFI_DR_BUCKET=settings.bucket)
    time.sleep(1.1)  # an id taken from the clock would now differ
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Scheduled(message="retry from test"), force=True)
        flow_run = client.read_flow_run(flow_run_id)
        final = run_flow(
            flow=logical_backup,
            flow_run=flow_run,
            parameters=flow_run.parameters,
            return_type="state",
        )
        assert final.is_completed(), final.message
        assert client.read_flow_run(flow_run_id).run_count == 2
    backup_id = final.result()

    with connect(settings.ops_dsn.get_secret_value()) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT backup_id, status FROM backup_audit_log WHERE operator_id = 'pytest-retry' "
            "ORDER BY start_time"
        )
        attempts = cur.fetchall()
    assert attempts == [(backup_id, "failed"), (backup_id, "success")]
    assert listing.resolve(store, "latest").backup_id == backup_id
    drop_backup(store, backup_id)


def test_a_restore_failing_on_a_row_keeps_its_values_out_of_audit_and_notification(
    settings: Settings, store, scratch_dsn: str, env_override, prefect_api
):
    """A backup whose restore fails on a row (a CHECK reads a table restored before it):
    PostgreSQL's error quotes the row twice (DETAIL, CONTEXT); the audit row and the
    pager's notification say why, with neither copy of the value."""
    value = f"row-value-{uuid.uuid4().hex[:8]}"
    admin = settings.primary_dsn.get_secret_value()
    source_db = f"rowdata_{uuid.uuid4().hex[:8]}"
    source = with_dbname(admin, source_db)
    with connect(with_dbname(admin, "postgres"), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {source_db}")
        cur.execute(f"CREATE DATABASE {ConnTarget.parse(scratch_dsn, allow_password=False).dbname}")
    with connect(source) as conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TABLE a_banned (v text);"
            "CREATE FUNCTION allowed(text) RETURNS boolean LANGUAGE sql AS "
            "'SELECT NOT EXISTS (SELECT 1 FROM public.a_banned b WHERE b.v = $1)';"
            "CREATE TABLE t (id int PRIMARY KEY, v text CHECK (allowed(v)));"
            "INSERT INTO t VALUES (1, %s); INSERT INTO a_banned VALUES (%s)",
            (value, value),
        )
    env_override(WEDEFI_DR_PRIMARY_DSN=source)
    backup_id = logical_backup(operator="pytest-rowdata")
    env_override(WEDEFI_DR_PRIMARY_DSN=admin)
    inbox = sns_inbox(settings, "wedefi-dr-rowdata-inbox")
    try:
        with pytest.raises(RestoreFailed, match=value):  # the operator's own error has it
            restore_backup(
                backup_id=backup_id,
                target_dsn=scratch_dsn,
                operator="pytest",
                justification="row data test",
            )
    finally:
        drop_backup(store, backup_id)
        with connect(with_dbname(admin, "postgres"), autocommit=True) as conn:
            conn.cursor().execute(f"DROP DATABASE {source_db} WITH (FORCE)")
    with connect(settings.ops_dsn.get_secret_value()) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT status, error_message FROM recovery_audit_log WHERE backup_id = %s",
            (backup_id,),
        )
        status, error = cur.fetchone()
    (notice,) = [m for m in inbox() if m.get("backup_id") == backup_id]
    assert status == "failed" and 'violates check constraint "t_v_check"' in error
    assert "Failing row contains (***)" in error and 'COPY t, line 1: "***"' in error
    assert notice["error"] == error
    assert value not in error and value not in json.dumps(notice)
