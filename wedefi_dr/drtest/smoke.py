"""Smoke tests: the queries the WeDefiDaily app depends on, run as the application role.

A restored copy that passes the integrity suites can still be useless to the app: a
missing grant, a role that does not exist, a query the planner cannot serve. So each
query here is one the app runs (portfolio totals per wallet, latest price per token, open
alerts, digest history), run with the app role's privileges, and checked for its shape
(column names and Python types) and for a non-empty result. The same queries are the
benchmark's fixed workload (:mod:`wedefi_dr.drtest.querybench`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from psycopg2 import sql

from wedefi_dr.postgres.tools import connect


@dataclass(frozen=True)
class AppQuery:
    name: str
    sql: str
    columns: tuple[tuple[str, type], ...]  # expected (name, Python type); None allowed


APP_QUERIES: tuple[AppQuery, ...] = (
    AppQuery(
        "portfolio totals per wallet",
        """SELECT w."id" AS wallet_id, w."address", sum(tb."usdValue") AS total_usd,
                  count(tb."id") AS positions
           FROM "Wallet" w JOIN "TokenBalance" tb ON tb."walletId" = w."id"
           GROUP BY w."id", w."address"
           ORDER BY total_usd DESC NULLS LAST LIMIT 50""",
        (("wallet_id", str), ("address", str), ("total_usd", Decimal), ("positions", int)),
    ),
    AppQuery(
        "latest price per token",
        """SELECT t."id" AS token_id, t."symbol", p."priceUsd" AS price_usd,
                  p."recordedAt" AS recorded_at
           FROM "Token" t
           CROSS JOIN LATERAL (
               SELECT ps."priceUsd", ps."recordedAt" FROM "PriceSnapshot" ps
               WHERE ps."tokenId" = t."id" ORDER BY ps."recordedAt" DESC LIMIT 1
           ) p
           ORDER BY t."symbol"
        """,
        (("token_id", str), ("symbol", str), ("price_usd", Decimal), ("recorded_at", datetime)),
    ),
    AppQuery(
        "open alerts",
        """SELECT a."id" AS alert_id, a."severity", a."title", a."triggerAt" AS trigger_at
           FROM "Alert" a WHERE a."status" IN ('pending', 'dispatched')
           ORDER BY a."triggerAt" DESC LIMIT 100""",
        (("alert_id", str), ("severity", str), ("title", str), ("trigger_at", datetime)),
    ),
    AppQuery(
        "digest history",
        """SELECT d."id" AS digest_id, d."generatedAt" AS generated_at,
                  d."walletsTracked" AS wallets_tracked, d."portfolioTotal" AS portfolio_total,
                  count(s."id") AS wallet_snapshots
           FROM "DigestRun" d LEFT JOIN "WalletBalanceSnapshot" s ON s."digestRunId" = d."id"
           GROUP BY d."id" ORDER BY d."generatedAt" DESC LIMIT 30""",
        (
            ("digest_id", str),
            ("generated_at", datetime),
            ("wallets_tracked", int),
            ("portfolio_total", Decimal),
            ("wallet_snapshots", int),
        ),
    ),
)


def _check(query: AppQuery, description: Any, rows: list[tuple]) -> list[str]:
    problems = []
    names = tuple(col.name for col in description)
    expected = tuple(name for name, _ in query.columns)
    if names != expected:
        problems.append(f"columns {names}, expected {expected}")
        return problems
    if not rows:
        problems.append("no rows")
    for row in rows[:20]:
        for (name, kind), value in zip(query.columns, row, strict=True):
            if value is not None and not isinstance(value, kind):
                problems.append(f"{name} is {type(value).__name__}, expected {kind.__name__}")
                return problems
    return problems


def run_smoke_tests(app_dsn: str | None, admin_dsn: str, app_role: str) -> dict[str, Any]:
    """Run every app query as ``app_role``; returns per-query rows, shape problems, time.

    With ``app_dsn`` the role logs in itself; without it (a DR server where only an admin
    DSN is known) the admin connection does ``SET ROLE``, which applies the same privileges.
    """
    results = []
    with (
        connect(app_dsn or admin_dsn, application_name="wedefi-dr smoke") as conn,
        conn.cursor() as cur,
    ):
        if not app_dsn:
            cur.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(app_role)))
        cur.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user")
        user, is_super = cur.fetchone()
        identity = (
            []
            if user == app_role and not is_super
            else [
                f"connected as {user} (superuser {is_super}), not the application role {app_role}"
            ]
        )
        for query in APP_QUERIES:
            t0 = time.monotonic()
            try:
                cur.execute(query.sql)
                rows = cur.fetchall()
                problems = identity + _check(query, cur.description, rows)
            except Exception as exc:  # a missing grant or table: the finding, not a crash
                conn.rollback()
                if not app_dsn:
                    cur.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(app_role)))
                rows, problems = [], [f"{type(exc).__name__}: {str(exc).strip()[:300]}"]
            results.append(
                {
                    "query": query.name,
                    "rows": len(rows),
                    "ms": round((time.monotonic() - t0) * 1000, 2),
                    "success": not problems,
                    "problems": problems,
                }
            )
    return {
        "success": all(r["success"] for r in results),
        "role": app_role,
        "queries": results,
    }
