"""The backup runbook's steps as Prefect tasks."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks import timeouts
from tasks.common import host_slot, protected_database, retry_transient
from wedefi_dr.catalog import listing
from wedefi_dr.catalog.manifest import BackupManifest
from wedefi_dr.config import get_settings
from wedefi_dr.logical import backup
from wedefi_dr.runbook import LogicalBackup
from wedefi_dr.storage.repository import open_store


@task(
    name=LogicalBackup.PREFLIGHT,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
    timeout_seconds=timeouts.SHORT,
)
def preflight() -> dict[str, Any]:
    """Server reachable, pg_dump >= server major, bucket writable (read-only checks)."""
    return backup.preflight(get_settings())


# One retry: a failed attempt aborts its upload and writes no manifest, so starting over
# is safe. Persisted, so a flow-run retry after a later failure does not dump again.
@task(
    name=LogicalBackup.DUMP_ENCRYPT_UPLOAD,
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=retry_transient,
    persist_result=True,
    timeout_seconds=timeouts.DUMP,
)
def dump_encrypt_upload(backup_id: str, operator: str) -> dict[str, Any]:
    with host_slot(protected_database()):
        manifest = backup.dump_encrypt_upload(get_settings(), backup_id, operator)
    return manifest.model_dump(mode="json")


@task(
    name=LogicalBackup.WRITE_MANIFEST,
    retries=3,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
    timeout_seconds=timeouts.SHORT,
)
def write_manifest(manifest: dict[str, Any]) -> str:
    """Written last: from this moment the backup exists."""
    return listing.write_manifest(open_store(get_settings()), BackupManifest(**manifest))
