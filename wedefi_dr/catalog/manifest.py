"""The backup manifest: written last, it is what makes a stored object a backup.

A backup exists only when its manifest exists. The manifest names the object, both
checksums (ciphertext as stored, plaintext as pg_dump wrote it), the source server, and
per-table row counts and content hashes taken in the dump's own snapshot, so a restore
can be proved exact without trusting anything else.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

MANIFEST_VERSION = 1
BACKUP_ID_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")


def new_backup_id(now: datetime | None = None, suffix: str | None = None) -> str:
    """Sortable by time, unique by a suffix: ``20261124T020000Z-3fa9c1``."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{suffix or secrets.token_hex(3)}"


class SourceInfo(BaseModel):
    system_identifier: str
    dbname: str
    host: str
    port: int
    server_version: str
    server_version_num: int


class ObjectInfo(BaseModel):
    bucket: str
    key: str
    size_bytes: int
    sha256: str
    storage_class: str
    sse: str | None = None

    @classmethod
    def stored(cls, store: Any, key: str, size_bytes: int, sha256: str) -> ObjectInfo:
        """The object just uploaded to ``store`` (an ObjectStore), with its settings'
        storage class and server-side encryption."""
        return cls(
            bucket=store.bucket,
            key=key,
            size_bytes=size_bytes,
            sha256=sha256,
            storage_class=store.settings.storage_class,
            sse=store.settings.sse or None,
        )


class PlaintextInfo(BaseModel):
    size_bytes: int
    sha256: str
    format: str = "pg_dump custom"
    compress_level: int


class BackupManifest(BaseModel):
    manifest_version: int = MANIFEST_VERSION
    backup_id: str
    kind: str = "logical"
    started_at: datetime
    finished_at: datetime
    duration_seconds: float
    source: SourceInfo
    pg_dump_version: str
    snapshot: str
    encryption: dict[str, Any]
    object: ObjectInfo
    plaintext: PlaintextInfo
    tables: dict[str, dict[str, Any]]
    # How ``tables`` content hashes were computed (postgres.fingerprint.FINGERPRINT_METHOD);
    # manifests from before the field existed used md5 halves.
    fingerprint_method: str = "md5-halves"
    operator: str
    # What the source held in the dump's snapshot, for the DR test's integrity suites
    # (wedefi_dr.drtest.facts); None for non-WeDefiDaily databases and older manifests.
    integrity_facts: dict[str, Any] | None = None

    @property
    def total_rows(self) -> int:
        return sum(int(t["rows"]) for t in self.tables.values())
