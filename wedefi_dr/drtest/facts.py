"""What the source held at backup time: the thresholds of the integrity suites.

A restored copy can only be judged against what its source held *in the dump's own
snapshot*; figures read later from a live primary have moved on, and figures read from the
restored copy itself would prove nothing. So the backup calls :func:`collect` on its
snapshot connection (the REPEATABLE READ transaction whose snapshot ``pg_dump --snapshot``
reads) and stores the result in the manifest as ``integrity_facts``.

The facts are computed with the very SQL assets the suites validate
(``expectations/sql/*.sql``), so a definition (what a "day", a "wallet with balances" is)
cannot drift between the two sides. Plain psycopg2: the backup path never imports
Great Expectations.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from psycopg2 import sql
from psycopg2.extensions import connection

from wedefi_dr.config import PROJECT_ROOT
from wedefi_dr.postgres.timestamps import naive_utc

FACTS_VERSION = 1
EXPECTATIONS_DIR: Path = PROJECT_ROOT / "expectations"
SQL_DIR: Path = EXPECTATIONS_DIR / "sql"
# "Within rounding": a cent, or the float precision of a sum GX reads back, if larger.
USD_ABS_TOLERANCE = Decimal("0.01")
USD_REL_TOLERANCE = Decimal("1e-12")


def asset_sql(name: str) -> str:
    """The text of ``expectations/sql/<name>.sql`` (trusted: versioned with the suites)."""
    return (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")


def render_asset(conn: connection, name: str, as_of: datetime) -> str:
    """The asset's SQL with ``%(as_of)s`` bound by psycopg2 (a literal, never pasted text)."""
    return conn.cursor().mogrify(asset_sql(name), {"as_of": naive_utc(as_of)}).decode()


def _one(cur: Any, query: sql.Composable) -> tuple:
    cur.execute(query)
    return cur.fetchone()


def collect(conn: connection, as_of: datetime | None = None) -> dict[str, Any]:
    """The source facts the three suites compare a restored copy with.

    Runs inside the caller's transaction: on the backup's snapshot connection it describes
    exactly what the dump holds. ``as_of`` defaults to the transaction's start time.
    """
    with conn.cursor() as cur:
        if as_of is None:
            cur.execute("SELECT now() AT TIME ZONE 'UTC'")
            as_of = cur.fetchone()[0]
        as_of = naive_utc(as_of)
        rendered = {n: render_asset(conn, n, as_of) for n in ("portfolio_balances", "price_days")}
        rendered["alerts"] = render_asset(conn, "alerts", as_of)

        wallets, funded, total_usd, orphans = _one(
            cur,
            sql.SQL(
                "SELECT count(DISTINCT wallet_id), count(DISTINCT funded_wallet_id), "
                "coalesce(sum(usd_value), 0), count(*) FILTER (WHERE balance_id IS NOT NULL "
                "AND (wallet_id IS NULL OR token_id IS NULL)) FROM ({}) s"
            ).format(sql.SQL(rendered["portfolio_balances"])),
        )
        cur.execute(
            sql.SQL(
                "SELECT day_index, day_start, snapshots, tokens_tracked, day_summary "
                "FROM ({}) s ORDER BY day_index"
            ).format(sql.SQL(rendered["price_days"]))
        )
        days = [
            {
                "day_index": i,
                "day_start": start.isoformat(),
                "snapshots": n,
                "tokens_tracked": tokens,
                "day_summary": summary,
            }
            for i, start, n, tokens, summary in cur.fetchall()
        ]
        cur.execute(
            sql.SQL(
                "SELECT last_24h_count, count(*) FROM ({}) s WHERE last_24h_count IS NOT NULL "
                "GROUP BY 1 ORDER BY 1"
            ).format(sql.SQL(rendered["alerts"]))
        )
        last_24h = [label for label, _ in cur.fetchall()]
        (alerts_total,) = _one(cur, sql.SQL('SELECT count(*) FROM "Alert"'))
    return {
        "facts_version": FACTS_VERSION,
        "as_of": as_of.isoformat(),
        "portfolio": {
            "wallet_count": int(wallets),
            "wallets_with_balances": int(funded),
            "total_usd": str(total_usd),
            "orphan_balances": int(orphans),
        },
        "price_days": days,
        "alerts": {"total": int(alerts_total), "last_24h_counts": last_24h},
    }


REQUIRED_TABLES: tuple[str, ...] = ("Wallet", "Token", "TokenBalance", "PriceSnapshot", "Alert")


def collect_if_present(conn: connection) -> dict[str, Any] | None:
    """:func:`collect` for a WeDefiDaily database; None for any other (the product backs up
    any PostgreSQL database, and the suites only describe this schema)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
            " AND tablename = ANY(%s)",
            (list(REQUIRED_TABLES),),
        )
        if cur.fetchone()[0] < len(REQUIRED_TABLES):
            return None
    return collect(conn)


def suite_parameters(facts: dict[str, Any]) -> dict[str, Any]:
    """The suites' ``$PARAMETER`` values, derived from a manifest's facts."""
    if facts.get("facts_version") != FACTS_VERSION:
        raise ValueError(
            f"integrity facts version {facts.get('facts_version')!r} is not {FACTS_VERSION}"
        )
    total = Decimal(facts["portfolio"]["total_usd"])
    tolerance = max(USD_ABS_TOLERANCE, abs(total) * USD_REL_TOLERANCE)
    days = facts["price_days"]
    return {
        "wallet_count": facts["portfolio"]["wallet_count"],
        "wallets_with_balances": facts["portfolio"]["wallets_with_balances"],
        "total_usd_min": float(total - tolerance),
        "total_usd_max": float(total + tolerance),
        "min_tokens_tracked_per_day": min(d["tokens_tracked"] for d in days),
        "price_day_summaries": [d["day_summary"] for d in days],
        "alert_counts_last_24h": list(facts["alerts"]["last_24h_counts"]),
    }
