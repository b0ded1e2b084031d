"""The checks a retention run passes before its first batch.

Retention is the one job of this system that destroys data on purpose, so a mistake in
its input must not become a mass deletion:

- The moment the cutoffs count from is never in the future (beyond a small clock-skew
  allowance): ``as_of=2099-01-01`` would make every row "old".
- A run that would remove more than a table's ``max_share`` (by its rule or by
  cascade), or any row of a Tier 1 rule, stops unless the request allows a mass
  deletion explicitly. The weekly run removes a week's worth; anything much larger is a
  wrong moment, a broken policy or a first run that an operator should start knowingly.
- Nothing is removed without a verified logical backup of the same database that
  finished recently: authentic manifest, object present at its size. What retention
  removes can then still be restored.

Plain functions (no Prefect): the flow's guard task and the tests call them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from psycopg2 import sql

from wedefi_dr.catalog.listing import list_backups
from wedefi_dr.catalog.manifest import BackupManifest
from wedefi_dr.errors import DRError, InvalidInput
from wedefi_dr.postgres.timestamps import naive_utc
from wedefi_dr.postgres.tools import connect
from wedefi_dr.retention.batches import TablePreview
from wedefi_dr.retention.policy import APPLICATION_NAME, TablePlan
from wedefi_dr.storage.repository import Repository

CLOCK_SKEW = timedelta(minutes=5)
"""How far ``as_of`` may lie ahead of this machine's clock (hosts' clocks differ a bit)."""


class FutureMoment(InvalidInput):
    """``as_of`` lies in the future: every cutoff would move forward with it."""


class MassDeletionRefused(InvalidInput):
    """The run would remove more than the policy allows without an explicit request."""


class NoRecentBackup(DRError):
    """No verified logical backup of the database is recent enough to remove rows."""


def check_moment(as_of: datetime | None, now: datetime | None = None) -> datetime:
    """``as_of`` (default: now) as naive UTC; FutureMoment when it is ahead of ``now``
    by more than :data:`CLOCK_SKEW`."""
    now = naive_utc(now)
    moment = naive_utc(as_of) if as_of is not None else now
    if moment > now + CLOCK_SKEW:
        raise FutureMoment(
            f"as_of {moment:%Y-%m-%d %H:%M:%S} UTC is in the future (now is "
            f"{now:%Y-%m-%d %H:%M:%S} UTC): cutoffs count back from as_of, so a future "
            "moment would treat recent rows as old; nothing was changed"
        )
    return moment


def table_sizes(dsn: str, tables: Iterable[str]) -> dict[str, int]:
    """Exact row counts (read-only): a share of an estimate could let a table be emptied."""
    out: dict[str, int] = {}
    with connect(dsn, application_name=APPLICATION_NAME) as conn, conn.cursor() as cur:
        for table in dict.fromkeys(tables):
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
            out[table] = cur.fetchone()[0]
    return out


def removals(preview: list[TablePreview]) -> dict[str, int]:
    """Rows each table loses in the whole run, by its own rule and by cascades (the
    preview counts each row once, in policy order, so these add up)."""
    out: dict[str, int] = {}
    for p in preview:
        out[p.table] = out.get(p.table, 0) + p.rows
        for child, n in p.cascaded.items():
            out[child] = out.get(child, 0) + n
    return out


def _limits(plans: list[TablePlan]) -> dict[str, float]:
    """A table's ``max_share``: its own rule's, else the strictest of the rules that
    cascade into it."""
    own = {p.table: p.max_share for p in plans}
    out = dict(own)
    for p in plans:
        for child in p.cascaded_tables:
            if child not in own:
                out[child] = min(out.get(child, p.max_share), p.max_share)
    return out


def mass_deletions(
    plans: list[TablePlan], preview: list[TablePreview], sizes: dict[str, int]
) -> list[str]:
    """What makes this run a mass deletion, one line per table (empty: it is not)."""
    problems = []
    by_table = {p.table: p for p in plans}
    for item in preview:
        plan = by_table[item.table]
        reached = item.rows + sum(item.cascaded.values())
        if plan.rule.tier == 1 and reached:
            problems.append(
                f"{item.table} is Tier 1: the run would remove {item.rows:,} of its rows"
                + (f" and {reached - item.rows:,} by cascade" if reached > item.rows else "")
            )
    limits = _limits(plans)
    for table, gone in removals(preview).items():
        total = sizes.get(table, 0)
        if total and gone / total > limits[table]:
            problems.append(
                f"{table}: {gone:,} of {total:,} rows ({gone / total:.0%}) is more than "
                f"max_share {limits[table]:.0%}"
            )
    return problems


def refuse_mass_deletion(problems: list[str]) -> None:
    """MassDeletionRefused naming every table over its limit (from :func:`mass_deletions`)."""
    if problems:
        raise MassDeletionRefused(
            "retention refused before its first batch (nothing was changed): this run is a "
            "mass deletion:\n  - " + "\n  - ".join(problems) + "\ncheck as_of and the "
            "policy; if it is meant, run again with --allow-mass-deletion "
            "(flow parameter allow_mass_deletion=true)"
        )


@dataclass(frozen=True)
class VerifiedBackup:
    """The backup that makes this run's removals recoverable."""

    backup_id: str
    finished_at: datetime
    age_hours: float


def recent_backup(
    store: Repository, dbname: str, within_hours: float, now: datetime | None = None
) -> VerifiedBackup:
    """The newest logical backup of ``dbname`` that finished within ``within_hours`` and
    whose object is stored at its manifest's size; NoRecentBackup saying what was found.

    The catalog lists only authentic manifests, so a planted manifest cannot pass.
    """
    now = naive_utc(now)
    oldest = now - timedelta(hours=within_hours)
    seen: list[str] = []
    for manifest in reversed(list_backups(store)):
        if manifest.source.dbname != dbname:
            continue
        finished = naive_utc(manifest.finished_at)
        if finished < oldest:
            seen.append(f"newest is {manifest.backup_id}, {_hours(now, finished):.1f} h old")
            break
        if _stored(store, manifest):
            return VerifiedBackup(manifest.backup_id, finished, _hours(now, finished))
        seen.append(f"{manifest.backup_id}: object missing or not at its size")
    raise NoRecentBackup(
        f"retention refused before its first batch (nothing was changed): no verified "
        f"logical backup of database {dbname!r} finished in the last {within_hours:g} h "
        f"in {store.url(store.key('logical'))}/ ({'; '.join(seen) or 'none found'}); "
        "take one with 'wedefi-dr backup' first"
    )


def _hours(now: datetime, then: datetime) -> float:
    return (now - then).total_seconds() / 3600


def _stored(store: Repository, manifest: BackupManifest) -> bool:
    if manifest.object.bucket != store.bucket:
        return False
    head = store.head(manifest.object.key)
    return head is not None and head["ContentLength"] == manifest.object.size_bytes
