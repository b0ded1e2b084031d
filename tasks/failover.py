"""The failover runbook's steps as Prefect tasks (the approval rule is PITR's own task)."""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task

from tasks import timeouts
from tasks.standby import handle, record_roles, resolve_pair
from wedefi_dr.config import get_settings
from wedefi_dr.errors import InvalidInput, SettingsMissing
from wedefi_dr.observability.audit import check_operator
from wedefi_dr.physical import archiving, standby
from wedefi_dr.postgres import clusters_file
from wedefi_dr.postgres.primary import current_primary
from wedefi_dr.postgres.tools import connect
from wedefi_dr.runbook import Failover

ARCHIVE_CONFIRM_SECONDS = 120.0


@task(name=Failover.CHECK_REQUEST.value, timeout_seconds=timeouts.SHORT)
def check_request(
    primary: str, standby_name: str, operator: str, justification: str
) -> dict[str, Any]:
    """Refusals before the approval: operator, justification, a standby that is one."""
    check_operator(operator)
    if not operator.strip():
        raise InvalidInput("operator is required: who is failing over (audit log)")
    if not justification.strip():
        raise InvalidInput("justification is required: why fail over (audit log)")
    p, s = resolve_pair(primary, standby_name)
    if not s.is_running():
        raise InvalidInput(f"the standby {s.name} is not running: nothing to promote")
    standby.check_is_standby(s)
    return {
        "primary": p.model_dump(mode="json"),
        "standby": s.model_dump(mode="json"),
        "cluster": s.name,
        "primary_running": p.is_running(),
    }


@task(name=Failover.FENCE.value, timeout_seconds=timeouts.MEDIUM)
def fence_old_primary(request: dict[str, Any], reason: str) -> dict[str, Any]:
    """Before the promotion: one primary at any moment, never two."""
    done = standby.fence(handle(request["primary"]), handle(request["standby"]), reason=reason)
    logger = get_run_logger()
    logger.info(
        "old primary %s: %s; fenced: %s", done["old_primary"], done["stopped"], done["fenced"]
    )
    if not done["fenced"]:
        logger.warning(done["note"])
    return done


@task(name=Failover.ARCHIVING.value, timeout_seconds=timeouts.MEDIUM)
def configure_archiving(request: dict[str, Any]) -> str:
    """The standby archives with its own production env file (kept if it has one)."""
    s = handle(request["standby"])
    env = archiving.production_archive_env(get_settings(), s.home, os_user=s.os_user)
    command = archiving.archive_command(env)
    standby.configure_archiving(s, command)
    return str(env)


@task(name=Failover.PROMOTE.value, timeout_seconds=timeouts.MEDIUM)
def promote(request: dict[str, Any]) -> dict[str, Any]:
    result = standby.promote(handle(request["standby"]))
    get_run_logger().info(
        "%s promoted: timeline %d at %s, writable",
        request["standby"]["name"],
        result["timeline"],
        result["promoted_at_lsn"],
    )
    return result


@task(name=Failover.CONFIRM_ARCHIVE.value, timeout_seconds=timeouts.SHORT)
def confirm_archive(request: dict[str, Any], timeline: int) -> dict[str, Any]:
    """Wait until the new primary's archiver has stored a segment of the new timeline
    (its history file goes first). The failover has happened by now: a failing archiver
    is named in the result and the notification, it does not undo the promotion."""
    s = handle(request["standby"])
    deadline = time.monotonic() + ARCHIVE_CONFIRM_SECONDS
    tli = f"{timeline:08X}"
    row: tuple = ()
    while time.monotonic() < deadline:
        with connect(s.dsn(), autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT archived_count, last_archived_wal, failed_count, last_failed_wal"
                " FROM pg_stat_archiver"
            )
            row = cur.fetchone()
        last = row[1] or ""
        if last.startswith(tli) and len(last) == 24:
            get_run_logger().info("archiving on timeline %d: %s archived", timeline, last)
            return {"last_archived_wal": last, "problem": None}
        time.sleep(0.5)
    problem = (
        f"the new primary has not archived a segment of timeline {timeline} in "
        f"{ARCHIVE_CONFIRM_SECONDS:.0f} s (pg_stat_archiver: archived {row[0] if row else '?'}, "
        f"last {row[1] if row else '?'}, failed {row[2] if row else '?'}, last failed "
        f"{row[3] if row else '?'}): check its archive_command and server log"
    )
    get_run_logger().error(problem)
    return {"last_archived_wal": row[1] if row else None, "problem": problem}


@task(name=Failover.CLUSTERS_FILE.value, timeout_seconds=timeouts.SHORT)
def update_clusters_file(
    request: dict[str, Any], operator: str, justification: str
) -> dict[str, Any]:
    """After the promotion: backups, locks, monitoring, the restore-target policy and PITR
    follow the flag (:mod:`wedefi_dr.postgres.primary`)."""
    old, new = request["primary"]["name"], request["standby"]["name"]
    return record_roles(
        lambda path: clusters_file.after_failover(path, old, new),
        operator=operator,
        justification=justification,
    )


@task(name=Failover.ROLL_BACK.value, timeout_seconds=timeouts.MEDIUM)
def roll_back(request: dict[str, Any], fenced: dict[str, Any]) -> str:
    """The promotion failed: the old primary is unfenced and started as it was."""
    what = standby.unfence(
        handle(request["primary"]), restart=fenced["stopped"].startswith("stopped")
    )
    get_run_logger().warning(what)
    return what


def next_steps(old: str, new: str, address: str) -> str:
    """What is left for the operator, as the system now sees it: whether
    ``WEDEFI_DR_PRIMARY_DSN`` already leads backups and monitoring to ``new`` (through the
    clusters file just written) or must be pointed at ``address`` by hand (a DSN naming a
    DNS name or a proxy the file does not describe, a file that could not be written)."""
    rejoin = (
        f"rejoin the old primary as a standby: wedefi-dr standby rejoin --old-primary {old} "
        f"--new-primary {new}"
    )
    try:
        now = current_primary(get_settings())
    except (InvalidInput, SettingsMissing) as exc:
        return f"point WEDEFI_DR_PRIMARY_DSN at {address} ({exc}); {rejoin}"
    if new in (now.cluster or "").split("/"):
        return (
            f"nothing to change for backups and monitoring: WEDEFI_DR_PRIMARY_DSN now leads to "
            f"{new} at {address} through the clusters file; {rejoin}"
        )
    return (
        f"point WEDEFI_DR_PRIMARY_DSN at {address}: the server it names is not one the "
        f"clusters file leads to {new} (backups and monitoring read it); {rejoin}"
    )
