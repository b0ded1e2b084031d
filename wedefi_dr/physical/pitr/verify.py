"""Checks of a staged base backup before any server starts on it.

``pg_verifybackup`` checks every file against PostgreSQL's ``backup_manifest`` and the WAL
the backup needs, but it ignores by default what a server may change after a backup
(``postgresql.auto.conf``, ``recovery.signal``, ``standby.signal``, ``pg_wal``) and it
trusts the ``backup_manifest`` it finds in the directory. Those are exactly where a
planted ``archive_command`` or a swapped manifest would go, so this module also holds the
staged ``backup_manifest`` to the authenticated copy in our own manifest, checks
``postgresql.auto.conf`` against its entry, and refuses signal files a backup never has.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from wedefi_dr.errors import IntegrityError
from wedefi_dr.postgres.cluster import ClusterHandle, os_user_kwargs

# pg_verifybackup's default ignore list that a backup can carry (pg_wal is checked by
# its WAL parsing, backup_manifest by the comparison below).
UNCHECKED_BY_PG = ("postgresql.auto.conf",)
NEVER_IN_A_BACKUP = ("recovery.signal", "standby.signal")


class BaseBackupRefused(IntegrityError):
    """The staged base backup failed a check; the server was never started on it."""


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the default checksum of PostgreSQL's backup manifests."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def manifest_checksum(entry: dict[str, Any], data: bytes) -> str | None:
    """``data``'s checksum the way the manifest entry writes it (None: an algorithm we do
    not compute; the size and plaintext sha256 still hold)."""
    algorithm = entry.get("Checksum-Algorithm")
    if algorithm == "CRC32C":
        return crc32c(data).to_bytes(4, "little").hex()
    if algorithm and algorithm.startswith("SHA"):
        return hashlib.new(algorithm.lower().replace("-", ""), data).hexdigest()
    return None


def verify_staged(
    cluster: ClusterHandle, staged: Path, pg_manifest: dict[str, Any], what: str
) -> None:
    """Every check of the staged directory, each named in its refusal."""
    try:
        found = json.loads((staged / "backup_manifest").read_text())
    except (OSError, ValueError) as exc:
        raise BaseBackupRefused(
            f"{what}: backup_manifest check failed: unreadable ({exc})"
        ) from exc
    if found != pg_manifest:
        raise BaseBackupRefused(
            f"{what}: backup_manifest check failed: it differs from the copy in the "
            "authenticated manifest"
        )
    for name in NEVER_IN_A_BACKUP:
        if (staged / name).exists():
            raise BaseBackupRefused(f"{what}: {name} check failed: a base backup has none")
    entries = {f["Path"]: f for f in pg_manifest.get("Files", [])}
    for name in UNCHECKED_BY_PG:
        path, entry = staged / name, entries.get(name)
        if entry is None:
            if path.exists():
                raise BaseBackupRefused(f"{what}: {name} check failed: not in backup_manifest")
            continue
        data = path.read_bytes() if path.exists() else b""
        expected = entry.get("Checksum")
        actual = manifest_checksum(entry, data)
        if len(data) != entry.get("Size") or (actual is not None and actual != expected):
            raise BaseBackupRefused(
                f"{what}: {name} check failed: it does not match its backup_manifest entry"
            )
    run_pg_verifybackup(cluster, staged, what)


def run_pg_verifybackup(cluster: ClusterHandle, staged: Path, what: str) -> None:
    """``pg_verifybackup`` (files and the WAL the backup needs) as the cluster's OS user."""
    result = subprocess.run(
        [cluster.tool("pg_verifybackup"), "--quiet", str(staged)],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=3600,
        **os_user_kwargs(cluster.os_user),
    )
    if result.returncode != 0:
        raise BaseBackupRefused(
            f"{what}: pg_verifybackup check failed (PostgreSQL's backup_manifest): "
            f"{(result.stderr or result.stdout).strip()[-800:]}"
        )
