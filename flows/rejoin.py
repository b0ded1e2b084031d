"""Runbook: rejoin the fenced old primary as a streaming standby of the new primary.

1. check the request: operator and justification; the old primary fenced by a failover,
   not running, stopped cleanly, a copy of the same cluster; the new primary running and
   writable; its slot for the old one free
2. keep the old primary's WAL: ``.ready`` segments pushed to the archive, every segment the
   archive is not known to hold copied aside (nothing pg_rewind discards is lost)
3. ``pg_rewind --target-pgdata --source-server`` (password in a passfile), then the new
   timeline's segments it replays before the stream takes over, from the archive where the
   new primary has recycled them, and the old timeline's divergent copies out of ``pg_wal``;
   when it cannot (no checksums or wal_log_hints, WAL missing), the old directory is moved
   aside, still fenced, and a fresh ``pg_basebackup`` re-provisions the standby, and the
   report says why
4. configure it as a standby of the new primary (``standby.signal``, ``primary_conninfo``
   with the passfile, the slot) and remove the fence
5. start it and verify streaming (``pg_stat_replication`` on the new primary)
6. clusters file: the rejoined cluster ``fenced: false`` (atomically, audited)
7. audit row 'success'; report

No approval pause: the old primary is fenced and no longer production, its divergent WAL
is kept, and the new primary is only read from. The run is audited like a recovery.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from tasks import rejoin as steps
from tasks.common import (
    attempt_scoped_uuid,
    audit_recovery_finished,
    audit_recovery_started,
    failure_reported,
    run_lock,
    send_notification,
)
from wedefi_dr.runbook import Rejoin, timed


@flow(name="rejoin", log_prints=True)
def rejoin(
    operator: str,
    justification: str,
    old_primary: str = "primary",
    new_primary: str = "standby",
    slot: str | None = None,
) -> dict[str, Any]:
    """Make the fenced cluster ``old_primary`` a streaming standby of ``new_primary``.

    Args:
        operator: Who rejoins it (audit log).
        justification: Why now (audit log).
        old_primary: The fenced old primary's name in the clusters file.
        new_primary: The promoted primary's name there; the rejoined one streams from it.
        slot: Its replication slot on the new primary (default: the standby slot setting).
    """
    timings: dict[Rejoin, dict[str, float]] = {}
    subject = f"WeDefiDaily rejoin {old_primary} as a standby of {new_primary}"
    details = {"old_primary": old_primary, "new_primary": new_primary}
    audit_id = attempt_scoped_uuid("rejoin-audit")
    with timed() as timings[Rejoin.CHECK_REQUEST]:
        request = steps.check_request(old_primary, new_primary, slot, operator, justification)
    audit_recovery_started(
        audit_id=audit_id,
        recovery_type="rejoin",
        backup_id=None,
        target=f"rejoin: cluster {old_primary} as a standby of cluster {new_primary}",
        operator=operator,
        justification=justification,
    )
    with (
        failure_reported(
            subject,
            details,
            close_audit=lambda error: audit_recovery_finished(audit_id, "failed", error=error),
        ),
        run_lock("rejoin", old_primary),
    ):
        with timed() as timings[Rejoin.KEEP_WAL]:
            kept = steps.keep_wal(request)
        with timed() as timings[Rejoin.REWIND]:
            rewound = steps.rewind(request)
        with timed() as timings[Rejoin.CONFIGURE]:
            steps.configure(request, rewound)
        with timed() as timings[Rejoin.VERIFY_STREAMING]:
            status = steps.start_and_verify(request)
        with timed() as timings[Rejoin.CLUSTERS_FILE]:
            roles = steps.update_clusters_file(request, operator, justification)
    audit_recovery_finished(
        audit_id, "success", error=rewound["fallback"] or roles["operator_action"]
    )
    if rewound["method"] == "pg_rewind":
        rewind = rewound["diverged"] or "no rewind required"
    else:
        rewind = "replaced by a fresh pg_basebackup"
    result = {
        "rejoined": old_primary,
        "new_primary": new_primary,
        "method": rewound["method"],
        "fallback": rewound["fallback"],
        "diverged": rewound.get("diverged"),
        "rewind": rewind,
        "wal_kept": kept,
        "new_timeline_wal": rewound.get("wal"),
        "slot": request["slot"],
        "state": status["state"],
        "lag_bytes": status["lag_bytes"],
        "clusters_file": roles,
        "timings": {step.value: round(t["seconds"], 3) for step, t in timings.items()},
        "finished_at": datetime.now(UTC).isoformat(),
    }
    send_notification(
        f"{subject}: {status['state']} ({rewound['method']})",
        "success" if not roles["operator_action"] else "failure",
        {**details, "method": rewound["method"], "fallback": rewound["fallback"]},
    )
    create_markdown_artifact(
        key="rejoin-report",
        markdown=(
            f"# Rejoin {old_primary} → standby of {new_primary}\n\n| | |\n|---|---|\n"
            f"| method | {rewound['method']} |\n"
            f"| fallback | {rewound['fallback'] or 'none'} |\n"
            f"| rewind | {rewind} |\n"
            f"| WAL kept | pushed {len(kept['pushed'])}, copied aside "
            f"{len(kept['copied_aside'])} to {kept['aside']} |\n"
            f"| streaming | {status['state']} on slot {request['slot']}, lag "
            f"{status['lag_bytes']} bytes |\n"
            f"| clusters file | {roles['operator_action'] or ', '.join(roles['changes'])} |\n"
        ),
        description=f"rejoin {old_primary}",
    )
    return result
