"""What the backup lifecycle keeps: pure functions of the catalog and the run's moment.

Logical backups follow grandfather-father-son: the newest verified backup of each of the
last N days, M ISO weeks and K months (counted back from the run's moment, which is the
newest period), and always the newest ``min_verified`` verified ones, whatever their age.
A backup is *verified* when its manifest is authentic and its object is stored at the
manifest's size; one that is not never fills a slot, so a damaged backup cannot displace a
good one.

Base backups and WAL are kept for the PITR window: every base backup that finished inside
it, and the newest one that finished before it (recovery to the window's first moment
starts from that one). WAL goes only when it lies before the start segment of the oldest
kept base backup, on any timeline; ``.history`` files are always kept, since a kept
backup's timeline may descend from any of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

from wedefi_dr.physical.walnames import segment_number

SEGMENT_HEX = 24


@dataclass(frozen=True)
class Logical:
    backup_id: str
    finished_at: datetime
    verified: bool


@dataclass(frozen=True)
class Base:
    backup_id: str
    finished_at: datetime
    start_wal_file: str


@dataclass
class Selection:
    """``keep`` and ``delete`` map a name to why; every candidate is in exactly one."""

    keep: dict[str, str]
    delete: dict[str, str]


def _months_back(day: date, count: int) -> list[tuple[int, int]]:
    y, m = day.year, day.month
    out = []
    for _ in range(count):
        out.append((y, m))
        y, m = (y, m - 1) if m > 1 else (y - 1, 12)
    return out


def select_logical(
    backups: list[Logical],
    now: datetime,
    *,
    daily: int,
    weekly: int,
    monthly: int,
    min_verified: int,
) -> Selection:
    """GFS over ``backups`` as of ``now``: what stays (and which slot keeps it)."""
    today = now.date()
    days = {today - timedelta(days=i) for i in range(daily)}
    weeks = {(today - timedelta(weeks=i)).isocalendar()[:2] for i in range(weekly)}
    months = set(_months_back(today, monthly))
    reasons: dict[str, list[str]] = {}
    good = sorted((b for b in backups if b.verified), key=lambda b: (b.finished_at, b.backup_id))

    def newest_per(period, allowed, label) -> None:  # noqa: ANN001 - a small key function
        chosen: dict[object, Logical] = {}
        for b in good:
            key = period(b.finished_at)
            if key in allowed:
                chosen[key] = b  # ascending: the last one is the newest of the period
        for key, b in chosen.items():
            reasons.setdefault(b.backup_id, []).append(label(key))

    newest_per(lambda t: t.date(), days, lambda d: f"daily {d:%Y-%m-%d}")
    newest_per(lambda t: t.date().isocalendar()[:2], weeks, lambda w: f"weekly {w[0]}-W{w[1]:02d}")
    newest_per(lambda t: (t.year, t.month), months, lambda m: f"monthly {m[0]}-{m[1]:02d}")
    for b in good[-min_verified:]:
        reasons.setdefault(b.backup_id, []).append(f"one of the {min_verified} newest verified")
    for b in backups:
        if b.finished_at > now:
            reasons.setdefault(b.backup_id, []).append("finished after the run's moment")
    keep = {bid: ", ".join(r) for bid, r in reasons.items()}
    delete = {}
    for b in backups:
        if b.backup_id in keep:
            continue
        delete[b.backup_id] = (
            f"outside every GFS slot ({daily} daily, {weekly} weekly, {monthly} monthly)"
            if b.verified
            else "not verified (object missing or not at its size) and in no slot"
        )
    return Selection(keep=keep, delete=delete)


def select_physical(
    bases: list[Base],
    wal_names: list[str],
    now: datetime,
    *,
    window: timedelta,
    segment_bytes: int,
) -> tuple[Selection, Selection]:
    """(base backups, WAL files) kept and deleted for a PITR window of ``window``."""
    start = now - window
    ordered = sorted(bases, key=lambda b: (b.finished_at, b.backup_id))
    keep: dict[str, str] = {}
    for b in ordered:
        if b.finished_at >= start:
            keep[b.backup_id] = "finished inside the PITR window"
    before = [b for b in ordered if b.finished_at < start]
    if before:
        keep[before[-1].backup_id] = (
            "the newest base backup before the PITR window: recovery to its start needs it"
        )
    base_delete = {
        b.backup_id: f"finished before the PITR window ({window.days} days) and superseded"
        for b in ordered
        if b.backup_id not in keep
    }
    bases_kept = Selection(keep=keep, delete=base_delete)
    if not keep:
        return bases_kept, Selection(
            keep=dict.fromkeys(wal_names, "no base backup: all WAL kept"), delete={}
        )
    oldest = min((b for b in ordered if b.backup_id in keep), key=lambda b: b.finished_at)
    first = segment_number(oldest.start_wal_file, segment_bytes)
    wal_keep: dict[str, str] = {}
    wal_delete: dict[str, str] = {}
    for name in wal_names:
        if name.endswith(".history"):
            wal_keep[name] = "timeline history: always kept"
        elif len(name) >= SEGMENT_HEX and segment_number(name, segment_bytes) < first:
            wal_delete[name] = (
                f"before {oldest.start_wal_file}, where the oldest kept base backup "
                f"({oldest.backup_id}) starts"
            )
        else:
            wal_keep[name] = f"needed from {oldest.backup_id} on"
    return bases_kept, Selection(keep=wal_keep, delete=wal_delete)
