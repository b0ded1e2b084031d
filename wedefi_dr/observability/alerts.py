"""The alerts, evaluated here for deployments without Prometheus (``alerting=direct``).

The same conditions as ``deployments/prometheus/rules.yml`` (same names, severities and
thresholds; the rules file is what Prometheus evaluates, this is what the monitor flow
evaluates itself). Each alert has a stable dedup key — its name and labels — and the state
file remembers what was paged, so a firing alert pages once and resolves once, however
often the monitor runs.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wedefi_dr.config import Settings
from wedefi_dr.observability import notify
from wedefi_dr.observability.health import BACKUP_KINDS, Health, backup_label

DAY = 86400.0


@dataclass(frozen=True)
class Alert:
    name: str
    severity: str
    summary: str
    labels: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def dedup_key(self) -> str:
        """``wedefi-dr/BackupFailed/database=wedefi,kind=logical,severity=critical``."""
        parts = {**self.labels, "severity": self.severity}
        return f"wedefi-dr/{self.name}/" + ",".join(f"{k}={v}" for k, v in sorted(parts.items()))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "dedup_key": self.dedup_key}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alert:
        return cls(d["name"], d["severity"], d["summary"], dict(d["labels"]))


def _age(now: float, then: float | None) -> float:
    return now - (then or 0.0)


def evaluate(h: Health, settings: Settings) -> list[Alert]:
    """Every alert that fires for this snapshot, in rules-file order."""
    now, db = h.collected_at, h.database
    fired: list[Alert] = []
    for kind in BACKUP_KINDS:
        t = h.backups[kind]
        labels = {"database": backup_label(kind, db), "kind": kind}
        if t["last_failure"] > t["last_success"]:
            fired.append(
                Alert("BackupFailed", "critical", f"the last {kind} backup of {db} failed", labels)
            )
    for kind in BACKUP_KINDS:
        age = _age(now, h.backups[kind]["last_success"] or None)
        if age > settings.backup_max_age_seconds:
            fired.append(
                Alert(
                    "BackupAge",
                    "critical",
                    f"no successful {kind} backup of {db} for {age / 3600:.1f} h",
                    {"database": backup_label(kind, db), "kind": kind},
                )
            )
    for s in h.server.standbys:
        if s.lag_bytes is None:
            continue
        severity = (
            "critical"
            if s.lag_bytes > settings.replication_lag_critical_bytes
            else "warning"
            if s.lag_bytes > settings.replication_lag_warning_bytes
            else None
        )
        if severity:
            fired.append(
                Alert(
                    "ReplicationLagHigh",
                    severity,
                    f"standby {s.name} is {s.lag_bytes / 2**20:.0f} MiB behind",
                    {"database": db, "standby": s.name},
                )
            )
    a = h.server.archiver
    if a.oldest_ready_time is not None and now - a.oldest_ready_time > h.rpo_seconds:
        fired.append(
            Alert(
                "WALArchiveStale",
                "critical",
                f"WAL waits {now - a.oldest_ready_time:.0f} s for the archive "
                f"(RPO {h.rpo_seconds:.0f} s, {a.ready_segments} segments)",
                {"database": db},
            )
        )
    if a.failing:
        fired.append(
            Alert(
                "WALArchiveFailing",
                "critical",
                f"archive_command is failing on {db}'s server ({a.failed_count} failures)",
                {"database": db},
            )
        )
    if _age(now, h.dr_test.last_success or None) > settings.dr_test_max_age_days * DAY:
        fired.append(
            Alert(
                "DRTestStale",
                "warning",
                f"no passed DR test of {db} in {settings.dr_test_max_age_days:.0f} days",
                {"database": db},
            )
        )
    if h.dr_test.last_failure > h.dr_test.last_success:
        fired.append(
            Alert("DRTestFailed", "critical", f"the last DR test of {db} failed", {"database": db})
        )
    lag = h.catalog.sync_lag_seconds
    if lag is not None and lag > settings.sync_max_lag_seconds:
        fired.append(
            Alert(
                "SyncBehind",
                "warning",
                f"the DR copy trails the primary bucket by {lag / 3600:.1f} h",
                {"database": db},
            )
        )
    for table, count in h.stale_running.items():
        if count:
            fired.append(
                Alert(
                    "RunLeftRunning",
                    "warning",
                    f"{count} rows of {table} still 'running' after any timeout",
                    {"database": db, "log": table},
                )
            )
    return fired


def state_path(settings: Settings) -> Path:
    return Path(settings.alert_state_file or settings.spool_path / "wedefi_dr_alerts.json")


def load_state(path: Path) -> dict[str, dict[str, Any]]:
    """What was paged and not yet resolved, by dedup key (empty when never written)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def save_state(path: Path, state: dict[str, dict[str, Any]]) -> None:
    """Atomically: a monitor killed mid-write never forgets what it paged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def changes(
    paged: dict[str, dict[str, Any]], firing: list[Alert]
) -> tuple[list[Alert], list[dict[str, Any]]]:
    """(alerts to trigger: firing and not paged yet, pages to resolve: paged, no longer firing)."""
    now_firing = {a.dedup_key: a for a in firing}
    new = [a for key, a in now_firing.items() if key not in paged]
    resolved = [p for key, p in paged.items() if key not in now_firing]
    return new, resolved


def dispatch(settings: Settings, firing: list[Alert]) -> dict[str, list[str]]:
    """Page what newly fires and resolve what stopped, each once. A page is recorded in the
    state file only after PagerDuty (or, without a routing key, the console and SNS) took
    it, one at a time: a send that fails is tried again on the next evaluation, and what
    was sent is never sent twice."""
    path = state_path(settings)
    paged = load_state(path)
    new, resolved = changes(paged, firing)
    for alert in new:
        notify.page(
            settings,
            "trigger",
            alert.dedup_key,
            summary=f"{alert.name}: {alert.summary}",
            severity=alert.severity,
            details={"alertname": alert.name, **alert.labels},
        )
        notify.notify(
            settings,
            subject=f"ALERT {alert.name}",
            status="failure",
            details={"summary": alert.summary, "dedup_key": alert.dedup_key, **alert.labels},
        )
        paged[alert.dedup_key] = alert.as_dict()
        save_state(path, paged)
    for previous in resolved:
        notify.page(
            settings,
            "resolve",
            previous["dedup_key"],
            summary=f"{previous['name']} resolved",
            severity=previous["severity"],
            details={"alertname": previous["name"], **previous["labels"]},
        )
        notify.notify(
            settings,
            subject=f"RESOLVED {previous['name']}",
            status="success",
            details={"dedup_key": previous["dedup_key"], **previous["labels"]},
        )
        paged.pop(previous["dedup_key"])
        save_state(path, paged)
    return {"triggered": [a.dedup_key for a in new], "resolved": [p["dedup_key"] for p in resolved]}
