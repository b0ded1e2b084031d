"""What the primary server says about its copies: standbys, slots, the WAL archiver.

No run reports these by itself: a standby falls behind, a slot pins WAL until the disk
fills, and an ``archive_command`` that keeps failing shows only in the server log — while
every base backup and logical backup still succeeds. The monitor reads them here.

Works on any primary: without standbys ``pg_stat_replication`` has no rows (no lag series),
without slots no slot series; on a server in recovery the WAL position queries are skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from wedefi_dr.postgres.tools import connect


@dataclass
class Standby:
    """One walsender: its standby's ``application_name``, state and replay lag in bytes
    (``pg_current_wal_lsn() - replay_lsn``; None until the standby has replayed anything)."""

    name: str
    state: str
    sync_state: str
    lag_bytes: int | None


@dataclass
class Slot:
    name: str
    slot_type: str
    active: bool
    retained_bytes: int | None  # WAL the server keeps for it (None: never reserved)


@dataclass
class Archiver:
    """``pg_stat_archiver`` plus ``archive_mode``; times are Unix seconds (None: never)."""

    archive_mode: str
    archived_count: int
    last_archived_wal: str | None
    last_archived_time: float | None
    failed_count: int
    last_failed_wal: str | None
    last_failed_time: float | None
    stats_reset: float | None
    # Segments complete and waiting for archive_command (``.ready``), and since when the
    # oldest waits: the live RPO exposure (an idle server archives nothing and is fine).
    ready_segments: int = 0
    oldest_ready_time: float | None = None

    @property
    def failing(self) -> bool:
        """The newest attempt failed: a failure after the last success (or no success)."""
        if self.last_failed_time is None:
            return False
        return self.last_archived_time is None or self.last_failed_time > self.last_archived_time

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "failing": self.failing}


@dataclass
class ServerState:
    in_recovery: bool
    standbys: list[Standby]
    slots: list[Slot]
    archiver: Archiver

    def as_dict(self) -> dict[str, object]:
        return {
            "in_recovery": self.in_recovery,
            "standbys": [asdict(s) for s in self.standbys],
            "slots": [asdict(s) for s in self.slots],
            "archiver": self.archiver.as_dict(),
        }


def _epoch(value: object) -> float | None:
    return float(value) if value is not None else None


def server_state(dsn: str) -> ServerState:
    """One short read-only session on the primary (needs ``pg_monitor`` or superuser)."""
    with connect(dsn, application_name="wedefi-dr-monitor") as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery()")
        in_recovery = bool(cur.fetchone()[0])
        standbys: list[Standby] = []
        slots: list[Slot] = []
        if not in_recovery:
            cur.execute(
                """SELECT coalesce(application_name, ''), coalesce(state, ''),
                          coalesce(sync_state, ''),
                          pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint
                   FROM pg_stat_replication ORDER BY application_name"""
            )
            standbys = [
                Standby(name=n, state=s, sync_state=ss, lag_bytes=None if lag is None else int(lag))
                for n, s, ss, lag in cur.fetchall()
            ]
            cur.execute(
                """SELECT slot_name, slot_type, active,
                          pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint
                   FROM pg_replication_slots ORDER BY slot_name"""
            )
            slots = [
                Slot(
                    name=n,
                    slot_type=t,
                    active=bool(a),
                    retained_bytes=None if r is None else int(r),
                )
                for n, t, a, r in cur.fetchall()
            ]
        cur.execute(
            """SELECT current_setting('archive_mode'), archived_count, last_archived_wal,
                      extract(epoch FROM last_archived_time), failed_count, last_failed_wal,
                      extract(epoch FROM last_failed_time), extract(epoch FROM stats_reset)
               FROM pg_stat_archiver"""
        )
        mode, n_ok, last_wal, last_t, n_failed, failed_wal, failed_t, reset = cur.fetchone()
        cur.execute(
            """SELECT count(*), extract(epoch FROM min(modification))
               FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'"""
        )
        ready, oldest_ready = cur.fetchone()
    archiver = Archiver(
        archive_mode=mode,
        archived_count=int(n_ok),
        last_archived_wal=last_wal,
        last_archived_time=_epoch(last_t),
        failed_count=int(n_failed),
        last_failed_wal=failed_wal,
        last_failed_time=_epoch(failed_t),
        stats_reset=_epoch(reset),
        ready_segments=int(ready),
        oldest_ready_time=_epoch(oldest_ready),
    )
    return ServerState(in_recovery, standbys, slots, archiver)
