"""The monitor runbook's steps as Prefect tasks: collect, publish, and (without Prometheus)
evaluate the alerts and page once per change."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from tasks import timeouts
from tasks.common import retry_transient
from wedefi_dr.config import get_settings
from wedefi_dr.observability import alerts, health, metrics
from wedefi_dr.runbook import Monitor

# The monitor runs every minute: a step that cannot answer within this is itself news.
STEP_TIMEOUT = 60.0


@task(
    name=Monitor.COLLECT,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
    timeout_seconds=STEP_TIMEOUT,
)
def collect() -> dict[str, Any]:
    """A snapshot of the primary, the catalog and the audit log (plain data: it pickles)."""
    return health.collect(get_settings()).as_dict()


@task(
    name=Monitor.PUBLISH_METRICS,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
    timeout_seconds=timeouts.SHORT,
)
def publish_metrics(snapshot: dict[str, Any]) -> list[str]:
    h = health.from_dict(snapshot)
    return metrics.publish(
        get_settings(), "monitor", health.monitor_registry(h), {"database": h.database}
    )


@task(name=Monitor.EVALUATE_ALERTS, timeout_seconds=STEP_TIMEOUT)
def evaluate_alerts(snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    return [a.as_dict() for a in alerts.evaluate(health.from_dict(snapshot), get_settings())]


@task(
    name=Monitor.PAGE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
    timeout_seconds=timeouts.SHORT,
)
def page_changes(firing: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Trigger what newly fires, resolve what stopped, each once (see alerts.dispatch)."""
    result = alerts.dispatch(get_settings(), [alerts.Alert.from_dict(a) for a in firing])
    get_run_logger().info(
        "alerts: %d firing, %d triggered, %d resolved",
        len(firing),
        len(result["triggered"]),
        len(result["resolved"]),
    )
    return result
