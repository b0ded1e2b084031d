"""The DR benchmark: the app's fixed query workload on the primary and on the DR copy.

Each query of :data:`wedefi_dr.drtest.smoke.APP_QUERIES` runs once to warm up and then
``iterations`` times on each side, interleaved (primary, DR, primary, ...) so that a burst
of load on a shared host hits both sides alike. Reported per query: p50 and p95 in
milliseconds on each side and the ratio of the p50s; a ratio above ``max_ratio`` flags
the query (the DR copy would serve the app that much slower after a failover).
Read-only on both sides; timings are reported, never asserted.
"""

from __future__ import annotations

import time
from typing import Any

from wedefi_dr.drtest.smoke import APP_QUERIES
from wedefi_dr.observability.stats import percentile
from wedefi_dr.postgres.tools import connect


def _timed(cur: Any, query: str) -> float:
    t0 = time.perf_counter()
    cur.execute(query)
    cur.fetchall()
    return (time.perf_counter() - t0) * 1000


def run_benchmark(
    primary_dsn: str, dr_dsn: str, *, iterations: int, max_ratio: float
) -> dict[str, Any]:
    rows = []
    with (
        connect(primary_dsn, application_name="wedefi-dr bench") as primary,
        connect(dr_dsn, application_name="wedefi-dr bench") as dr,
        primary.cursor() as pcur,
        dr.cursor() as dcur,
    ):
        for cur in (pcur, dcur):
            cur.execute("SET default_transaction_read_only = on")
        for query in APP_QUERIES:
            _timed(pcur, query.sql), _timed(dcur, query.sql)  # warm-up, not measured
            on_primary, on_dr = [], []
            for _ in range(iterations):
                on_primary.append(_timed(pcur, query.sql))
                on_dr.append(_timed(dcur, query.sql))
            p50p, p50d = percentile(on_primary, 50), percentile(on_dr, 50)
            ratio = p50d / p50p if p50p > 0 else float("inf")
            rows.append(
                {
                    "query": query.name,
                    "primary_p50_ms": round(p50p, 3),
                    "primary_p95_ms": round(percentile(on_primary, 95), 3),
                    "dr_p50_ms": round(p50d, 3),
                    "dr_p95_ms": round(percentile(on_dr, 95), 3),
                    "ratio": round(ratio, 3),
                    "flagged": ratio > max_ratio,
                }
            )
    return {
        "iterations": iterations,
        "max_ratio": max_ratio,
        "queries": rows,
        "flagged": [r["query"] for r in rows if r["flagged"]],
    }
