"""Runbook: the weekly backup lifecycle (Sunday 01:00 UTC).

select what goes (GFS for logical backups; base backups and WAL outside the PITR window,
never WAL a kept base backup needs) → (dry run: list it and stop) → delete it with the
lifecycle's own credential, each backup audited, all of it recorded for the sync → prune
the product's own records. On any failure: notification (and the audit row of the backup
being deleted says failed).
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from tasks import lifecycle as steps
from tasks.common import failure_reported, run_lock, run_scoped_uuid
from wedefi_dr.config import get_settings
from wedefi_dr.retention.guard import check_moment


def _rows(plan: dict) -> list[dict]:
    rows = []
    for kind in ("logical", "base"):
        for name, why in plan[kind]["delete"].items():
            rows.append({"kind": kind, "name": name, "action": "delete", "why": why})
        for name, why in plan[kind]["keep"].items():
            rows.append({"kind": kind, "name": name, "action": "keep", "why": why})
    for name, why in plan["wal"]["delete"].items():
        rows.append({"kind": "wal", "name": name, "action": "delete", "why": why})
    return rows


@flow(name="backup-retention", log_prints=True)
def backup_retention(
    dry_run: bool = True, as_of: datetime | None = None, operator: str = "scheduler"
) -> dict:
    """Expire backups the lifecycle no longer keeps; a dry run only lists them."""
    moment = check_moment(as_of).replace(tzinfo=UTC)
    settings = get_settings()
    run_id = run_scoped_uuid("backup-retention")[:8]
    log = get_run_logger()
    with (
        failure_reported(
            "WeDefiDaily backup retention", {"as_of": moment.isoformat()}, lambda _e: None
        ),
        run_lock("backup-retention", settings.bucket),
    ):
        plan = steps.select(moment)
        create_table_artifact(
            key="backup-retention-plan",
            table=_rows(plan),
            description=f"backup lifecycle as of {moment:%Y-%m-%d %H:%M} UTC"
            + (" (dry run)" if dry_run else ""),
        )
        going = (
            len(plan["logical"]["delete"])
            + len(plan["base"]["delete"])
            + len(plan["wal"]["delete"])
        )
        log.info(
            "%s: %d logical, %d base backups and %d WAL files %s",
            "dry run" if dry_run else "lifecycle",
            len(plan["logical"]["delete"]),
            len(plan["base"]["delete"]),
            len(plan["wal"]["delete"]),
            "would go" if dry_run else "go",
        )
        pruned = None
        if not dry_run and going:
            pruned = steps.prune(plan, operator, run_id)
        records = steps.prune_records(moment, dry_run, operator)
    return {
        "as_of": moment.isoformat(),
        "dry_run": dry_run,
        "plan": plan,
        "pruned": pruned,
        "records": records,
        "at": datetime.now(UTC).isoformat(),
    }
