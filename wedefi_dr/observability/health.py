"""The monitor's view of the whole system in one snapshot, and the metrics it publishes.

The snapshot holds everything an alert or ``wedefi-dr status`` needs: the server's copies
(:mod:`pgstats`), the stored copies (:mod:`catalog_ages`) and the durable record
(:mod:`records`). The monitor publishes only what no run reports by itself; the backup and
DR-test runs publish their own results when they finish.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from wedefi_dr.config import Settings
from wedefi_dr.observability import records
from wedefi_dr.observability.catalog_ages import CatalogState, catalog_state
from wedefi_dr.observability.metrics import MetricSet
from wedefi_dr.observability.pgstats import Archiver, ServerState, Slot, Standby, server_state
from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.postgres.primary import primary_dsn

BACKUP_KINDS = ("logical", "base")
# The database label of base backups (flow ``base-backup``): a base backup copies the whole
# cluster, not one database.
CLUSTER_LABEL = "cluster"


def backup_label(kind: str, database: str) -> str:
    return CLUSTER_LABEL if kind == "base" else database


def database_label(settings: Settings) -> str:
    """The protected database's name as every metric labels it (from the DSN, so a run
    that failed before reaching the server is labelled like the runs that succeeded)."""
    dsn = settings.primary_dsn.get_secret_value()
    if not dsn:
        return "unknown"
    return ConnTarget.parse(dsn, allow_password=True).dbname or "unknown"


def stale_after_seconds(settings: Settings) -> float:
    """A ``running`` audit row older than the longest step's timeout belongs to a dead run."""
    return float(
        max(
            settings.dump_timeout_seconds,
            settings.restore_timeout_seconds,
            settings.base_backup_timeout_seconds,
            settings.retention_timeout_seconds,
            settings.pitr_replay_timeout_seconds,
        )
        + 3600
    )


@dataclass
class Health:
    collected_at: float
    database: str
    rpo_seconds: float
    server: ServerState
    catalog: CatalogState
    backups: dict[str, dict[str, float]]
    dr_test: records.DRTestRecord
    stale_running: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "collected_at": self.collected_at,
            "database": self.database,
            "rpo_seconds": self.rpo_seconds,
            "server": self.server.as_dict(),
            "catalog": self.catalog.as_dict(),
            "backups": self.backups,
            "dr_test": self.dr_test.as_dict(),
            "stale_running": self.stale_running,
        }


def collect(settings: Settings) -> Health:
    """Read the primary, the object store and the ops database (read-only, a few queries)."""
    settings.require("primary_dsn", "ops_dsn")
    ops = settings.ops_dsn.get_secret_value()
    return Health(
        collected_at=time.time(),
        database=database_label(settings),
        rpo_seconds=settings.rpo_seconds,
        server=server_state(primary_dsn(settings)),
        catalog=catalog_state(settings),
        backups={kind: records.backup_totals(ops, kind) for kind in BACKUP_KINDS},
        dr_test=records.dr_tests(ops),
        stale_running=records.stale_running(ops, stale_after_seconds(settings)),
    )


