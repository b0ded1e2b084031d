"""How old the stored copies are: newest backup of each kind, the recoverable window, and
how far the DR region's copy trails the primary region's.

Read from the object store itself (the catalog has no index to drift), so these ages say
what a restore could use *now*, not what the runs believe they wrote.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime

from botocore.exceptions import BotoCoreError, ClientError

from wedefi_dr.catalog import listing
from wedefi_dr.config import Settings
from wedefi_dr.physical.basebackup import list_base_backups
from wedefi_dr.physical.pitr.window import recoverable_window
from wedefi_dr.storage.repository import Repository, dr_copy, open_store


@dataclass
class CatalogState:
    """Unix times (None: nothing there)."""

    newest_logical: float | None
    newest_logical_id: str | None
    newest_base: float | None
    newest_base_id: str | None
    window_start: float | None
    window_end: float | None
    newest_wal: str | None
    primary_newest_object: float | None
    dr_newest_object: float | None
    # False for a repository without a DR copy (posix): then there is no lag to report.
    has_dr_copy: bool = True

    @property
    def sync_lag_seconds(self) -> float | None:
        """How much newer the primary's newest object is than the DR copy's newest: 0 when
        in step, the primary's whole history when the DR bucket holds nothing."""
        if self.primary_newest_object is None or not self.has_dr_copy:
            return None
        return max(0.0, self.primary_newest_object - (self.dr_newest_object or 0.0))

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "sync_lag_seconds": self.sync_lag_seconds}


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def newest_object(store: Repository) -> float | None:
    """``LastModified`` of the newest object under the prefix (None: empty or no bucket)."""
    newest = None
    try:
        for obj in store.list_keys(store.key("")):
            t = obj["LastModified"].timestamp()
            newest = t if newest is None else max(newest, t)
    except (ClientError, BotoCoreError):
        return None
    return newest


def catalog_state(settings: Settings) -> CatalogState:
    store = open_store(settings)
    logical = listing.list_backups(store)
    base = list_base_backups(store)
    window = recoverable_window(settings)
    earliest = window.earliest
    return CatalogState(
        newest_logical=_ts(logical[-1].finished_at) if logical else None,
        newest_logical_id=logical[-1].backup_id if logical else None,
        newest_base=_ts(base[-1].finished_at) if base else None,
        newest_base_id=base[-1].backup_id if base else None,
        window_start=_ts(earliest.finished_at) if earliest else None,
        window_end=_ts(window.newest_wal_time) if earliest else None,
        newest_wal=window.newest_wal,
        primary_newest_object=newest_object(store),
        dr_newest_object=newest_object(dr) if (dr := dr_copy(settings)) else None,
        has_dr_copy=dr is not None,
    )
