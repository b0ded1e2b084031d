"""The rejoin runbook's steps as Prefect tasks (the old primary back as a standby)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from tasks import timeouts
from tasks.standby import handle, record_roles, resolve_pair
from wedefi_dr.config import get_settings
from wedefi_dr.errors import InvalidInput
from wedefi_dr.physical import archiving, rejoin, standby
from wedefi_dr.postgres import clusters_file
from wedefi_dr.runbook import Rejoin


@task(name=Rejoin.CHECK_REQUEST.value, timeout_seconds=timeouts.SHORT)
def check_request(
    old_primary: str, new_primary: str, slot: str | None, operator: str, justification: str
) -> dict[str, Any]:
    """Every refusal before anything changes (wedefi_dr.physical.rejoin.check_request)."""
    if not operator.strip():
        raise InvalidInput("operator is required: who is rejoining the old primary (audit log)")
    if not justification.strip():
        raise InvalidInput("justification is required: why rejoin it now (audit log)")
    old, new = resolve_pair(old_primary, new_primary)
    slot = standby.validate_slot(slot or get_settings().standby_slot)
    found = rejoin.check_request(old, new, slot)
    if found["not_rewindable"]:
        get_run_logger().warning(
            "%s: a fresh pg_basebackup will replace it", found["not_rewindable"]
        )
    return {
        "old": old.model_dump(mode="json"),
        "new": new.model_dump(mode="json"),
        "slot": slot,
        **found,
    }


@task(name=Rejoin.KEEP_WAL.value, timeout_seconds=timeouts.MEDIUM)
def keep_wal(request: dict[str, Any]) -> dict[str, Any]:
    """Nothing the old primary wrote is lost to the rewind."""
    kept = rejoin.keep_wal(get_settings(), handle(request["old"]), request)
    logger = get_run_logger()
    logger.info(
        "pushed %d .ready segment(s); copied %d segment(s) aside to %s",
        len(kept["pushed"]),
        len(kept["copied_aside"]),
        kept["aside"],
    )
    for problem in kept["not_pushed"]:
        logger.warning("not pushed (kept in place and in the copy aside): %s", problem)
    return kept


def _archive_command(old_description: dict[str, Any]) -> str:
    """What the rejoined standby archives with once promoted again: its own env file."""
    old = handle(old_description)
    env = archiving.production_archive_env(get_settings(), old.home, os_user=old.os_user)
    return archiving.archive_command(env)


@task(name=Rejoin.REWIND.value, timeout_seconds=timeouts.BASE_BACKUP)
def rewind(request: dict[str, Any]) -> dict[str, Any]:
    done = rejoin.rewind_or_reprovision(
        get_settings(),
        handle(request["old"]),
        handle(request["new"]),
        request["slot"],
        not_rewindable=request["not_rewindable"],
        archive_command=_archive_command(request["old"]),
        timeout=timeouts.BASE_BACKUP,
    )
    logger = get_run_logger()
    if done["fallback"]:
        logger.warning(done["fallback"])
    else:
        logger.info("pg_rewind: %s", done["diverged"] or "no rewind required")
        logger.info(
            "new timeline's WAL fetched from the archive: %s; divergent files removed: %s",
            done["wal"]["fetched"] or "none",
            done["wal"]["removed"] or "none",
        )
    return done


@task(name=Rejoin.CONFIGURE.value, timeout_seconds=timeouts.SHORT)
def configure(request: dict[str, Any], rewound: dict[str, Any]) -> str:
    """After pg_rewind: a standby of the new primary, unfenced (pg_basebackup's
    re-provisioning did both already)."""
    if rewound["method"] != "pg_rewind":
        return "configured by the fresh pg_basebackup"
    rejoin.configure_and_unfence(
        handle(request["old"]),
        handle(request["new"]),
        request["slot"],
        _archive_command(request["old"]),
    )
    return "standby.signal, primary_conninfo (passfile) and slot written; fence removed"


@task(name=Rejoin.VERIFY_STREAMING.value, timeout_seconds=timeouts.MEDIUM)
def start_and_verify(request: dict[str, Any]) -> dict[str, Any]:
    old, new = handle(request["old"]), handle(request["new"])
    if not old.is_running():
        old.start(wait=True)
    status = standby.wait_streaming(new, old, request["slot"])
    get_run_logger().info(
        "%s streams from %s (%s), lag %s bytes",
        old.name,
        new.name,
        status["sync_state"],
        status["lag_bytes"],
    )
    return status


@task(name=Rejoin.CLUSTERS_FILE.value, timeout_seconds=timeouts.SHORT)
def update_clusters_file(
    request: dict[str, Any], operator: str, justification: str
) -> dict[str, Any]:
    name = request["old"]["name"]
    return record_roles(
        lambda path: clusters_file.after_rejoin(path, name),
        operator=operator,
        justification=justification,
    )
