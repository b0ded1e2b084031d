"""The base-backup and point-in-time-recovery runbooks' steps as Prefect tasks.

Tasks take and return plain values (ids, dicts) so that a retried flow run re-uses the
results of the steps that completed (DESIGN.md pitfalls). The cluster is resolved from the
clusters file once, by the first step, and travels in the request as its description: a
retried or resumed run acts on the cluster that was checked and approved, even if the file
changed meanwhile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks import timeouts
from tasks.standby import record_roles
from wedefi_dr.config import get_settings
from wedefi_dr.drtest import drill
from wedefi_dr.errors import InvalidInput
from wedefi_dr.observability.audit import check_operator
from wedefi_dr.physical import archiving, basebackup
from wedefi_dr.physical.pitr import approval, recovery, window
from wedefi_dr.physical.pitr import delta as pitr_delta
from wedefi_dr.physical.pitr.target import RecoveryTarget
from wedefi_dr.postgres import clusters_file
from wedefi_dr.postgres.cluster import ClusterHandle, cluster_handle, conf_quote
from wedefi_dr.runbook import PITR
from wedefi_dr.storage.repository import open_store

MAX_APPROVAL_WAIT_SECONDS = 7 * 24 * 3600


# ---- base backup -------------------------------------------------------------------------
def _handle(request: dict[str, Any]) -> ClusterHandle:
    return ClusterHandle.model_validate(request["cluster_handle"])


@task(name=PITR.CHECK_REQUEST.value, timeout_seconds=timeouts.SHORT)
def check_request(
    target_kind: str,
    target_value: str,
    inclusive: bool,
    timeline: str,
    cluster: str,
    operator: str,
    justification: str,
    becomes_production: bool,
    approval_timeout_seconds: int = 3600,
    delta: bool = False,
) -> dict[str, Any]:
    """Every refusal happens here, before the approval and before anything changes."""
    check_operator(operator)
    if not 1 <= approval_timeout_seconds <= MAX_APPROVAL_WAIT_SECONDS:
        raise InvalidInput(
            f"approval_timeout_seconds must be 1-{MAX_APPROVAL_WAIT_SECONDS}, "
            f"not {approval_timeout_seconds}"
        )
    if not operator.strip():
        raise InvalidInput("operator is required: who is recovering (audit log)")
    if not justification.strip():
        raise InvalidInput("justification is required: why this recovery (audit log)")
    name = approval.validate_cluster_name(cluster)
    target = RecoveryTarget.parse(target_kind, target_value, inclusive, timeline)
    settings = get_settings()
    settings.require("gpg_passphrase", "ops_dsn")
    handle = cluster_handle(settings.clusters_file, name)
    w = window.recoverable_window(settings)
    base = window.choose_base_backup(target, w)
    window.check_timeline(target, w, base)
    if delta:
        if becomes_production:
            raise InvalidInput(
                "--delta rewrites the cluster's directory in place with no copy to roll back "
                "to: a cluster that becomes production is recovered without it (the swap keeps "
                "its old directory aside)"
            )
        pitr_delta.check_target(handle, base.system_identifier)
    return {
        "target": {
            "kind": target.kind,
            "value": target.value,
            "inclusive": target.inclusive,
            "timeline": target.timeline,
        },
        "target_description": target.describe(),
        "target_time": target.time.replace(tzinfo=None).isoformat() if target.time else None,
        "base_backup_id": base.backup_id,
        "base_backup_end": base.finished_at.isoformat(),
        "cluster": name,
        "cluster_port": handle.port,
        "cluster_handle": handle.model_dump(mode="json"),
        "production": handle.production,
        "archives_into_production": handle.production or becomes_production,
        "becomes_production": becomes_production and not handle.production,
        "delta": delta,
        "window": w.describe(),
    }


@task(name=f"{PITR.APPROVAL}: request", timeout_seconds=timeouts.SHORT)
def request_approval(request: dict[str, Any], operator: str) -> str:
    """What the approver is asked, shown on the paused run's form and in the log."""
    break_glass = request["archives_into_production"]
    rule = (
        "Production: break-glass, two authenticated approvers and a declared emergency."
        if break_glass
        else "Scratch copy: one authenticated approver."
    )
    get_run_logger().info(
        "recover cluster %s to %s from base backup %s; %s approval needed",
        request["cluster"],
        request["target_description"],
        request["base_backup_id"],
        "break-glass (emergency + two approvers)" if break_glass else "one",
    )
    return (
        f"Approve recovery of **{request['cluster']}** to {request['target_description']} "
        f"(operator {operator}). {rule}"
    )


