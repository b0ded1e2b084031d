"""The backup catalog: what backups exist, read from the object store itself.

There is no separate index to drift out of date: a backup is a manifest under
``<prefix>/logical/<backup_id>/manifest.json``, and only backups whose manifest exists
are listed. ``latest`` is the newest of those.

Every manifest is authenticated (:mod:`wedefi_dr.storage.authentication`): one that this
system did not write, or that changed since, is refused by name when asked for by id, and
left out of listings (with a warning) so that a planted manifest can neither become
``latest`` nor hide the good backups.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from pydantic import BaseModel

from wedefi_dr.catalog.manifest import BACKUP_ID_RE, BackupManifest
from wedefi_dr.errors import IntegrityError, UnknownBackup
from wedefi_dr.storage import authentication
from wedefi_dr.storage.repository import Repository

KIND = "logical"
DATA_NAME = "dump.pgc.gpg"
MANIFEST_NAME = "manifest.json"

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger(__name__)


def data_key(store: Repository, backup_id: str) -> str:
    return store.key(KIND, backup_id, DATA_NAME)


def manifest_key(store: Repository, backup_id: str) -> str:
    return store.key(KIND, backup_id, MANIFEST_NAME)


def write_manifest(store: Repository, manifest: BackupManifest) -> str:
    """Write the manifest, after checking the object it names is there at its size."""
    head = store.head(manifest.object.key)
    if head is None or head["ContentLength"] != manifest.object.size_bytes:
        raise UnknownBackup(
            f"refusing to write a manifest for {manifest.backup_id}: its object "
            f"{store.url(manifest.object.key)} is missing or the wrong size"
        )
    key = manifest_key(store, manifest.backup_id)
    put_manifest(store, key, manifest)
    return key


def put_manifest(store: Repository, key: str, manifest: BaseModel) -> None:
    """Store a manifest with its MAC under the current key."""
    document = manifest.model_dump(mode="json")
    store.put_json(key, authentication.sign(document, authentication.keyring_of(store.settings)))


def get_manifest(store: Repository, key: str, model: type[M]) -> M | None:
    """The manifest at ``key`` (None when absent); NotAuthentic when this system did not
    write it or it changed since."""
    document = store.get_json(key)
    if document is None:
        return None
    return _authentic(store, key, document, model)


def _authentic(store: Repository, key: str, document: dict[str, Any], model: type[M]) -> M:
    authentication.verify(
        document, authentication.keyring_of(store.settings), f"manifest {store.url(key)}"
    )
    return model.model_validate({k: v for k, v in document.items() if k != authentication.FIELD})


def list_manifests(store: Repository, kind: str, model: type[M]) -> list[M]:
    """Every backup of ``kind`` (``logical``, ``base``) with an authentic manifest, oldest
    first; a manifest that is not authentic (or fails the repository's own checksum) is left
    out, with a warning naming it."""
    manifests = []
    for obj in store.list_keys(store.key(kind) + "/"):
        if obj["Key"].endswith("/" + MANIFEST_NAME):
            try:
                document = store.get_json(obj["Key"])
                if document is None:
                    continue
                manifests.append(_authentic(store, obj["Key"], document, model))
            except IntegrityError as exc:
                log.warning("left out of the catalog: %s", exc)
    return sorted(manifests, key=lambda m: (m.finished_at, m.backup_id))


def list_backups(store: Repository) -> list[BackupManifest]:
    """Every logical backup with a manifest, oldest first."""
    return list_manifests(store, KIND, BackupManifest)


def resolve(store: Repository, backup_id: str) -> BackupManifest:
    """The manifest for an id or ``latest``; UnknownBackup (with what exists) otherwise."""
    backup_id = (backup_id or "").strip()
    if backup_id == "latest":
        backups = list_backups(store)
        if not backups:
            raise UnknownBackup(
                f"no backups in {store.url(store.key(KIND))}/ — run 'wedefi-dr backup'"
            )
        return backups[-1]
    if not BACKUP_ID_RE.match(backup_id):
        raise UnknownBackup(
            f"{backup_id!r} is not a backup id (expected e.g. 20261124T020000Z-3fa9c1, or 'latest')"
        )
    manifest = get_manifest(store, manifest_key(store, backup_id), BackupManifest)
    if manifest is None:
        raise UnknownBackup(
            f"unknown backup id {backup_id!r}: no manifest in "
            f"{store.url(store.key(KIND))}/ (see 'wedefi-dr backups list')"
        )
    return manifest
