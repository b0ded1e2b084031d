"""``wedefi-dr status``: one screen for the on-call engineer (``--json`` for scripts)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from wedefi_dr_cli.common import EXIT_FAILED, out, print_json, ready


def _when(ts: float | None) -> str:
    return f"{datetime.fromtimestamp(ts, UTC):%Y-%m-%d %H:%M:%S}" if ts else "never"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def status(
    as_json: Annotated[bool, typer.Option("--json", help="the full record on stdout")] = False,
) -> None:
    """Newest backups and their ages, the recoverable window, the archive, sync lag, the
    last DR test and its RTO, firing alerts (exit 1 while any alert fires)."""
    settings = ready(settings=("primary_dsn", "ops_dsn"), servers=("primary_dsn", "ops_dsn"))
    from wedefi_dr.observability.status import status as collect_status

    record = collect_status(settings)
    if as_json:
        print_json(record)
    else:
        render(record)
    if record["alerts"]["firing"]:
        raise typer.Exit(EXIT_FAILED)


def render(r: dict[str, Any]) -> None:
    table = Table("what", "newest", "when (UTC)", "age", "state", title=f"database {r['database']}")
    p = r["primary"]
    followed = f" (WEDEFI_DR_PRIMARY_DSN names {p['followed_from']})" if p["followed_from"] else ""
    table.add_row(
        "primary",
        f"{p['cluster'] or ''} {p['location']}{followed}".strip(),
        "",
        "",
        "[red]in recovery: not a primary[/red]" if p["in_recovery"] else "ok",
    )
    for kind, b in r["backups"].items():
        table.add_row(
            f"{kind} backup",
            b["newest"] or "-",
            _when(b["finished_at"]),
            _age(b["age_seconds"]),
            "[red]last run failed[/red]" if b["last_run_failed"] else "ok",
        )
    w = r["recoverable_window"]
    table.add_row("recoverable window", "", f"{_when(w['from'])} → {_when(w['to'])}", "", "")
    a = r["archive"]
    table.add_row(
        "WAL archive",
        f"{a['ready_segments']} waiting",
        "",
        _age(a["oldest_ready_age_seconds"]),
        f"[red]failing ({a['failed_count']} failures)[/red]" if a["failing"] else "ok",
    )
    table.add_row("DR copy (sync lag)", "", "", _age(r["sync_lag_seconds"]), "")
    for s in r["standbys"]:
        lag = "-" if s["lag_bytes"] is None else f"{s['lag_bytes'] / 2**20:.1f} MiB"
        table.add_row(f"standby {s['name']}", lag, "", "", s["state"])
    d = r["dr_test"]
    rto = "-" if d["rto_seconds"] is None else f"RTO {d['rto_seconds']:.0f} s"
    table.add_row(
        "last DR test",
        f"{rto} / objective {d['rto_objective_seconds']:.0f} s",
        _when(d["started_at"]),
        _age(d["last_passed_age_seconds"]) + " since a pass",
        d["status"] or "never run",
    )
    out.print(table)
    firing = r["alerts"]["firing"]
    alerts = Table("alert", "severity", "summary", title=f"firing alerts ({r['alerts']['source']})")
    for x in firing:
        alerts.add_row(x["name"], x["severity"], x["summary"])
    out.print(alerts if firing else f"no alert fires ({r['alerts']['source']})")