@task(name=PITR.STOP_APPLICATION.value, timeout_seconds=timeouts.MEDIUM)
def stop_application_services() -> list[str]:
    return recovery.run_commands(get_settings().app_stop_commands)


@task(name=PITR.START_APPLICATION.value, timeout_seconds=timeouts.MEDIUM)
def start_application_services() -> list[str]:
    return recovery.run_commands(get_settings().app_start_commands)


@task(name=PITR.STAGE_BASE_BACKUP.value, timeout_seconds=timeouts.RESTORE)
def stage_base_backup(request: dict[str, Any]) -> str:
    """Download, decrypt and verify the base backup beside the data directory, while the
    cluster (production, for break-glass) still runs: a bad backup stops nothing."""
    settings = get_settings()
    c = _handle(request)
    manifest = basebackup.resolve(open_store(settings), request["base_backup_id"])
    staged = recovery.stage_base_backup(settings, manifest, c, settings.spool_path)
    get_run_logger().info(
        "base backup %s staged and verified in %s (%.1f MB: object sha256, gpg status, "
        "plaintext sha256, pg_verifybackup)",
        manifest.backup_id,
        staged,
        manifest.plaintext_size_bytes / 1e6,
    )
    return str(staged)


@task(name=PITR.DELTA_RESTORE.value, timeout_seconds=timeouts.RESTORE)
def delta_restore_base_backup(request: dict[str, Any]) -> dict[str, int]:
    """The base backup applied to the stopped copy's own data directory, rewriting only the
    files that differ, through the same checks as staging (object sha256, gpg status,
    plaintext sha256, pg_verifybackup): a refresh of a copy costs what changed, not a
    second directory. The request check refused production and other systems."""
    settings = get_settings()
    c = _handle(request)
    manifest = basebackup.resolve(open_store(settings), request["base_backup_id"])
    done = pitr_delta.delta_restore(settings, manifest, c, settings.spool_path)
    logger = get_run_logger()
    logger.info(
        "base backup %s applied to %s by delta: %d file(s) written, %d kept, %d removed; "
        "pg_verifybackup passed",
        manifest.backup_id,
        c.data_dir,
        done["written"],
        done["kept"],
        len(done["removed"]),
    )
    return {"written": done["written"], "kept": done["kept"], "removed": len(done["removed"])}


@task(name=PITR.STOP_AND_SWAP.value, timeout_seconds=timeouts.MEDIUM)
def stop_and_swap(request: dict[str, Any], staged: str) -> dict[str, Any]:
    """Stop the server, keep its old data aside (never deleted), rename the verified
    backup into place. Whether it ran is kept: a rollback starts it only if it did."""
    c = _handle(request)
    was_running = c.is_running()
    c.stop()
    try:
        aside = recovery.install_staged(c, Path(staged))
    except Exception as exc:
        if was_running:
            c.start(wait=True)
        raise recovery.RolledBack(
            f"{type(exc).__name__}: {exc}; the data directory was not replaced"
            + ("; the cluster was started again as it was" if was_running else "")
        ) from exc
    if aside:
        get_run_logger().info("previous data directory kept at %s", aside)
    return {"kept_aside": str(aside) if aside else None, "was_running": was_running}


@task(name=PITR.PUSH_UNARCHIVED_WAL.value, timeout_seconds=timeouts.MEDIUM)
def push_unarchived_wal(request: dict[str, Any], kept_aside: str | None) -> dict[str, list[str]]:
    """Production's WAL that was still ``.ready`` goes to the archive before replay, so
    ``latest`` loses none of it; what fails to push is kept and named. A scratch cluster's
    old directory never archives into production."""
    if not (request["production"] and kept_aside):
        return {"pushed": [], "kept": []}
    result = recovery.push_unarchived(get_settings(), Path(kept_aside))
    logger = get_run_logger()
    logger.info("pushed %d un-archived WAL file(s) from the old pg_wal", len(result["pushed"]))
    for kept in result["kept"]:
        logger.warning("NOT archived, kept in the old data directory: %s", kept)
    return result


