"""Runbook: the monitor (every minute).

collect (standbys and their lag, slots' retained WAL, the archiver, catalog ages, the
recoverable window, the DR copy's lag, the last DR tests, runs left open) → publish the
metrics → without Prometheus (``WEDEFI_DR_ALERTING=direct``): evaluate the alerts and page
each change once (trigger, resolve). With Prometheus, its rules (deployments/prometheus/)
do the evaluating and Alertmanager the paging.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks import monitor as steps
from wedefi_dr.config import get_settings


@flow(name="monitor", log_prints=True)
def monitor() -> dict[str, Any]:
    """One round; returns where the metrics went and, in direct mode, what was paged."""
    snapshot = steps.collect()
    result: dict[str, Any] = {"published": steps.publish_metrics(snapshot), "firing": []}
    if get_settings().alerting == "direct":
        firing = steps.evaluate_alerts(snapshot)
        result["firing"] = [a["name"] for a in firing]
        result.update(steps.page_changes(firing))
    return result
