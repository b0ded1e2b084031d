"""The recoverable window (earliest base-backup end → newest archived WAL) and the choice
of the base backup a recovery starts from; a target outside the window is refused here,
before anything is changed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from wedefi_dr.config import Settings
from wedefi_dr.errors import InvalidInput
from wedefi_dr.physical import wal
from wedefi_dr.physical.basebackup import BaseBackupManifest, list_base_backups
from wedefi_dr.physical.pitr.target import RecoveryTarget
from wedefi_dr.physical.walnames import int_to_lsn, lsn_to_int, segment_end_lsn
from wedefi_dr.storage.repository import open_store


class TargetOutsideWindow(InvalidInput):
    """The recovery target is not covered by base backups plus archived WAL."""


@dataclass
class Window:
    base_backups: list[BaseBackupManifest]
    newest_wal: str | None
    newest_wal_time: datetime | None
    wal_objects: int
    newest_wal_end: int | None = None  # LSN (as int) where the highest archived segment ends
    history_files: frozenset[str] = frozenset()

    @property
    def earliest(self) -> BaseBackupManifest | None:
        return self.base_backups[0] if self.base_backups else None

    def describe(self) -> dict[str, Any]:
        e = self.earliest
        return {
            "from": e.finished_at.isoformat() if e else None,
            "from_base_backup": e.backup_id if e else None,
            "from_lsn": e.stop_lsn if e else None,
            "to": self.newest_wal_time.isoformat() if self.newest_wal_time else None,
            "to_wal": self.newest_wal,
            "base_backups": len(self.base_backups),
            "wal_objects": self.wal_objects,
        }


def recoverable_window(settings: Settings) -> Window:
    """Earliest base-backup end → newest archived WAL segment (its upload time)."""
    store = open_store(settings)
    backups = list_base_backups(store)
    newest: tuple | None = None
    count = 0
    end: int | None = None
    histories: set[str] = set()
    for obj in store.list_keys(wal.archive_prefix(settings) + "/"):
        name = obj["Key"].rsplit("/", 1)[-1]
        count += 1
        if name.endswith(".history"):
            histories.add(name)
        is_segment = wal.SEGMENT_RE.match(name[:24]) and not name.endswith(".backup")
        if is_segment and (newest is None or (obj["LastModified"], name) > newest):
            newest = (obj["LastModified"], name)
        if is_segment:
            seg_end = segment_end_lsn(name[:24], settings.wal_segment_bytes)
            end = seg_end if end is None else max(end, seg_end)
    if newest is None:
        return Window(backups, None, None, count, None, frozenset(histories))
    # S3 keeps LastModified to the second: the upload ended before the next second, and
    # every commit in the segment before its upload.
    return Window(
        backups, newest[1], newest[0] + timedelta(seconds=1), count, end, frozenset(histories)
    )


def check_timeline(target: RecoveryTarget, window: Window, base: BaseBackupManifest) -> None:
    """A numeric timeline must exist: the base backup's own, or one whose ``.history`` file
    is archived (the server would otherwise fail only after replay started)."""
    if not target.timeline.isdigit():
        return
    tli = int(target.timeline)
    if tli != base.timeline and f"{tli:08X}.history" not in window.history_files:
        raise TargetOutsideWindow(
            f"timeline {tli} is neither the base backup's ({base.timeline}) nor archived "
            f"({tli:08X}.history is not in the archive); nothing was changed"
        )


def choose_base_backup(target: RecoveryTarget, window: Window) -> BaseBackupManifest:
    """The newest base backup that ends before the target; refuse if there is none.

    A named restore point has no time or LSN to compare before replay, so it starts from
    the earliest base backup (always correct, possibly a longer replay). Whether the name
    exists is known only to the WAL: a misspelt name replays the whole archive and then
    fails (on production, the rollback then puts the old cluster back). Searching the
    archived WAL with ``pg_waldump`` first would mean downloading and decrypting all of
    it before approval, so it is not done.
    """
    if not window.base_backups:
        raise TargetOutsideWindow("no base backups in the archive: run 'wedefi-dr base-backup'")
    earliest = window.base_backups[0]
    if target.kind == "time":
        t = target.time
        assert t is not None
        usable = [b for b in window.base_backups if b.finished_at <= t]
        if not usable:
            raise TargetOutsideWindow(
                f"target time {t.isoformat()} is before the earliest base backup "
                f"({earliest.backup_id}, consistent at {earliest.finished_at.isoformat()}): "
                "nothing to recover from; nothing was changed"
            )
        if window.newest_wal_time is None or t > window.newest_wal_time:
            raise TargetOutsideWindow(
                f"target time {t.isoformat()} is after the newest archived WAL "
                f"({window.newest_wal} at {window.newest_wal_time}): the archive cannot "
                "reach it; nothing was changed"
            )
        return usable[-1]
    if target.kind == "lsn":
        lsn = lsn_to_int(target.value)
        usable = [b for b in window.base_backups if lsn_to_int(b.stop_lsn) <= lsn]
        if not usable:
            raise TargetOutsideWindow(
                f"target LSN {target.value} is before the end of the earliest base backup "
                f"({earliest.backup_id}, {earliest.stop_lsn}); nothing was changed"
            )
        if window.newest_wal_end is None or lsn > window.newest_wal_end:
            reach = int_to_lsn(window.newest_wal_end) if window.newest_wal_end else "nothing"
            raise TargetOutsideWindow(
                f"target LSN {target.value} is beyond the newest archived WAL "
                f"({window.newest_wal}, which ends at {reach}): the archive cannot reach it; "
                "nothing was changed"
            )
        return usable[-1]
    if target.kind == "name":
        return earliest
    return window.base_backups[-1]
