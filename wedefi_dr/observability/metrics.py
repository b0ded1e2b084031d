"""Prometheus metrics: one way to publish them, ``prometheus_client``.

Every publish builds its own :class:`CollectorRegistry` from values computed for that
publish, then pushes it to the Pushgateway (``settings.pushgateway_url``) and/or writes it
as a textfile (``settings.metrics_dir``, for node_exporter's textfile collector).

Counters survive because they are not kept in process memory: a flow run is a short-lived
process, so every ``*_total`` is the count of rows in the audit log (the durable record),
published whole each time. A push replaces its *group* only, and each job pushes under a
grouping key of job, kind and database (``wedefi_dr_backup/kind=logical/database=wedefi``),
so a base backup's push never overwrites — and so can never hide — the logical backup's
series, and a restarted worker publishes the same totals it would have published before.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, push_to_gateway, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wedefi_dr.config import Settings

JOB_PREFIX = "wedefi_dr_"


class MetricSet(Collector):
    """Values computed once for one publish, as metric families (one family per name)."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}

    def _family(self, cls: type, name: str, doc: str, labels: Mapping[str, str]) -> Metric:
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = cls(name, doc, labels=list(labels))
        return family

    def gauge(self, name: str, doc: str, value: float, **labels: str) -> None:
        self._family(GaugeMetricFamily, name, doc, labels).add_metric(
            list(labels.values()), float(value)
        )

    def counter(self, name: str, doc: str, value: float, **labels: str) -> None:
        """``name`` without ``_total``: prometheus_client exposes it as ``<name>_total``."""
        self._family(CounterMetricFamily, name, doc, labels).add_metric(
            list(labels.values()), float(value)
        )

    def collect(self) -> Iterator[Metric]:
        yield from self.families.values()

    def registry(self) -> CollectorRegistry:
        registry = CollectorRegistry()
        registry.register(self)
        return registry


def backup_registry(
    *,
    kind: str,
    database: str,
    totals: Mapping[str, float],
    duration_seconds: float | None,
    size_bytes: int | None,
) -> CollectorRegistry:
    """A backup job's metrics; ``totals`` from :func:`records.backup_totals` (the audit log).

    ``backup_last_failure_timestamp_seconds`` newer than the last success is what
    BackupFailed fires on: it stays firing until a backup of the same kind and database
    succeeds, however many hours pass, and resolves at that success.
    """
    labels = {"kind": kind, "database": database}
    m = MetricSet()
    m.counter(
        "backup_success", "Backups that completed with a manifest.", totals["success"], **labels
    )
    m.counter("backup_failure", "Backups that failed.", totals["failure"], **labels)
    m.gauge(
        "backup_last_success_timestamp_seconds",
        "Unix time the newest successful backup ended (0: never).",
        totals["last_success"],
        **labels,
    )
    m.gauge(
        "backup_last_failure_timestamp_seconds",
        "Unix time the newest failed backup ended (0: never).",
        totals["last_failure"],
        **labels,
    )
    if duration_seconds is not None:
        m.gauge(
            "backup_duration_seconds",
            "Duration of the last good backup.",
            duration_seconds,
            **labels,
        )
    if size_bytes is not None:
        m.gauge("backup_size_bytes", "Stored size of the last good backup.", size_bytes, **labels)
    return m.registry()


def publish(
    settings: Settings,
    job: str,
    registry: CollectorRegistry,
    grouping: Mapping[str, str] | None = None,
    textfile: str | None = None,
) -> list[str]:
    """Push and/or write ``registry`` as job ``wedefi_dr_<job>`` with ``grouping`` (labels
    that name the group a push replaces); the textfile is ``wedefi_dr_<textfile>.prom``
    (default: the job's name), one per group on a host. Returns where the metrics went."""
    grouping = dict(grouping or {})
    targets = []
    if settings.metrics_dir:
        directory = Path(settings.metrics_dir)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{JOB_PREFIX}{textfile or job}.prom"
        write_to_textfile(str(path), registry)
        targets.append(str(path))
    if settings.pushgateway_url:
        push_to_gateway(
            settings.pushgateway_url,
            job=JOB_PREFIX + job,
            registry=registry,
            grouping_key=grouping,
            timeout=10,
        )
        targets.append(settings.pushgateway_url)
    return targets