def monitor_registry(h: Health) -> CollectorRegistry:
    """What the monitor publishes (job ``wedefi_dr_monitor``, grouped by database)."""
    db = {"database": h.database}
    m = MetricSet()
    m.gauge(
        "monitor_last_run_timestamp_seconds",
        "When the monitor last collected.",
        h.collected_at,
        **db,
    )
    for s in h.server.standbys:
        m.gauge(
            "replication_standby_streaming",
            "1 while the standby's walsender is streaming.",
            1 if s.state == "streaming" else 0,
            standby=s.name,
            **db,
        )
        if s.lag_bytes is not None:
            m.gauge(
                "replication_lag_bytes",
                "WAL the standby has not replayed: pg_current_wal_lsn() - replay_lsn.",
                s.lag_bytes,
                standby=s.name,
                **db,
            )
    for slot in h.server.slots:
        m.gauge(
            "replication_slot_active",
            "1 while a client uses the slot.",
            slot.active,
            slot=slot.name,
            **db,
        )
        if slot.retained_bytes is not None:
            m.gauge(
                "replication_slot_retained_wal_bytes",
                "WAL the server keeps for the slot (pg_current_wal_lsn() - restart_lsn).",
                slot.retained_bytes,
                slot=slot.name,
                **db,
            )
    a = h.server.archiver
    m.gauge(
        "wal_archive_last_archived_timestamp_seconds",
        "When archive_command last succeeded (pg_stat_archiver; 0: never).",
        a.last_archived_time or 0,
        **db,
    )
    m.gauge(
        "wal_archive_last_failed_timestamp_seconds",
        "When archive_command last failed (pg_stat_archiver; 0: never).",
        a.last_failed_time or 0,
        **db,
    )
    m.counter(
        "wal_archive_archived", "Segments archived since the stats reset.", a.archived_count, **db
    )
    m.counter(
        "wal_archive_failed",
        "archive_command failures since the stats reset.",
        a.failed_count,
        **db,
    )
    m.gauge(
        "wal_archive_ready_segments",
        "Complete segments waiting to be archived.",
        a.ready_segments,
        **db,
    )
    if a.oldest_ready_time is not None:
        m.gauge(
            "wal_archive_oldest_ready_timestamp_seconds",
            "Since when the oldest segment waits for archiving (absent: none waits).",
            a.oldest_ready_time,
            **db,
        )
    m.gauge(
        "wal_archive_rpo_seconds", "The recovery point objective (setting).", h.rpo_seconds, **db
    )
    if a.last_archived_time is not None:
        m.gauge(
            "backup_last_success_timestamp_seconds",
            "Unix time the newest successful backup ended (for WAL: the last archived segment).",
            a.last_archived_time,
            kind="wal",
            **db,
        )
    c = h.catalog
    for kind, newest in (("logical", c.newest_logical), ("base", c.newest_base)):
        if newest is not None:
            m.gauge(
                "backup_catalog_newest_timestamp_seconds",
                "When the newest backup in the catalog (with an authentic manifest) ended.",
                newest,
                kind=kind,
                **db,
            )
    if c.window_start is not None and c.window_end is not None:
        m.gauge(
            "pitr_window_start_timestamp_seconds",
            "Earliest point a recovery can reach (end of the earliest base backup).",
            c.window_start,
            **db,
        )
        m.gauge(
            "pitr_window_end_timestamp_seconds",
            "Latest point a recovery can reach (the newest archived WAL).",
            c.window_end,
            **db,
        )
    if c.sync_lag_seconds is not None:
        m.gauge(
            "dr_sync_lag_seconds",
            "How much newer the primary bucket's newest object is than the DR bucket's.",
            c.sync_lag_seconds,
            **db,
        )
    m.gauge(
        "recovery_test_last_success_timestamp_seconds",
        "When the newest passed DR test ended (0: never).",
        h.dr_test.last_success,
        **db,
    )
    m.gauge(
        "recovery_test_last_failure_timestamp_seconds",
        "When the newest failed DR test ended (0: never).",
        h.dr_test.last_failure,
        **db,
    )
    for table, count in h.stale_running.items():
        m.gauge(
            "audit_stale_running_runs",
            "Audit rows still 'running' long after any step's timeout (a dead run).",
            count,
            log=table,
            **db,
        )
    return m.registry()


def from_dict(d: dict[str, Any]) -> Health:
    """The snapshot back from :meth:`Health.as_dict` (how it travels between tasks)."""
    server = d["server"]
    archiver = {k: v for k, v in server["archiver"].items() if k != "failing"}
    catalog = {k: v for k, v in d["catalog"].items() if k != "sync_lag_seconds"}
    return Health(
        collected_at=d["collected_at"],
        database=d["database"],
        rpo_seconds=d["rpo_seconds"],
        server=ServerState(
            in_recovery=server["in_recovery"],
            standbys=[Standby(**s) for s in server["standbys"]],
            slots=[Slot(**s) for s in server["slots"]],
            archiver=Archiver(**archiver),
        ),
        catalog=CatalogState(**catalog),
        backups=d["backups"],
        dr_test=records.DRTestRecord(**d["dr_test"]),
        stale_running=d["stale_running"],
    )
