"""``verify`` over a repository with a planted WAL gap and a damaged backup: both named."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta

import pytest

from wedefi_dr.catalog import listing
from wedefi_dr.catalog.manifest import ObjectInfo, new_backup_id
from wedefi_dr.config import get_settings
from wedefi_dr.lifecycle.sync import sync as core_sync
from wedefi_dr.lifecycle.verify import verify
from wedefi_dr.physical import basebackup, wal, walkey
from wedefi_dr.postgres.tools import connect
from wedefi_dr.storage.authentication import keyring_of
from wedefi_dr.storage.s3 import ObjectStore


def archive_segments(dsn: str, count: int) -> None:
    """Close ``count`` segments on the primary (a WAL message in each) and wait until the
    archiver has stored the last one."""
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        for _ in range(count):
            cur.execute("SELECT pg_logical_emit_message(false, 'wedefi-verify', 'x')")
            cur.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
            segment = cur.fetchone()[0]
            cur.execute("SELECT pg_switch_wal()")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            cur.execute("SELECT last_archived_wal FROM pg_stat_archiver")
            last = cur.fetchone()[0]
            if last and last[:8] == segment[:8] and last[8:] >= segment[8:]:
                return
            time.sleep(0.3)
    pytest.fail(f"{segment} was not archived within 90 s")


def consecutive_segments(store: ObjectStore, settings, count: int) -> list[str]:
    prefix = wal.archive_prefix(settings) + "/"
    names = sorted(
        o["Key"][len(prefix) :]
        for o in store.list_keys(prefix)
        if wal.SEGMENT_RE.match(o["Key"][len(prefix) :])
    )
    for i in range(len(names) - count + 1):
        run = names[i : i + count]
        numbers = [int(n[16:24], 16) + 256 * int(n[8:16], 16) for n in run]
        if numbers == list(range(numbers[0], numbers[0] + count)) and run[0][:8] == run[-1][:8]:
            return run
    pytest.fail("the stack's archive has no run of consecutive segments")


@pytest.fixture
def repository(settings, good_backup, env_override):
    """A fresh bucket pair: the good logical backup, five consecutive archived segments and
    a base backup starting at the first of them; the DR copy in sync."""
    from tests.test_sync import make_pair

    store = ObjectStore(settings)
    archive_segments(settings.primary_dsn.get_secret_value(), 5)
    segments = consecutive_segments(store, settings, 5)
    keys = [listing.data_key(store, good_backup), listing.manifest_key(store, good_backup)]
    keys.append(walkey.object_key(settings, keyring_of(settings).current.key_id))
    src, dr = make_pair(settings, keys + [wal.archive_key(settings, n) for n in segments])
    env_override(WEDEFI_DR_BUCKET=src, WEDEFI_DR_DR_BUCKET=dr)
    s = get_settings()
    target = ObjectStore(s)
    body = b"a base backup's ciphertext stands here"
    base_id = new_backup_id(datetime.now(UTC) - timedelta(hours=1))
    key = basebackup.data_key(target, base_id)
    target.client.put_object(Bucket=src, Key=key, Body=body)
    start = segments[0]
    log_id, seg = int(start[8:16], 16), int(start[16:24], 16)
    manifest = basebackup.BaseBackupManifest(
        backup_id=base_id,
        started_at=datetime.now(UTC) - timedelta(hours=1, minutes=1),
        finished_at=datetime.now(UTC) - timedelta(hours=1),
        duration_seconds=60,
        system_identifier="1",
        server_version_num=150000,
        timeline=int(start[:8], 16),
        start_lsn=f"{log_id:X}/{seg * 0x1000000 + 0x28:X}",
        stop_lsn=f"{log_id:X}/{seg * 0x1000000 + 0x100:X}",
        start_wal_file=start,
        label="pytest",
        encryption={},
        compression="gzip",
        object=ObjectInfo(
            bucket=src,
            key=key,
            size_bytes=len(body),
            sha256=hashlib.sha256(body).hexdigest(),
            storage_class="STANDARD",
        ),
        plaintext_size_bytes=0,
        plaintext_sha256="0" * 64,
        pg_backup_manifest={},
        operator="pytest",
    )
    basebackup.write_manifest(target, manifest)
    core_sync(s)
    return {"settings": s, "store": target, "segments": segments, "backup": good_backup}


def test_a_clean_repository_is_restorable_in_both_regions(repository):
    reports = verify(repository["settings"])
    assert [r["region"] for r in reports] == ["primary", "dr"]
    for r in reports:
        assert r["problems"] == []
        base = next(b for b in r["restorable"] if b["kind"] == "base")
        assert base["restorable"] and base["to_wal"] == repository["segments"][-1]
        assert any(b["kind"] == "logical" and b["restorable"] for b in r["restorable"])


def test_a_planted_gap_and_a_damaged_object_are_found_by_name(repository):
    s, store, segments = repository["settings"], repository["store"], repository["segments"]
    store.delete(wal.archive_key(s, segments[2]))  # the gap
    data_key = listing.data_key(store, repository["backup"])
    body = store.client.get_object(Bucket=store.bucket, Key=data_key)["Body"].read()
    damaged = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
    store.client.put_object(Bucket=store.bucket, Key=data_key, Body=damaged)

    primary, dr = verify(s)
    text = "\n".join(primary["problems"])
    assert f"{data_key}: sha256" in text
    assert f"gap in the WAL archive: {segments[2]} is missing" in text
    base = next(b for b in primary["restorable"] if b["kind"] == "base")
    assert base["to_wal"] == segments[1]  # restorable only up to the gap
    logical = next(b for b in primary["restorable"] if b["kind"] == "logical")
    assert logical["restorable"] is False
    assert dr["problems"] == []  # the DR copy holds the good ones


def test_deep_verify_decrypts_the_logical_backup_and_every_segment(repository, env_override):
    s = repository["settings"]
    # The synthetic base backup is not a real gpg message: deep verify must say so by name.
    (primary,) = verify(s, deep=True, regions=("primary",))
    assert len(primary["problems"]) == 1
    assert "base.tar.gz.gpg" in primary["problems"][0]
    logical = next(b for b in primary["restorable"] if b["kind"] == "logical")
    assert logical["restorable"] is True


def test_bad_input_is_refused_with_its_exit_code():
    import subprocess
    import sys
    from pathlib import Path

    cli = Path(sys.executable).with_name("wedefi-dr")
    out = subprocess.run(
        [str(cli), "verify", "--region", "moon"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --region must be primary or dr, not moon"
