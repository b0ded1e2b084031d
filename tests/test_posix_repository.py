"""The posix repository: a local stack of its own whose backups, base backups and WAL live
in a directory, survive ``stack down``/``stack up``, restore, replay and are verified.

One stack for the module (its own root, no control plane), because what is tested is
that the stack's repository outlives the stack's processes. The WAL is pushed by the
primary's real ``archive_command`` (as the server's OS user) and fetched by a real
``restore_command`` during recovery.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_pitr import sql1, switch_and_wait_archived
from wedefi_dr.catalog import listing
from wedefi_dr.catalog.manifest import new_backup_id
from wedefi_dr.config import Settings, get_settings
from wedefi_dr.errors import ChecksumMismatch, InvalidInput
from wedefi_dr.lifecycle import expire
from wedefi_dr.lifecycle.sync import sync
from wedefi_dr.lifecycle.verify import verify
from wedefi_dr.logical import backup, restore
from wedefi_dr.observability.catalog_ages import catalog_state
from wedefi_dr.physical import archiving, basebackup, wal
from wedefi_dr.physical.pitr import recovery
from wedefi_dr.physical.pitr.target import RecoveryTarget
from wedefi_dr.postgres.cluster import chown_to
from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.storage import posix
from wedefi_dr.storage.repository import open_store
from wedefi_dr_dev.stack import Stack


@pytest.fixture(scope="module")
def posix_stack() -> Iterator[Stack]:
    root = Path(tempfile.mkdtemp(prefix="wedefi-dr-posix-"))
    root.chmod(0o755)  # the postgres user must enter it
    s = Stack(root / "stack", fast=True, control_plane=False, repo="posix")
    try:
        with pytest.MonkeyPatch.context() as patch:
            s.up()
            for key, value in s.env().items():
                patch.setenv(key, value)
            get_settings.cache_clear()
            yield s
    finally:
        s.down()
        get_settings.cache_clear()
        shutil.rmtree(root, ignore_errors=True)


def stored_file(settings: Settings, key: str) -> Path:
    return Path(settings.repo_path) / key


def test_no_overwrite_torn_temp_files_and_damage_are_refused(posix_stack: Stack):
    settings = get_settings()
    assert settings.repo_type == "posix" and settings.repo_path == posix_stack.repo_path
    store = open_store(settings)
    key = store.key("pytest", uuid.uuid4().hex[:8], "object")
    assert store.put_new(key, b"first", metadata={"plain-sha256": "a"}, storage_class=None)
    assert not store.put_new(key, b"second", metadata={"plain-sha256": "b"}, storage_class=None)
    assert store.get(key) == (b"first", {"plain-sha256": "a"})
    path = stored_file(settings, key)
    assert oct(path.stat().st_mode & 0o777) == "0o640"
    assert path.stat().st_uid == posix_stack.repo_path.stat().st_uid  # the repo owner's

    # The WAL archive's rule on link(): identical again is fine, different is a conflict.
    archive = wal.Archive(settings.model_copy(update={"prefix": f"pytest-{uuid.uuid4().hex[:8]}"}))
    name = "000000010000000000000001"
    assert archive.push_bytes(name, b"a segment").startswith("archived")
    assert "identical" in archive.push_bytes(name, b"a segment")
    with pytest.raises(wal.ArchiveConflict, match="REFUSED"):
        archive.push_bytes(name, b"another segment")
    assert archive.fetch_bytes(name, posix_stack.root / "spool") == b"a segment"

    # A killed writer's temp file: never listed, removed by the lifecycle's clean-up.
    torn = path.with_name(f"{posix.TMP_PREFIX}{uuid.uuid4().hex}.torn")
    torn.write_bytes(b"half a backup")
    prefix = key.rsplit("/", 1)[0] + "/"
    assert [o["Key"] for o in store.list_keys(prefix)] == [key]
    assert store.head(key.rsplit("/", 1)[0] + "/torn") is None
    assert store.clean_incomplete(3600) == 0  # too young: may be an upload still running
    os.utime(torn, (0, 0))
    assert store.clean_incomplete(3600) == 1 and not torn.exists()

    # One flipped byte in the body: every read names the file and refuses it.
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch, match=str(path)):
        store.get(key)
    with pytest.raises(ChecksumMismatch, match=str(path)):
        store.get_body(key).read()

    # A damaged manifest is left out of the catalog (named in a warning), not a crash.
    manifest_key = store.key("logical", new_backup_id(), listing.MANIFEST_NAME)
    store.put_json(manifest_key, {"backup_id": "x"})
    manifest_file = stored_file(settings, manifest_key)
    manifest_file.write_bytes(manifest_file.read_bytes()[:-2] + b"}}")
    try:
        assert manifest_key.split("/")[-2] not in [m.backup_id for m in listing.list_backups(store)]
    finally:
        store.delete(manifest_key)

    for bad in ("../escape", "a//b", "a/./b", "a/b\0c", f"a/{posix.TMP_PREFIX}x"):
        with pytest.raises(InvalidInput, match="cannot name a file"):
            store.put_bytes(bad, b"x")
    for repo_path, message in (
        ("relative/repo", "absolute path"),
        (str(posix_stack.primary.data_dir / "backups"), "inside the PostgreSQL data directory"),
    ):
        with pytest.raises(InvalidInput, match=message):
            open_store(settings.model_copy(update={"repo_path": Path(repo_path)}))
    with pytest.raises(InvalidInput, match="needs the S3 repository"):
        sync(settings)


def test_backups_and_wal_survive_stack_down_up_then_restore_replay_and_verify(
    posix_stack: Stack,
):
    s = posix_stack
    source = f"posixsrc_{uuid.uuid4().hex[:6]}"
    s.primary.create_database(source)
    dsn = s.primary.dsn(source)
    sql1(dsn, "CREATE TABLE markers (id int PRIMARY KEY, note text)")
    sql1(dsn, "INSERT INTO markers SELECT g, md5(g::text) FROM generate_series(1, 500) g")
    os.environ["WEDEFI_DR_PRIMARY_DSN"] = dsn
    get_settings.cache_clear()
    settings = get_settings()

    logical = backup.dump_encrypt_upload(settings, new_backup_id(), "pytest")
    listing.write_manifest(open_store(settings), logical)
    base = basebackup.take(settings, "pytest")
    sql1(dsn, "INSERT INTO markers VALUES (501, 'after the base backup')")
    sql1(dsn, "SELECT pg_create_restore_point('posix-rp')")
    sql1(dsn, "INSERT INTO markers VALUES (502, 'after the restore point')")
    segment = switch_and_wait_archived(dsn)

    s.down()
    s.up()
    store = open_store(get_settings())
    assert logical.backup_id in [m.backup_id for m in listing.list_backups(store)]
    assert base.backup_id in [m.backup_id for m in basebackup.list_base_backups(store)]
    assert segment in wal.Archive(settings).list_names()

    # The logical backup restores, verified table by table against its manifest.
    target = ConnTarget.parse(
        s.primary.dsn(f"posixdst_{uuid.uuid4().hex[:6]}"), allow_password=True
    )
    cipher = restore.fetch_verified(settings, logical, settings.spool_path)
    restore.decrypt_and_restore(settings, logical, cipher, target)
    assert restore.verify(logical, target)

    # The base backup plus the archived WAL replay to the restore point.
    cluster = s.cluster(f"posixpitr{uuid.uuid4().hex[:6]}")
    cluster.home.mkdir(parents=True, exist_ok=True)
    chown_to(cluster.home)
    staged = recovery.stage_base_backup(settings, base, cluster, settings.spool_path)
    recovery.install_staged(cluster, staged)
    env_file = archiving.write_wal_env(
        settings, cluster.home / archiving.RESTORE_ENV_NAME, os_user=cluster.os_user
    )
    recovery.write_recovery_settings(
        cluster,
        RecoveryTarget.parse("name", "posix-rp"),
        restore_command=archiving.restore_command(env_file),
        archive_command=None,
        note="pytest",
    )
    try:
        cluster.start(wait=False)
        reached = recovery.wait_for_target(cluster, 90)
        assert reached["paused"]
        assert sql1(cluster.dsn(source), "SELECT max(id) FROM markers") == 501
    finally:
        cluster.stop()

    # One flipped byte in the stored logical backup: verify names it.
    data_file = stored_file(settings, logical.object.key)
    body = bytearray(data_file.read_bytes())
    body[posix.HEADER_BYTES + 100] ^= 0x01
    data_file.write_bytes(bytes(body))
    (report,) = verify(settings)
    assert report["region"] == "primary"
    assert any(logical.object.key in p and "sha256" in p for p in report["problems"])

    # Status and the backup lifecycle work on the same directory: no DR copy, no DR lag.
    state = catalog_state(settings)
    assert state.newest_logical_id == logical.backup_id and state.sync_lag_seconds is None
    env_lines = (s.primary.home / archiving.ARCHIVE_ENV_NAME).read_text().splitlines()
    assert f"WEDEFI_DR_REPO_PATH={s.repo_path}" in env_lines
    the_plan = {
        "logical": {"delete": {logical.backup_id: "pytest"}},
        "base": {"delete": {}},
        "wal": {"delete": {}},
    }
    done = expire.prune(settings, the_plan, operator="pytest", run_id=uuid.uuid4().hex)
    assert done["objects"] == 2 and not data_file.parent.exists()
    assert logical.backup_id not in [m.backup_id for m in listing.list_backups(store)]
