"""The backup lifecycle's steps as Prefect tasks (flow ``backup-retention``)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from prefect import task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType

from tasks import timeouts
from wedefi_dr.config import get_settings
from wedefi_dr.lifecycle import expire, product_records
from wedefi_dr.runbook import BackupRetention

FINAL = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]


@task(name=BackupRetention.SELECT, timeout_seconds=timeouts.LIFECYCLE)
def select(as_of: datetime) -> dict[str, Any]:
    return expire.plan(get_settings(), as_of)


@task(name=BackupRetention.PRUNE, timeout_seconds=timeouts.LIFECYCLE)
def prune(plan: dict[str, Any], operator: str, run_id: str) -> dict[str, Any]:
    return expire.prune(get_settings(), plan, operator=operator, run_id=run_id)


def _old_runs(client: Any, before: datetime) -> list[Any]:
    """Finished flow runs that started before ``before`` (never a running or paused one)."""
    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            start_time=FlowRunFilterStartTime(before_=before),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=FINAL)),
        ),
        limit=200,
    )


@task(name=BackupRetention.PRUNE_RECORDS, timeout_seconds=timeouts.LIFECYCLE)
def prune_records(as_of: datetime, dry_run: bool, operator: str) -> dict[str, Any]:
    """Reports, spool files and kept DR environments past their class, and the Prefect run
    history older than ``records_log_days`` (in pages, so a long history is bounded)."""
    settings = get_settings()
    plan = product_records.plan_records(settings, as_of)
    before = as_of - timedelta(days=settings.records_log_days)
    runs = 0
    with get_client(sync_client=True) as client:
        page = _old_runs(client, before)
        if dry_run:
            runs = len(page)
        else:
            while page:
                for run in page:
                    client.delete_flow_run(run.id)
                    runs += 1
                page = _old_runs(client, before)
    summary: dict[str, Any] = {"plan": plan, "flow_runs": runs, "dry_run": dry_run}
    if not dry_run:
        summary["done"] = product_records.prune_records(
            settings, plan, expire.lifecycle_store(settings), operator=operator
        )
    return summary
