"""The fleet backup's steps: the fleet file, the per-host limits, one database's backup.

One database's backup is one task so the fleet's graph shows one box per database; its
body is the logical backup runbook (preflight, audit, dump | gpg | upload, manifest) on
that database's own settings (its DSN and catalog prefix). It holds its host's concurrency
slot for its whole duration, so a host never runs more backups than its limit.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from pydantic import SecretStr

from tasks import timeouts
from tasks.common import run_lock, scrub
from wedefi_dr.catalog import listing
from wedefi_dr.config import get_settings
from wedefi_dr.fleet import FleetDatabase, concurrency_limit_name, load_fleet
from wedefi_dr.logical import backup
from wedefi_dr.observability import audit
from wedefi_dr.postgres.primary import primary_target
from wedefi_dr.runbook import Fleet
from wedefi_dr.storage.repository import open_store


@task(name=Fleet.LOAD, timeout_seconds=timeouts.SHORT)
def load(fleet_file: str) -> dict[str, Any]:
    """The validated fleet, as plain data (a retried run reuses it)."""
    return load_fleet(fleet_file).model_dump(mode="json")


@task(name=Fleet.HOST_LIMITS, timeout_seconds=timeouts.SHORT)
def set_host_limits(limits: dict[str, int]) -> None:
    """One global concurrency limit per host, at the fleet file's value (created or
    updated), shared by every run and worker that backs up that host."""
    with get_client(sync_client=True) as client:
        for host, limit in limits.items():
            client.upsert_global_concurrency_limit_by_name(concurrency_limit_name(host), limit)


@task(
    name=Fleet.BACK_UP,
    task_run_name="back up {entry[name]}",
    persist_result=True,
    timeout_seconds=timeouts.DUMP,
)
def back_up_database(
    entry: dict[str, Any], backup_id: str, audit_id: str, operator: str
) -> dict[str, Any]:
    """Back up one database of the fleet; its audit row says success or failed."""
    db = FleetDatabase.model_validate(entry)
    base = get_settings()
    settings = base.model_copy(
        update={"primary_dsn": SecretStr(db.resolved_dsn()), "prefix": db.prefix}
    )
    ops = base.ops_dsn.get_secret_value()
    location = primary_target(settings)
    log = get_run_logger()
    with concurrency(concurrency_limit_name(db.host), occupy=1, strict=True):
        log.info("%s: backup %s starting on host %s", db.name, backup_id, db.host)
        try:
            with run_lock("backup", location.location):
                backup.preflight(settings)
                audit.backup_started(
                    ops,
                    audit_id=audit_id,
                    backup_type="logical",
                    backup_id=backup_id,
                    operator=operator,
                )
                manifest = backup.dump_encrypt_upload(settings, backup_id, operator)
                listing.write_manifest(open_store(settings), manifest)
        except Exception as exc:
            error = scrub(f"{db.name}: {type(exc).__name__}: {exc}")
            audit.backup_started(
                ops,
                audit_id=audit_id,
                backup_type="logical",
                backup_id=backup_id,
                operator=operator,
            )
            audit.backup_finished(ops, audit_id, status="failed", error=error)
            raise
    audit.backup_finished(
        ops,
        audit_id,
        status="success",
        size_bytes=manifest.object.size_bytes,
        checksum=manifest.object.sha256,
    )
    log.info("%s: backup %s stored (%d bytes)", db.name, backup_id, manifest.object.size_bytes)
    return {
        "name": db.name,
        "host": db.host,
        "backup_id": backup_id,
        "size_bytes": manifest.object.size_bytes,
        "prefix": db.prefix,
    }
