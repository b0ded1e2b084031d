"""The base-backup runbook's steps as Prefect tasks."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks import timeouts
from tasks.common import host_slot, protected_cluster, retry_transient
from wedefi_dr.config import get_settings
from wedefi_dr.physical import basebackup, standby
from wedefi_dr.physical.basebackup import BaseBackupManifest
from wedefi_dr.runbook import BaseBackup
from wedefi_dr.storage.repository import open_store


@task(name=BaseBackup.STREAM, persist_result=True, timeout_seconds=timeouts.BASE_BACKUP)
def stream_base_backup(backup_id: str, operator: str) -> dict[str, Any]:
    """pg_basebackup -Ft -X fetch | gzip | gpg | multipart upload; returns the manifest
    (with PostgreSQL's own backup manifest), not yet written."""
    settings = get_settings()
    source = standby.backup_source(settings)
    with host_slot(protected_cluster()):
        manifest = basebackup.stream(settings, operator, backup_id, source)
    return manifest.model_dump(mode="json")


@task(
    name=BaseBackup.WRITE_MANIFEST,
    retries=3,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
    timeout_seconds=timeouts.SHORT,
)
def write_manifest(manifest: dict[str, Any]) -> str:
    """Written last: from this moment the base backup exists."""
    m = BaseBackupManifest.model_validate(manifest)
    return basebackup.write_manifest(open_store(get_settings()), m)
