"""The standby runbook's steps as Prefect tasks.

The clusters are resolved from the clusters file once, by the first step, and travel as
their descriptions (plain dicts): a retried run acts on what was checked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks import timeouts
from wedefi_dr.config import get_settings
from wedefi_dr.errors import InvalidInput
from wedefi_dr.observability import audit
from wedefi_dr.physical import archiving, standby
from wedefi_dr.physical.pitr.approval import validate_cluster_name
from wedefi_dr.postgres.cluster import ClusterHandle, cluster_handle
from wedefi_dr.runbook import Standby


def handle(description: dict[str, Any]) -> ClusterHandle:
    return ClusterHandle.model_validate(description)


def record_roles(
    change: Callable[[Path], dict[str, Any]], *, operator: str, justification: str
) -> dict[str, Any]:
    """Apply ``change`` to the clusters file (wedefi_dr.postgres.clusters_file) and audit
    it as its own recovery row: ``success`` with the keys changed, or ``failed`` with the
    sentence telling the operator what to change by hand. Never raises for a file we may
    not write: the roles have changed on the servers already, the file must catch up."""
    settings = get_settings()
    path = settings.clusters_file
    assert path is not None  # the request check resolved both clusters through it
    done = change(path)
    logger = get_run_logger()
    if done["written"] or done["operator_action"]:
        ops = settings.ops_dsn.get_secret_value()
        audit_id = audit.recovery_started(
            ops,
            recovery_type="clusters_file",
            backup_id=None,
            target=f"clusters file {path}: {', '.join(done['changes'])}"[:300],
            operator=operator,
            justification=justification,
        )
        audit.recovery_finished(
            ops,
            audit_id,
            status="success" if done["written"] else "failed",
            error=done["operator_action"],
        )
    if done["operator_action"]:
        logger.error(done["operator_action"])
    else:
        logger.info("clusters file %s: %s", path, ", ".join(done["changes"]) or "already so")
    return done


def resolve_pair(primary: str, standby_name: str) -> tuple[ClusterHandle, ClusterHandle]:
    """Both handles from the clusters file; the same cluster twice is refused."""
    settings = get_settings()
    p = cluster_handle(settings.clusters_file, validate_cluster_name(primary))
    s = cluster_handle(settings.clusters_file, validate_cluster_name(standby_name))
    if p.data_dir.resolve() == s.data_dir.resolve() or (p.host, p.port) == (s.host, s.port):
        raise InvalidInput(f"{primary} and {standby_name} are the same cluster")
    return p, s


@task(name=Standby.CHECK_REQUEST.value, timeout_seconds=timeouts.SHORT)
def check_request(primary: str, standby_name: str, slot: str | None) -> dict[str, Any]:
    """Every refusal before anything changes: names, slot, an empty target, a live primary."""
    p, s = resolve_pair(primary, standby_name)
    slot = standby.validate_slot(slot or get_settings().standby_slot)
    if s.initialized():
        raise InvalidInput(
            f"cluster {s.name} already holds a data directory at {s.data_dir}: a standby is "
            "provisioned into an empty one"
        )
    if not p.is_running():
        raise InvalidInput(f"the primary {p.name} is not running: nothing to stream from")
    return {
        "primary": p.model_dump(mode="json"),
        "standby": s.model_dump(mode="json"),
        "slot": slot,
    }


@task(name=Standby.PROVISION.value, timeout_seconds=timeouts.BASE_BACKUP)
def provision(request: dict[str, Any]) -> dict[str, Any]:
    """pg_basebackup onto the standby, wired to archive into production once promoted
    (its own env file: production's settings, never the worker's credentials)."""
    settings = get_settings()
    s = handle(request["standby"])
    env = archiving.production_archive_env(settings, s.home, os_user=s.os_user)
    done = standby.provision(
        handle(request["primary"]),
        s,
        request["slot"],
        archive_command=archiving.archive_command(env),
        timeout=timeouts.BASE_BACKUP,
    )
    get_run_logger().info(
        "standby %s copied from %s in %.1f s on slot %s",
        s.name,
        request["primary"]["name"],
        done["copy_seconds"],
        done["slot"],
    )
    return done


@task(name=Standby.VERIFY_STREAMING.value, timeout_seconds=timeouts.SHORT)
def verify_streaming(request: dict[str, Any]) -> dict[str, Any]:
    """Streaming on the primary, in recovery on the standby; the lag in bytes (the monitor
    flow publishes it as ``replication_lag_bytes`` and alerts on it)."""
    settings = get_settings()
    p, s = handle(request["primary"]), handle(request["standby"])
    status = standby.wait_streaming(p, s, request["slot"])
    lag = status["lag_bytes"] or 0
    logger = get_run_logger()
    logger.info(
        "standby %s streaming (%s), replayed %s, lag %d bytes",
        s.name,
        status["sync_state"],
        status["replay_lsn"],
        lag,
    )
    if lag > settings.replication_lag_warning_bytes:
        logger.warning("replication lag %d bytes is above the alert threshold", lag)
    return status
