"""``wedefi-dr retention``: validate the retention policy, preview it, apply it in batches."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from wedefi_dr.errors import InvalidInput
from wedefi_dr_cli.common import out, ready, run_flow


def retention(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="only count what would go (changes nothing)")
    ] = False,
    policy: Annotated[
        Path | None, typer.Option(help="policy file (default: deployments/retention.yaml)")
    ] = None,
    as_of: Annotated[
        datetime | None, typer.Option(help="the run's moment in UTC (default: now)")
    ] = None,
    operator: Annotated[str, typer.Option(help="who runs it (audit log)")] = "",
    allow_mass_deletion: Annotated[
        bool,
        typer.Option(
            "--allow-mass-deletion",
            help="allow removing more than a table's max_share, or Tier 1 rows (a recent "
            "verified backup is still required)",
        ),
    ] = False,
) -> None:
    """Run the retention flow: validate the policy, preview, then apply it in batches."""
    from wedefi_dr.retention.guard import check_moment

    if as_of is not None:
        check_moment(as_of)  # a future moment is refused before any server is asked
    settings = ready(settings=("primary_dsn", "ops_dsn"), servers=("primary_dsn", "ops_dsn"))
    path = policy or settings.retention_policy
    if not Path(path).is_file():
        raise InvalidInput(f"retention policy not found: {path}")
    run = run_flow(
        "retention",
        "retention",
        dry_run=dry_run,
        as_of=as_of,
        operator=operator or settings.operator,
        policy_path=str(path),
        allow_mass_deletion=allow_mass_deletion,
    )
    print_preview(run.result["preview"], run.result["results"])


def print_preview(preview: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
    """One row per table: what the policy selects and, after a run, what was done."""
    done = {r["table"]: r for r in results}
    table = Table("table", "action", "older than (UTC)", "rows", "by cascade", "into")
    if results:
        table.add_column("done")
    for p in preview:
        row = [
            p["table"],
            p["action"],
            f"{p['cutoff']:%Y-%m-%d %H:%M}",
            f"{p['rows']:,}",
            ", ".join(f"{t} {n:,}" for t, n in p["cascaded"].items()) or "-",
            p["target"] or "-",
        ]
        if results:
            r = done.get(p["table"])
            row.append(f"{r['removed']:,} in {r['batches']} batches" if r else "FAILED")
        table.add_row(*row)
    out.print(table)