@task(name=PITR.ROLL_BACK.value, timeout_seconds=timeouts.MEDIUM)
def roll_back(request: dict[str, Any], swapped: dict[str, Any]) -> str:
    """The original data directory back, started if it ran before; the failed one kept."""
    c = _handle(request)
    aside = Path(swapped["kept_aside"]) if swapped["kept_aside"] else None
    what = recovery.roll_back(c, aside, restart=swapped["was_running"])
    get_run_logger().warning(what)
    return what


@task(name=PITR.WRITE_RECOVERY_SETTINGS.value, timeout_seconds=timeouts.SHORT)
def write_recovery_settings(request: dict[str, Any], flow_run_note: str) -> dict[str, str]:
    """restore_command always; archive_command only when the result is production."""
    settings = get_settings()
    c = _handle(request)
    restore_env = archiving.write_wal_env(
        settings,
        c.home / archiving.RESTORE_ENV_NAME,
        os_user=c.os_user,
        aws_env=archiving.archiver_aws_env(settings),
    )
    archive_command = None
    if request["archives_into_production"]:
        archive_env = archiving.production_archive_env(settings, c.home, os_user=c.os_user)
        archive_command = archiving.archive_command(archive_env)
    written = recovery.write_recovery_settings(
        c,
        RecoveryTarget.parse(**request["target"]),
        restore_command=archiving.restore_command(restore_env),
        archive_command=archive_command,
        note=flow_run_note,
    )
    get_run_logger().info(
        "recovery.signal written; settings: %s",
        ", ".join(f"{k}={conf_quote(v)}" for k, v in written.items()),
    )
    return written


@task(name=PITR.START_AND_REPLAY.value, timeout_seconds=timeouts.REPLAY)
def start_and_wait(request: dict[str, Any]) -> dict[str, Any]:
    c, settings = _handle(request), get_settings()
    primed = recovery.prime_prefetch(
        c, c.home / archiving.RESTORE_ENV_NAME, settings.wal_segment_bytes
    )
    c.start(wait=False)
    reached = recovery.wait_for_target(c, float(settings.pitr_replay_timeout_seconds))
    reached["prefetch_primed"] = primed
    get_run_logger().info(
        "replay reached %s (last commit replayed %s) in %.1f s",
        reached["replay_lsn"],
        reached["last_replayed_commit"],
        reached["seconds"],
    )
    return reached


@task(name=PITR.VALIDATE.value, timeout_seconds=timeouts.CHECKS)
def validate_recovered(request: dict[str, Any]) -> dict[str, Any]:
    """Row counts of every table (the integrity suites run on restored copies elsewhere)."""
    drill.fault_once(get_settings(), PITR.VALIDATE.value)
    counts = recovery.row_counts(_handle(request).dsn())
    if not counts:
        raise recovery.RecoveryFailed(
            "the recovered cluster has no user tables: refusing to promote"
        )
    return {"tables": len(counts), "rows": sum(counts.values()), "counts": counts}


@task(name=PITR.PROMOTE.value, timeout_seconds=timeouts.MEDIUM)
def promote(request: dict[str, Any]) -> dict[str, Any]:
    """``pg_promote()``; then the restore env file goes: it holds the archive's credential
    and passphrase, and a primary never runs ``restore_command``."""
    c = _handle(request)
    result = recovery.promote(c.dsn())
    recovery.clear_prefetch(c)
    (c.home / archiving.RESTORE_ENV_NAME).unlink(missing_ok=True)
    result["timeline"] = recovery.current_timeline(c.dsn())
    return result


@task(name=PITR.CLUSTERS_FILE.value, timeout_seconds=timeouts.SHORT)
def record_production(request: dict[str, Any], operator: str, justification: str) -> dict[str, Any]:
    """The promoted cluster becomes production in the clusters file (written atomically,
    audited; a file we may not write is named with the key to change by hand), so the
    restore-target policy, PITR's break-glass rule and the monitor treat it as production.
    The old primary keeps its flag: this flow neither stopped nor fenced it, and a cluster
    marked production too many only asks for more approval, never less."""
    name = request["cluster"]
    return record_roles(
        lambda path: clusters_file.set_roles(path, {name: {"production": True}}),
        operator=operator,
        justification=justification,
    )
