"""Runbook: provision a streaming standby of the primary (Tier 1 hot standby).

1. check the request: both clusters described, the standby's directory empty, the
   primary running, the slot name valid
2. ``pg_basebackup -R -X stream -S <slot> -C`` onto the standby's cluster handle; its
   archive env written for the day it is promoted; started
3. verify it streams: ``pg_stat_replication`` on the primary says ``streaming`` for the
   slot, ``pg_is_in_recovery()`` on the standby; the lag in bytes reported and published
   (``replication_lag_bytes``)

Each step is a task named by ``wedefi_dr.runbook.Standby``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from tasks import standby as steps
from tasks.common import run_lock
from wedefi_dr.runbook import Standby, timed


@flow(name="standby", log_prints=True)
def provision_standby(
    primary: str = "primary", standby: str = "standby", slot: str | None = None
) -> dict[str, Any]:
    """Make cluster ``standby`` (clusters file) a streaming standby of ``primary``."""
    timings: dict[Standby, dict[str, float]] = {}
    with timed() as timings[Standby.CHECK_REQUEST]:
        request = steps.check_request(primary, standby, slot)
    with run_lock("standby", request["standby"]["name"]):
        with timed() as timings[Standby.PROVISION]:
            provisioned = steps.provision(request)
        with timed() as timings[Standby.VERIFY_STREAMING]:
            status = steps.verify_streaming(request)
    result = {
        "primary": primary,
        "standby": standby,
        "port": request["standby"]["port"],
        **provisioned,
        **status,
        "timings": {step.value: round(t["seconds"], 3) for step, t in timings.items()},
    }
    create_markdown_artifact(
        key="standby-report",
        markdown=(
            f"# Standby {standby} of {primary}\n\n"
            f"| | |\n|---|---|\n| state | {status['state']} ({status['sync_state']}) |\n"
            f"| slot | {provisioned['slot']} |\n| replayed | {status['replay_lsn']} |\n"
            f"| lag | {status['lag_bytes']} bytes |\n"
        ),
        description=f"standby {standby}",
    )
    return result
