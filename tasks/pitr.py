"""The base-backup and point-in-time-recovery runbooks' steps as Prefect tasks.

Tasks take and return plain values (ids, paths, dicts) so that a retried flow run
re-uses the results of the steps that completed (DESIGN.md pitfalls).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from wedefi_dr.config import get_settings
from wedefi_dr.observability import audit
from wedefi_dr.physical import basebackup, pitr
from wedefi_dr.storage.s3 import ObjectStore
from wedefi_dr_dev.stack import WAL_ENV_NAME, Stack, conf_quote, wal_command


# ---- base backup -------------------------------------------------------------------------
@task(name="stream pg_basebackup to the object store")
def stream_base_backup(backup_id: str, operator: str) -> dict[str, Any]:
    """pg_basebackup -Ft -X fetch | gzip | gpg | multipart upload; manifest written last."""
    m = basebackup.take(get_settings(), operator, backup_id=backup_id)
    return m.model_dump(mode="json", exclude={"pg_backup_manifest"})


# ---- point-in-time recovery --------------------------------------------------------------
def _cluster(name: str):
    return Stack().cluster(name)


@task(name="check the target lies in the recoverable window")
def check_request(
    target_kind: str,
    target_value: str,
    inclusive: bool,
    timeline: str,
    cluster: str,
    operator: str,
    justification: str,
    becomes_production: bool,
) -> dict[str, Any]:
    """Every refusal happens here, before the approval and before anything changes."""
    if not operator.strip():
        raise pitr.InvalidInput("operator is required: who is recovering (audit log)")
    if not justification.strip():
        raise pitr.InvalidInput("justification is required: why this recovery (audit log)")
    name = pitr.validate_cluster_name(cluster)
    target = pitr.RecoveryTarget.parse(target_kind, target_value, inclusive, timeline)
    settings = get_settings()
    settings.require("gpg_passphrase", "ops_dsn")
    window = pitr.recoverable_window(settings)
    base = pitr.choose_base_backup(target, window)
    c = _cluster(name)
    production = pitr.is_production(settings, name, c.data)
    return {
        "target": {
            "kind": target.kind,
            "value": target.value,
            "inclusive": target.inclusive,
            "timeline": target.timeline,
        },
        "target_description": target.describe(),
        "base_backup_id": base.backup_id,
        "base_backup_end": base.finished_at.isoformat(),
        "cluster": name,
        "cluster_port": c.port,
        "production": production,
        "archives_into_production": production or becomes_production,
        "window": window.describe(),
    }


@task(name="audit: recovery started", retries=3, retry_delay_seconds=2)
def audit_recovery_started(
    audit_id: str, request: dict[str, Any], operator: str, justification: str
) -> str:
    target = request["target"]
    return audit.recovery_started(
        get_settings().ops_dsn.get_secret_value(),
        audit_id=audit_id,
        recovery_type="pitr",
        backup_id=request["base_backup_id"],
        target=f"cluster {request['cluster']}: {request['target_description']}",
        target_time=(
            pitr.RecoveryTarget.parse(**target).time.replace(tzinfo=None)
            if target["kind"] == "time"
            else None
        ),
        operator=operator,
        justification=justification,
    )


@task(name="stop application services")
def stop_application_services() -> list[str]:
    return pitr.run_commands(get_settings().app_stop_commands)


@task(name="start application services")
def start_application_services() -> list[str]:
    return pitr.run_commands(get_settings().app_start_commands)


@task(name="fetch the newest base backup before the target")
def fetch_base_backup(request: dict[str, Any]) -> dict[str, Any]:
    """Stop the cluster, keep its old data aside (never deleted), extract the base backup."""
    logger = get_run_logger()
    settings = get_settings()
    c = _cluster(request["cluster"])
    if pitr.server_running(c.data):
        c.stop()
    aside = pitr.move_aside(c.data)
    if aside:
        logger.info("previous data directory kept at %s", aside)
    c.home.mkdir(parents=True, exist_ok=True)
    pitr._chown_postgres(c.home)
    manifest = basebackup.resolve(ObjectStore(settings), request["base_backup_id"])
    spool = Path(settings.spool_dir or tempfile.gettempdir())
    pitr.extract_base_backup(settings, manifest, c.data, spool)
    logger.info(
        "base backup %s extracted into %s (%.1f MB)",
        manifest.backup_id,
        c.data,
        manifest.plaintext_size_bytes / 1e6,
    )
    return {"data_dir": str(c.data), "kept_aside": str(aside) if aside else None}


@task(name="write recovery settings (recovery.signal, restore_command, targets)")
def write_recovery_settings(request: dict[str, Any], flow_run_note: str) -> dict[str, str]:
    settings = get_settings()
    c = _cluster(request["cluster"])
    restore_env = pitr.write_wal_env(settings, c.home / "wal-restore.env")
    archive_command = None
    if request["archives_into_production"]:
        archive_env = pitr.write_wal_env(settings, c.home / WAL_ENV_NAME)
        archive_command = wal_command("push", archive_env) + " %p"
    written = pitr.write_recovery_settings(
        c.data,
        pitr.RecoveryTarget.parse(**request["target"]),
        restore_command=wal_command("fetch", restore_env) + " %f %p",
        socket_dir=c.home,
        archive_command=archive_command,
        note=flow_run_note,
    )
    get_run_logger().info(
        "recovery.signal written; settings: %s",
        ", ".join(f"{k}={conf_quote(v)}" for k, v in written.items()),
    )
    return written


@task(name="start the server and wait for replay to reach the target")
def start_and_wait(request: dict[str, Any]) -> dict[str, Any]:
    settings = get_settings()
    c = _cluster(request["cluster"])
    pitr.start_server(c.data, c.port, c.log)
    reached = pitr.wait_for_target(
        c.dsn(), c.data, c.log, float(settings.pitr_replay_timeout_seconds)
    )
    get_run_logger().info(
        "replay reached %s (last commit replayed %s) in %.1f s",
        reached["replay_lsn"],
        reached["last_replayed_commit"],
        reached["seconds"],
    )
    return reached


@task(name="validate the recovered data")
def validate_recovered(request: dict[str, Any]) -> dict[str, Any]:
    """Row counts of every table (the integrity suites run on restored copies elsewhere)."""
    counts = pitr.row_counts(_cluster(request["cluster"]).dsn())
    if not counts:
        raise pitr.RecoveryFailed("the recovered cluster has no user tables: refusing to promote")
    return {"tables": len(counts), "rows": sum(counts.values()), "counts": counts}


@task(name="promote with pg_promote() and confirm pg_is_in_recovery() is false")
def promote(request: dict[str, Any]) -> dict[str, Any]:
    c = _cluster(request["cluster"])
    result = pitr.promote(c.dsn())
    pitr.clear_prefetch(c.data)
    result["timeline"] = pitr.current_timeline(c.dsn())
    return result
