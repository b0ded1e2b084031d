"""Drills: damage a restored copy on purpose, or fail a step once, to rehearse the DR test.

The damage is what a bad restore would do (rows lost, a foreign key broken, a day of
prices missing), so a drill shows that the suites name each kind. It runs only against
the DR environment's database, never the source.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from wedefi_dr.config import Settings
from wedefi_dr.drtest.environments import DATABASE_MARKER, is_marked_database
from wedefi_dr.errors import DRError, InvalidInput
from wedefi_dr.postgres.tools import connect

DAMAGE_KINDS = ("delete_wallets", "orphan_balance", "remove_price_day")


class DrillFault(DRError):
    """A fault injected on purpose (settings dr_drill_fault_*), to rehearse a retry."""


def check_damage(damage: list[str] | None) -> list[str]:
    """The requested damage, refused before anything is created when a kind is unknown."""
    unknown = sorted(set(damage or []) - set(DAMAGE_KINDS))
    if unknown:
        raise InvalidInput(f"unknown drill damage {unknown}: choose from {DAMAGE_KINDS}")
    return list(damage or [])


def damage_copy(admin_dsn: str, manifest: dict[str, Any], damage: list[str]) -> list[str]:
    """Apply ``damage`` to the restored copy at ``admin_dsn``; returns what was done."""
    done = []
    with connect(admin_dsn) as conn, conn.cursor() as cur:
        if not is_marked_database(cur):
            raise InvalidInput(
                "refusing to damage a database the DR test did not create (it carries no "
                f"{DATABASE_MARKER!r} comment); nothing was changed"
            )
        if "delete_wallets" in damage:
            cur.execute(
                'DELETE FROM "Wallet" WHERE "id" IN '
                '(SELECT "id" FROM "Wallet" ORDER BY "id" LIMIT 3)'
            )
            done.append(f"deleted {cur.rowcount} wallets (their balances cascade)")
        if "orphan_balance" in damage:
            # Triggers (and so foreign keys) off for this transaction, as a broken load would.
            cur.execute("SET LOCAL session_replication_role = replica")
            cur.execute(
                """UPDATE "TokenBalance" SET "walletId" = 'wallet-that-does-not-exist'
                   WHERE "id" = (SELECT "id" FROM "TokenBalance" ORDER BY "id" LIMIT 1)"""
            )
            done.append(f"orphaned {cur.rowcount} balance")
        if "remove_price_day" in damage:
            as_of = datetime.fromisoformat(manifest["integrity_facts"]["as_of"])
            cur.execute(
                """DELETE FROM "PriceSnapshot" WHERE "recordedAt" >= %s AND "recordedAt" < %s""",
                (as_of - timedelta(days=3), as_of - timedelta(days=2)),
            )
            done.append(f"removed the price day 3 days before the backup ({cur.rowcount} rows)")
    return done


def fault_once(settings: Settings, step: str) -> None:
    """Fail ``step`` once: while the marker file exists, and remove it on the way."""
    marker = settings.dr_drill_fault_marker
    if settings.dr_drill_fault_step == step and marker and Path(marker).exists():
        Path(marker).unlink()
        raise DrillFault(f"drill: injected fault in step {step!r} (happens once)")
