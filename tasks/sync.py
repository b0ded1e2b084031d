"""The sync and archive-tier steps as Prefect tasks."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks import timeouts
from tasks.common import retry_transient
from wedefi_dr.config import get_settings
from wedefi_dr.lifecycle import glacier, sync
from wedefi_dr.runbook import ArchiveTier, Sync


# A refusal (the mass-deletion guard) is an answer, not a hiccup: never retried. A failed
# copy is: the copies already made stay, and the retry copies only the rest.
@task(
    name=Sync.COPY,
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=retry_transient,
    timeout_seconds=timeouts.SYNC,
)
def copy_to_dr(dry_run: bool) -> dict[str, Any]:
    return sync.sync(get_settings(), dry_run=dry_run)


@task(
    name=ArchiveTier.ARCHIVE,
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=retry_transient,
    timeout_seconds=timeouts.SYNC,
)
def archive_newest(backup_id: str) -> dict[str, Any]:
    return glacier.archive_backup(get_settings(), backup_id)
