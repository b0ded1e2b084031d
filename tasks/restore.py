"""The restore runbook's steps as Prefect tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from tasks import timeouts
from tasks.common import retry_transient
from wedefi_dr.catalog.manifest import BackupManifest
from wedefi_dr.config import get_settings
from wedefi_dr.logical import build, restore
from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.runbook import Restore


@task(name=Restore.VALIDATE_REQUEST, timeout_seconds=timeouts.SHORT)
def validate_request(
    backup_id: str, target: ConnTarget, operator: str, justification: str, overwrite: bool
) -> dict[str, Any]:
    """All refusals happen here, before anything is downloaded or changed. Returns the
    manifest and why the target counts as production when overwriting it is break-glass."""
    request = restore.RestoreRequest(backup_id, target, operator, justification, overwrite)
    manifest, check = restore.assess(get_settings(), request)
    return {
        "manifest": manifest.model_dump(mode="json"),
        "break_glass": check.production if check.break_glass else "",
        "privileged": check.privileged,
    }


@task(
    name=Restore.DOWNLOAD_VERIFY,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
    timeout_seconds=timeouts.RESTORE,
)
def download_and_verify(manifest: dict[str, Any]) -> str:
    """Streamed download; size and sha256 checked against the manifest."""
    settings = get_settings()
    return str(restore.fetch_verified(settings, BackupManifest(**manifest), settings.spool_path))


@task(name=Restore.DECRYPT_RESTORE, timeout_seconds=timeouts.RESTORE)
def decrypt_and_restore(
    manifest: dict[str, Any], ciphertext: str, target: ConnTarget
) -> dict[str, Any]:
    """gpg --decrypt | pg_restore --clean --if-exists --single-transaction, every table
    fingerprinted inside the transaction (a new database: built in parallel and renamed once
    proven); returns what that proved. Runs under the flow's restore lock of ``target``, so
    first it drops the unproven copies of ``target`` that killed restores left behind."""
    settings = get_settings()
    build.drop_leftovers(target)
    m = BackupManifest(**manifest)
    path = Path(ciphertext)
    if not path.exists():  # a retried flow run whose spool file was already removed
        path = restore.fetch_verified(settings, m, settings.spool_path)
    try:
        return restore.decrypt_and_restore(settings, m, path, target).model_dump(mode="json")
    finally:
        path.unlink(missing_ok=True)


@task(
    name=Restore.VERIFY,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
    timeout_seconds=timeouts.CHECKS,
)
def verify_restore(
    manifest: dict[str, Any], target: ConnTarget, restored: dict[str, Any] | None = None
) -> dict[str, int]:
    """Tables as proven inside the restore transaction (``restored``), large objects and
    sequences read after COMMIT; without ``restored``, every table is read again."""
    proven = restore.Restored(**restored) if restored is not None else None
    return restore.verify(BackupManifest(**manifest), target, proven)
