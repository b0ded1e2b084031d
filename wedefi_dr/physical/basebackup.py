"""Physical base backups: ``pg_basebackup`` streamed into the object store.

``pg_basebackup -D - -Ft -X fetch`` writes one tar (data files, the WAL needed to make
them consistent, and PostgreSQL's ``backup_manifest``) to stdout; this module reads it
once, parses the tar headers on the way to pick out ``backup_label`` and
``backup_manifest``, hashes it, gzips it, pipes it through ``gpg --symmetric`` and into a
multipart upload. No plaintext touches the disk. The manifest (start and stop LSN,
timeline, start and stop time, PostgreSQL's own backup manifest) is written last: as for
logical backups, a base backup exists only when its manifest exists.

By hand (break-glass): ``gpg -d base.tar.gz.gpg | tar -xz -C $PGDATA``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import tarfile
import threading
import time
import zlib
from datetime import UTC, datetime
from typing import Any

import psycopg2
from pydantic import BaseModel

from wedefi_dr.catalog import listing
from wedefi_dr.catalog.manifest import ObjectInfo, new_backup_id
from wedefi_dr.config import Settings
from wedefi_dr.errors import BackupFailed, UnknownBackup
from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.postgres.tools import tool
from wedefi_dr.storage import encryption
from wedefi_dr.storage.s3 import READ_CHUNK, HashingReader, ObjectStore

log = logging.getLogger(__name__)
KIND = "base"
DATA_NAME = "base.tar.gz.gpg"
MANIFEST_NAME = listing.MANIFEST_NAME


class BaseBackupManifest(BaseModel):
    """What a base backup is: where its WAL starts and stops, on which timeline, when."""

    manifest_version: int = 1
    backup_id: str
    kind: str = KIND
    started_at: datetime
    finished_at: datetime
    duration_seconds: float
    system_identifier: str
    server_version_num: int
    timeline: int
    start_lsn: str
    stop_lsn: str
    start_wal_file: str
    label: str
    encryption: dict[str, Any]
    compression: str
    object: ObjectInfo
    plaintext_size_bytes: int
    plaintext_sha256: str
    pg_backup_manifest: dict[str, Any]
    operator: str


def lsn_to_int(lsn: str) -> int:
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def data_key(store: ObjectStore, backup_id: str) -> str:
    return store.key(KIND, backup_id, DATA_NAME)


def manifest_key(store: ObjectStore, backup_id: str) -> str:
    return store.key(KIND, backup_id, MANIFEST_NAME)


def list_base_backups(store: ObjectStore) -> list[BaseBackupManifest]:
    """Every base backup with a manifest, oldest first."""
    return listing.list_manifests(store, KIND, BaseBackupManifest)


def resolve(store: ObjectStore, backup_id: str) -> BaseBackupManifest:
    manifest = listing.get_manifest(store, manifest_key(store, backup_id), BaseBackupManifest)
    if manifest is None:
        raise UnknownBackup(f"no base backup {backup_id!r} (no manifest under {store.key(KIND)}/)")
    return manifest


class _TarTee:
    """A file-like source for ``tarfile`` that copies every byte it hands out downstream.

    tarfile in stream mode reads the whole archive sequentially (skipping a member's data
    means reading it), so everything pg_basebackup wrote passes through ``read`` exactly
    once: hashed, gzipped, written to gpg.
    """

    def __init__(self, source: Any, sink: Any, level: int) -> None:
        self.source, self.sink = source, sink
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.z = zlib.compressobj(level, zlib.DEFLATED, 31)

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n if n and n > 0 else READ_CHUNK)
        if data:
            self.sha256.update(data)
            self.size += len(data)
            self.sink.write(self.z.compress(data))
        return data

    def finish(self) -> None:
        while self.read(READ_CHUNK):
            pass
        self.sink.write(self.z.flush())


def _parse_label(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        out[key.strip()] = value.strip()
    return out


def basebackup_command(target: ConnTarget, label: str) -> list[str]:
    """pg_basebackup of ``target``'s cluster as one tar on stdout, with the WAL that makes
    it consistent (the conninfo's dbname is ignored: a base backup is of the cluster)."""
    return [
        tool("pg_basebackup"),
        *target.tool_args(),
        "-D",
        "-",
        "--format=tar",
        "--wal-method=fetch",
        "--checkpoint=fast",
        f"--label={label}",
        "--no-password",
    ]


def take(settings: Settings, operator: str, backup_id: str | None = None) -> BaseBackupManifest:
    """Stream a base backup of the primary into the store; returns its manifest, written."""
    settings.require("primary_dsn", "gpg_passphrase")
    target = ConnTarget.parse(settings.primary_dsn.get_secret_value(), allow_password=True)
    backup_id = backup_id or new_backup_id()
    store = ObjectStore(settings)
    key = data_key(store, backup_id)
    params = encryption.GpgParams.from_settings(settings, compress_algo="none")  # gzip ran
    with psycopg2.connect(target.conninfo, connect_timeout=10) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT system_identifier::text, current_setting('server_version_num')::int"
            " FROM pg_control_system()"
        )
        sysid, version_num = cur.fetchone()
    conn.close()
    started = datetime.now(UTC)
    t0 = time.monotonic()
    label = f"wedefi-dr {backup_id}"
    proc = subprocess.Popen(
        basebackup_command(target, label),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=target.tool_env(),
    )
    gpg = encryption.start_encrypt(settings.gpg_passphrase.get_secret_value(), params)
    found: dict[str, bytes] = {}
    tee = _TarTee(proc.stdout, gpg.stdin, settings.wal_compress_level)
    pump_error: list[BaseException] = []

    def pump() -> None:
        try:
            with tarfile.open(fileobj=tee, mode="r|") as tar:
                for member in tar:
                    if member.name.lstrip("./") in ("backup_label", "backup_manifest"):
                        f = tar.extractfile(member)
                        found[member.name.lstrip("./")] = f.read() if f else b""
            tee.finish()
        except BaseException as exc:  # reported at EOF, which aborts the upload
            pump_error.append(exc)
        finally:
            try:
                gpg.stdin.close()
            except BrokenPipeError as exc:
                pump_error.append(exc)

    thread = threading.Thread(target=pump, name="basebackup-to-gpg", daemon=True)
    thread.start()

    def check_producers() -> None:
        thread.join()
        err = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise BackupFailed(f"pg_basebackup failed (exit {proc.returncode}): {err[-800:]}")
        if pump_error:
            raise BackupFailed(f"reading the base backup tar failed: {pump_error[0]!r}")
        gerr = gpg.stderr.read().decode(errors="replace")
        if gpg.wait() != 0:
            raise BackupFailed(f"gpg --symmetric failed (exit {gpg.returncode}): {gerr}")
        missing = {"backup_label", "backup_manifest"} - set(found)
        if missing:
            raise BackupFailed(f"the base backup tar lacks {sorted(missing)}")

    reader = HashingReader(gpg.stdout, on_eof=check_producers)
    try:
        store.upload_all_or_nothing(key, reader)
    except BaseException as exc:
        for p in (proc, gpg):
            if p.poll() is None:
                p.kill()
        log.error("base backup %s failed; no manifest written", backup_id)
        if isinstance(exc, BackupFailed):
            raise
        raise BackupFailed(f"base backup {backup_id} failed: {exc}") from exc
    elapsed = time.monotonic() - t0
    label_fields = _parse_label(found["backup_label"].decode())
    pg_manifest = json.loads(found["backup_manifest"])
    wal_range = pg_manifest["WAL-Ranges"][-1]
    start_file = re.search(r"file ([0-9A-F]{24})", label_fields["START WAL LOCATION"])
    manifest = BaseBackupManifest(
        backup_id=backup_id,
        started_at=started,
        finished_at=datetime.now(UTC),
        duration_seconds=round(elapsed, 3),
        system_identifier=sysid,
        server_version_num=version_num,
        timeline=int(wal_range["Timeline"]),
        start_lsn=wal_range["Start-LSN"],
        stop_lsn=wal_range["End-LSN"],
        start_wal_file=start_file.group(1) if start_file else "",
        label=label,
        encryption=params.describe(),
        compression=f"gzip -{settings.wal_compress_level}",
        object=ObjectInfo(
            bucket=store.bucket,
            key=key,
            size_bytes=reader.size,
            sha256=reader.sha256.hexdigest(),
            storage_class=settings.storage_class,
            sse=settings.sse or None,
        ),
        plaintext_size_bytes=tee.size,
        plaintext_sha256=tee.sha256.hexdigest(),
        pg_backup_manifest=pg_manifest,
        operator=operator,
    )
    listing.put_manifest(store, manifest_key(store, backup_id), manifest)
    log.info(
        "base backup %s: %.1f MB tar -> %.1f MB stored in %.1f s, WAL %s..%s (timeline %d)",
        backup_id,
        tee.size / 1e6,
        reader.size / 1e6,
        elapsed,
        manifest.start_lsn,
        manifest.stop_lsn,
        manifest.timeline,
    )
    return manifest
