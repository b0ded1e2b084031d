"""The logical backup: one streaming pass from pg_dump to the object store.

``pg_dump -Fc`` → sha256 → ``gpg --symmetric`` → sha256 → multipart upload, with no
plaintext on disk and memory bounded by the upload's part buffers. The per-table
fingerprints are taken in the same exported snapshot pg_dump reads, on a second
connection, while the dump streams.

The stream is the shared pipeline (``wedefi_dr.storage.pipeline``); the fingerprints run
alongside it, so a failure anywhere (pg_dump, gpg, the upload, the fingerprints) aborts
the multipart upload. No manifest is written, so nothing that looks like a backup is
left behind.
"""

from __future__ import annotations

import logging
import subprocess
import time
from datetime import UTC, datetime
from typing import Any

import psycopg2
from psycopg2.extensions import ISOLATION_LEVEL_REPEATABLE_READ

from wedefi_dr.catalog import listing
from wedefi_dr.catalog.manifest import (
    BackupManifest,
    ObjectInfo,
    PlaintextInfo,
    SourceInfo,
)
from wedefi_dr.config import Settings
from wedefi_dr.drtest import facts as integrity_facts
from wedefi_dr.errors import BackupFailed, PreflightFailed
from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.postgres.fingerprint import (
    FINGERPRINT_METHOD,
    fingerprint_tables,
    sequence_fingerprints,
)
from wedefi_dr.postgres.primary import primary_target
from wedefi_dr.postgres.tools import tool, tool_major_version
from wedefi_dr.storage import encryption
from wedefi_dr.storage.pipeline import EncryptedUpload, Producer
from wedefi_dr.storage.repository import open_store

log = logging.getLogger(__name__)


def dump_command(target: ConnTarget, snapshot: str, compress_level: int) -> list[str]:
    """pg_dump of ``target`` as a custom-format archive on stdout, reading the snapshot
    the fingerprints are taken in (so the manifest describes exactly what is dumped)."""
    return [
        tool("pg_dump"),
        "--format=custom",
        f"--compress={compress_level}",
        f"--snapshot={snapshot}",
        "--no-password",
        *target.tool_args(),
    ]


def source_info(conn: Any) -> SourceInfo:
    """Who the source is: the cluster's system identifier plus database, host and port.

    Host and port are the ones libpq actually connected to (``conn.info``), whether they
    came from the conninfo, a service file or the environment.
    """
    with conn.cursor() as cur:
        cur.execute(
            "SELECT system_identifier::text, current_database(), current_setting('server_version'),"
            " current_setting('server_version_num')::int FROM pg_control_system()"
        )
        sysid, dbname, version, version_num = cur.fetchone()
    return SourceInfo(
        system_identifier=sysid,
        dbname=dbname,
        host=conn.info.host,
        port=int(conn.info.port),
        server_version=version,
        server_version_num=version_num,
    )


def preflight(settings: Settings) -> dict[str, Any]:
    """Server reachable, pg_dump new enough, bucket writable, passphrase set."""
    settings.require("primary_dsn", "ops_dsn", "gpg_passphrase")
    target = primary_target(settings)
    try:
        conn = psycopg2.connect(target.conninfo, connect_timeout=10)
    except psycopg2.OperationalError as exc:
        raise PreflightFailed(
            f"cannot connect to the primary ({target.redacted}): {str(exc).strip()}"
        ) from exc
    try:
        info = source_info(conn)
    finally:
        conn.close()
    server_major = info.server_version_num // 10000
    dump_major = tool_major_version("pg_dump")
    if dump_major < server_major:
        raise PreflightFailed(
            f"pg_dump {dump_major} cannot dump a PostgreSQL {server_major} server: "
            f"install the postgresql-client-{server_major} package"
        )
    open_store(settings).check_writable()
    check_gpg_params(settings)
    return {
        "server_version": info.server_version,
        "pg_dump_major": dump_major,
        "database": info.dbname,
    }


GPG_PROBE = b"wedefi-dr gpg preflight"
GPG_PROBE_TIMEOUT_SECONDS = 30


