"""``wedefi-dr status`` in data: the primary it reached (and, after a failover, which
cluster the setting was followed from), the newest backups and their ages, the recoverable
window, the archive, the DR copy's lag, the last DR test and its RTO, and what alerts fire.

Firing alerts come from Alertmanager's API when ``alertmanager_url`` is set (what pages
are open), otherwise from the same evaluation the monitor flow runs without Prometheus.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from wedefi_dr.config import Settings
from wedefi_dr.errors import ServerUnreachable
from wedefi_dr.observability import alerts, health
from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.postgres.primary import current_primary


def _age(now: float, then: float | None) -> float | None:
    return None if not then else now - then


def alertmanager_alerts(url: str) -> list[dict[str, Any]]:
    """Active (not silenced, not inhibited) alerts from Alertmanager's API v2."""
    try:
        response = httpx.get(
            url.rstrip("/") + "/api/v2/alerts",
            params={"active": "true", "silenced": "false", "inhibited": "false"},
            timeout=10,
        )
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise ServerUnreachable(
            f"Alertmanager at {url} did not answer ({type(exc).__name__})"
        ) from None
    return [
        {
            "name": a["labels"].get("alertname", ""),
            "severity": a["labels"].get("severity", ""),
            "summary": a.get("annotations", {}).get("summary", ""),
            "labels": {k: v for k, v in a["labels"].items() if k not in ("alertname", "severity")},
        }
        for a in response.json()
    ]


def published_value(settings: Settings, name: str, **labels: str) -> float | None:
    """A value a run published (the DR test's ``rto_seconds``), read back from the
    Pushgateway or the textfiles, wherever the metrics go."""
    texts: list[str] = []
    if settings.pushgateway_url:
        with contextlib.suppress(httpx.HTTPError):  # then the textfiles, or no figure
            texts.append(
                httpx.get(settings.pushgateway_url.rstrip("/") + "/metrics", timeout=10).text
            )
    if settings.metrics_dir and Path(settings.metrics_dir).is_dir():
        texts.extend(p.read_text() for p in sorted(Path(settings.metrics_dir).glob("*.prom")))
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
    return None


def status(settings: Settings) -> dict[str, Any]:
    h = health.collect(settings)
    now, c, a = h.collected_at, h.catalog, h.server.archiver
    if settings.alertmanager_url:
        firing, source = alertmanager_alerts(settings.alertmanager_url), "alertmanager"
    else:
        firing, source = [x.as_dict() for x in alerts.evaluate(h, settings)], "direct evaluation"
    rto = published_value(settings, "rto_seconds", database=h.database)
    primary = current_primary(settings)
    return {
        "database": h.database,
        "collected_at": now,
        "primary": {
            "location": ConnTarget.parse(primary.dsn, allow_password=True).location,
            "cluster": primary.cluster,
            "followed_from": primary.followed_from,
            "in_recovery": h.server.in_recovery,
        },
        "backups": {
            "logical": {
                "newest": c.newest_logical_id,
                "finished_at": c.newest_logical,
                "age_seconds": _age(now, c.newest_logical),
                "last_run_failed": h.backups["logical"]["last_failure"]
                > h.backups["logical"]["last_success"],
            },
            "base": {
                "newest": c.newest_base_id,
                "finished_at": c.newest_base,
                "age_seconds": _age(now, c.newest_base),
                "last_run_failed": h.backups["base"]["last_failure"]
                > h.backups["base"]["last_success"],
            },
            "wal": {
                "newest": a.last_archived_wal,
                "finished_at": a.last_archived_time,
                "age_seconds": _age(now, a.last_archived_time),
                "last_run_failed": a.failing,
            },
        },
        "recoverable_window": {"from": c.window_start, "to": c.window_end},
        "archive": {
            "mode": a.archive_mode,
            "failing": a.failing,
            "failed_count": a.failed_count,
            "ready_segments": a.ready_segments,
            "oldest_ready_age_seconds": _age(now, a.oldest_ready_time),
            "rpo_seconds": h.rpo_seconds,
        },
        "sync_lag_seconds": c.sync_lag_seconds,
        "standbys": [s.__dict__ for s in h.server.standbys],
        "dr_test": {
            "status": h.dr_test.last_status,
            "started_at": h.dr_test.last_started,
            "took_seconds": h.dr_test.last_seconds,
            "rto_seconds": rto if rto is not None and rto >= 0 else None,
            "rto_objective_seconds": settings.dr_rto_objective_seconds,
            "last_passed_age_seconds": _age(now, h.dr_test.last_success),
        },
        "stale_running": h.stale_running,
        "alerts": {"source": source, "firing": firing},
    }
