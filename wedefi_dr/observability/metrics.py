"""Prometheus metrics for the plan's alerts (BackupFailed, BackupAge, ...).

Counters are derived from the audit log rather than kept in process memory: a flow run
is a short-lived process, and the audit log is the durable record of every success and
failure, so ``backup_success_total`` is right after any restart. Each job writes its own
textfile (for node_exporter's textfile collector) and/or pushes to a Pushgateway.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, push_to_gateway, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wedefi_dr.config import Settings


class _Values(Collector):
    """Exposes fixed values: counters and gauges computed once for this push."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def _gauge(name: str, doc: str, value: float, labels: dict[str, str]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels))
    g.add_metric(list(labels.values()), value)
    return g


def _counter(name: str, doc: str, value: float, labels: dict[str, str]) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=list(labels))
    c.add_metric(list(labels.values()), value)
    return c


def backup_registry(
    *,
    kind: str,
    database: str,
    totals: dict[str, float],
    duration_seconds: float | None,
    size_bytes: int | None,
) -> CollectorRegistry:
    """The backup job's metrics; ``totals`` comes from :func:`audit.backup_counts`."""
    labels = {"database": database, "kind": kind}
    families: list[Metric] = [
        _counter(
            "backup_success", "Backups that completed with a manifest.", totals["success"], labels
        ),
        _counter("backup_failure", "Backups that failed.", totals["failure"], labels),
        _gauge(
            "backup_last_success_timestamp_seconds",
            "Unix time of the newest successful backup.",
            totals["last_success"],
            labels,
        ),
    ]
    if duration_seconds is not None:
        families.append(
            _gauge(
                "backup_duration_seconds",
                "Duration of the last backup run.",
                duration_seconds,
                labels,
            )
        )
    if size_bytes is not None:
        families.append(
            _gauge("backup_size_bytes", "Stored size of the last good backup.", size_bytes, labels)
        )
    registry = CollectorRegistry()
    registry.register(_Values(families))
    return registry


def publish(settings: Settings, job: str, registry: CollectorRegistry) -> list[str]:
    """Write the textfile and/or push; returns where the metrics went."""
    targets = []
    if settings.metrics_dir:
        directory = Path(settings.metrics_dir)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"wedefi_dr_{job}.prom"
        write_to_textfile(str(path), registry)
        targets.append(str(path))
    if settings.pushgateway_url:
        push_to_gateway(settings.pushgateway_url, job=f"wedefi_dr_{job}", registry=registry)
        targets.append(settings.pushgateway_url)
    return targets
