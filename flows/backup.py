"""Runbook: daily full logical backup (the plan's 02:00 UTC pg_dump, done safely).

preflight → audit row 'running' → dump, encrypt and upload → write manifest →
audit row 'success' → metrics. On any failure: audit row 'failed', metrics, notification.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from tasks import backup as steps
from tasks.common import (
    attempt_scoped_uuid,
    audit_backup_finished,
    audit_backup_started,
    backup_id_for_this_run,
    failure_reported,
    metrics_database,
    protected_database,
    publish_backup_metrics,
    publish_summary,
    run_lock,
)
from wedefi_dr.observability.audit import check_operator


@flow(name="logical-backup", log_prints=True)
def logical_backup(operator: str = "scheduler") -> str:
    """Take a full logical backup of the primary; returns the backup id.

    Args:
        operator: Who asked for it, recorded in the audit row and the manifest.
    """
    check_operator(operator)  # before anything: the failure path's audit would refuse it
    backup_id = backup_id_for_this_run("backup-id")
    audit_id = attempt_scoped_uuid("backup-audit")
    get_run_logger().info("backup %s starting (operator %s)", backup_id, operator)
    database = metrics_database()  # labelled alike whether or not preflight is reached

    def audit_failed(error: str) -> None:
        audit_backup_started(audit_id, backup_id, operator)  # a no-op when already there
        audit_backup_finished(audit_id, "failed", error=error)

    with (
        failure_reported(
            f"WeDefiDaily backup {backup_id}",
            {"backup_id": backup_id},
            close_audit=audit_failed,
            also=lambda: publish_backup_metrics("logical", database, None, None),
        ),
        run_lock("backup", protected_database()),
    ):
        database = steps.preflight()["database"]
        audit_backup_started(audit_id, backup_id, operator)
        manifest = steps.dump_encrypt_upload(backup_id, operator)
        steps.write_manifest(manifest)
    obj = manifest["object"]
    audit_backup_finished(audit_id, "success", size_bytes=obj["size_bytes"], checksum=obj["sha256"])
    publish_backup_metrics("logical", database, manifest["duration_seconds"], obj["size_bytes"])
    publish_summary(
        "backup-summary",
        "backup_summary.md.j2",
        f"logical backup {backup_id}",
        m=manifest,
        database=database,
    )
    return backup_id


@flow(name="fleet-backup", log_prints=True)
def fleet_backup(fleet_file: str = "deployments/fleet.yaml", operator: str = "scheduler") -> dict:
    """Back up every database of ``fleet_file`` concurrently, within each host's limit.

    One database failing does not stop the others: each ends with its own audit row, and
    the run then fails naming every database that did not complete (one notification).
    Returns ``{name: backup record}`` when all completed.
    """
    from tasks import fleet as fleet_steps
    from wedefi_dr.errors import BackupFailed

    check_operator(operator)
    fleet = fleet_steps.load(fleet_file)
    fleet_steps.set_host_limits(
        {host: spec["max_concurrent_backups"] for host, spec in fleet["hosts"].items()}
    )
    futures = {
        entry["name"]: fleet_steps.back_up_database.submit(
            entry,
            backup_id_for_this_run(f"backup-id:{entry['name']}"),
            attempt_scoped_uuid(f"backup-audit:{entry['name']}"),
            operator,
        )
        for entry in fleet["databases"]
    }
    done: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for name, future in futures.items():
        try:
            done[name] = future.result()
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
    lines = [f"- {name}: {r['backup_id']} ({r['size_bytes']:,} bytes)" for name, r in done.items()]
    lines += [f"- {name}: FAILED {error}" for name, error in failed.items()]
    get_run_logger().info(
        "fleet backup: %d completed, %d failed\n%s", len(done), len(failed), "\n".join(lines)
    )
    with failure_reported(
        f"WeDefiDaily fleet backup ({len(failed)} of {len(futures)} failed)",
        {"completed": sorted(done), "failed": sorted(failed)},
        close_audit=lambda error: None,  # each database closed its own audit row
    ):
        if failed:
            raise BackupFailed(
                "fleet backup: "
                + "; ".join(f"{name} failed ({error})" for name, error in failed.items())
                + f"; completed: {', '.join(sorted(done)) or 'none'}"
            )
    return done
