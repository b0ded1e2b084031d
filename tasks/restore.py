"""The restore runbook's steps as Prefect tasks."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import task

from tasks.common import unless
from wedefi_dr.catalog.manifest import BackupManifest
from wedefi_dr.config import get_settings
from wedefi_dr.errors import IntegrityError, InvalidInput
from wedefi_dr.logical import restore
from wedefi_dr.observability import audit
from wedefi_dr.postgres.conninfo import ConnTarget


@task(name="validate restore request")
def validate_request(
    backup_id: str, target: ConnTarget, operator: str, justification: str, overwrite_source: bool
) -> dict[str, Any]:
    """All refusals happen here, before anything is downloaded or changed."""
    request = restore.RestoreRequest(
        backup_id, target, operator, justification, allow_source_overwrite=overwrite_source
    )
    return restore.validate(get_settings(), request).model_dump(mode="json")


@task(name="audit: recovery started", retries=3, retry_delay_seconds=2)
def audit_recovery_started(
    audit_id: str, backup_id: str, target: str, operator: str, justification: str
) -> str:
    """``target`` is the target's location (host:port/dbname), never a DSN."""
    return audit.recovery_started(
        get_settings().ops_dsn.get_secret_value(),
        audit_id=audit_id,
        recovery_type="logical_restore",
        backup_id=backup_id,
        target=target,
        operator=operator,
        justification=justification,
    )


def _spool_dir() -> Path:
    return Path(get_settings().spool_dir or tempfile.gettempdir())


@task(
    name="download and verify checksum",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=unless(IntegrityError, InvalidInput),
)
def download_and_verify(manifest: dict[str, Any]) -> str:
    """Streamed download; size and sha256 checked against the manifest."""
    m = BackupManifest(**manifest)
    return str(restore.fetch_verified(get_settings(), m, _spool_dir()))


@task(name="decrypt and pg_restore")
def decrypt_and_restore(manifest: dict[str, Any], ciphertext: str, target: ConnTarget) -> None:
    """gpg --decrypt | pg_restore --clean --if-exists --single-transaction."""
    settings = get_settings()
    m = BackupManifest(**manifest)
    path = Path(ciphertext)
    if not path.exists():  # a retried flow run whose spool file was already removed
        path = restore.fetch_verified(settings, m, _spool_dir())
    try:
        restore.decrypt_and_restore(settings, m, path, target)
    finally:
        path.unlink(missing_ok=True)


@task(
    name="verify row counts and content hashes",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=unless(IntegrityError),
)
def verify_restore(manifest: dict[str, Any], target: ConnTarget) -> dict[str, int]:
    return restore.verify(BackupManifest(**manifest), target)