def check_gpg_params(settings: Settings) -> None:
    """Encrypt a few bytes with the configured cipher, digest and compression: a typo
    (``AES257``) is refused here with gpg's own words, not found by the backup's stream."""
    params = encryption.GpgParams.from_settings(settings)
    gpg = encryption.start_encrypt(settings.gpg_passphrase.get_secret_value(), params)
    try:
        ciphertext, stderr = gpg.communicate(GPG_PROBE, timeout=GPG_PROBE_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as exc:
        gpg.kill()
        gpg.communicate()
        raise PreflightFailed(
            f"gpg --symmetric did not finish {len(GPG_PROBE)} bytes within "
            f"{GPG_PROBE_TIMEOUT_SECONDS} s"
        ) from exc
    if gpg.returncode != 0 or not ciphertext:
        raise PreflightFailed(
            f"gpg cannot encrypt with cipher {params.cipher!r}, digest {params.s2k_digest!r}, "
            f"compression {params.compress_algo!r} (WEDEFI_DR_GPG_CIPHER, "
            f"WEDEFI_DR_GPG_S2K_DIGEST, WEDEFI_DR_GPG_COMPRESS_ALGO): exit {gpg.returncode}: "
            f"{stderr.decode(errors='replace').strip()}"
        )


def dump_encrypt_upload(settings: Settings, backup_id: str, operator: str) -> BackupManifest:
    """Run the streaming pass and return the manifest it proves (not yet written)."""
    target = primary_target(settings)
    store = open_store(settings)
    data_key = listing.data_key(store, backup_id)
    params = encryption.GpgParams.from_settings(settings)
    started = datetime.now(UTC)
    t0 = time.monotonic()

    snap_conn = psycopg2.connect(target.conninfo, application_name="wedefi-dr snapshot")
    snap_conn.set_isolation_level(ISOLATION_LEVEL_REPEATABLE_READ)
    fingerprints: dict[str, Any] = {}
    facts: dict[str, Any] = {}

    def take_fingerprints() -> None:
        """Counts and hashes on a second connection, inside the snapshot pg_dump reads."""
        fingerprints.update(fingerprint_tables(snap_conn, sequences=False))
        facts.update(integrity_facts.collect_if_present(snap_conn) or {})

    try:
        with snap_conn.cursor() as cur:
            cur.execute("SELECT pg_export_snapshot()")
            (snapshot,) = cur.fetchone()
        source = source_info(snap_conn)
        # Before pg_dump starts: it reads each sequence later, at or past these positions.
        fingerprints.update(sequence_fingerprints(snap_conn))
        streamed = EncryptedUpload(
            producer=Producer(
                "pg_dump",
                dump_command(target, snapshot, settings.compress_level),
                target.tool_env(),
            ),
            passphrase=settings.gpg_passphrase.get_secret_value(),
            gpg=params,
            alongside={"table fingerprints": take_fingerprints},
            label=f"backup {backup_id}",
        ).run(store, data_key)
    except psycopg2.Error as exc:  # the snapshot connection: no stream was started
        raise BackupFailed(f"backup {backup_id} failed: {exc}") from exc
    finally:
        snap_conn.close()

    elapsed = time.monotonic() - t0
    log.info(
        "backup %s: %d bytes dumped, %d bytes stored in %.1f s (%.1f MB/s)",
        backup_id,
        streamed.plaintext_size,
        streamed.stored_size,
        elapsed,
        streamed.plaintext_size / 1e6 / max(elapsed, 1e-6),
    )
    return BackupManifest(
        backup_id=backup_id,
        started_at=started,
        finished_at=datetime.now(UTC),
        duration_seconds=round(elapsed, 3),
        source=source,
        pg_dump_version=str(tool_major_version("pg_dump")),
        snapshot=snapshot,
        encryption=params.describe(),
        object=ObjectInfo.stored(store, data_key, streamed.stored_size, streamed.stored_sha256),
        plaintext=PlaintextInfo(
            size_bytes=streamed.plaintext_size,
            sha256=streamed.plaintext_sha256,
            compress_level=settings.compress_level,
        ),
        tables=fingerprints,
        fingerprint_method=FINGERPRINT_METHOD,
        operator=operator,
        integrity_facts=facts or None,
    )
