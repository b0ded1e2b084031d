"""The backup catalog: what backups exist, read from the object store itself.

There is no separate index to drift out of date: a backup is a manifest under
``<prefix>/logical/<backup_id>/manifest.json``, and only backups whose manifest exists
are listed. ``latest`` is the newest of those.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel

from wedefi_dr.catalog.manifest import BACKUP_ID_RE, BackupManifest
from wedefi_dr.errors import UnknownBackup
from wedefi_dr.storage.s3 import ObjectStore

KIND = "logical"
DATA_NAME = "dump.pgc.gpg"
MANIFEST_NAME = "manifest.json"

M = TypeVar("M", bound=BaseModel)


def data_key(store: ObjectStore, backup_id: str) -> str:
    return store.key(KIND, backup_id, DATA_NAME)


def manifest_key(store: ObjectStore, backup_id: str) -> str:
    return store.key(KIND, backup_id, MANIFEST_NAME)


def write_manifest(store: ObjectStore, manifest: BackupManifest) -> str:
    """Write the manifest, after checking the object it names is there at its size."""
    head = store.head(manifest.object.key)
    if head is None or head["ContentLength"] != manifest.object.size_bytes:
        raise UnknownBackup(
            f"refusing to write a manifest for {manifest.backup_id}: its object "
            f"s3://{store.bucket}/{manifest.object.key} is missing or the wrong size"
        )
    key = manifest_key(store, manifest.backup_id)
    store.put_json(key, manifest.model_dump(mode="json"))
    return key


def list_manifests(store: ObjectStore, kind: str, model: type[M]) -> list[M]:
    """Every backup of ``kind`` (``logical``, ``base``) with a manifest, oldest first."""
    manifests = []
    for obj in store.list_keys(store.key(kind) + "/"):
        if obj["Key"].endswith("/" + MANIFEST_NAME):
            document = store.get_json(obj["Key"])
            if document is not None:
                manifests.append(model.model_validate(document))
    return sorted(manifests, key=lambda m: (m.finished_at, m.backup_id))


def list_backups(store: ObjectStore) -> list[BackupManifest]:
    """Every logical backup with a manifest, oldest first."""
    return list_manifests(store, KIND, BackupManifest)


def resolve(store: ObjectStore, backup_id: str) -> BackupManifest:
    """The manifest for an id or ``latest``; UnknownBackup (with what exists) otherwise."""
    backup_id = (backup_id or "").strip()
    if backup_id == "latest":
        backups = list_backups(store)
        if not backups:
            raise UnknownBackup(
                f"no backups in s3://{store.bucket}/{store.key(KIND)}/ — run 'wedefi-dr backup'"
            )
        return backups[-1]
    if not BACKUP_ID_RE.match(backup_id):
        raise UnknownBackup(
            f"{backup_id!r} is not a backup id (expected e.g. 20261124T020000Z-3fa9c1, or 'latest')"
        )
    document = store.get_json(manifest_key(store, backup_id))
    if document is None:
        raise UnknownBackup(
            f"unknown backup id {backup_id!r}: no manifest in s3://{store.bucket}/"
            f"{store.key(KIND)}/ (see 'wedefi-dr backups list')"
        )
    return BackupManifest.model_validate(document)
