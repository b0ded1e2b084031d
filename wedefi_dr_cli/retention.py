"""``wedefi-dr`` commands of the retention area (registered by cli.py).

Imports of Prefect, Great Expectations and the flows stay inside the command functions,
so that ``wedefi-dr --help`` and the fast commands start in a fraction of a second.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from wedefi_dr.errors import DRError, InvalidInput

out = Console()
err = Console(stderr=True)


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error[/] ({type(exc).__name__}): {exc}")
    raise typer.Exit(2 if isinstance(exc, InvalidInput) else 1)


def _print_preview(preview: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
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


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add this area's commands to ``app`` and its benchmark to ``bench_app``."""

    @app.command("retention")
    def retention_command(
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
    ) -> None:
        """Run the retention flow: validate the policy, preview, then apply it in batches."""
        from wedefi_dr.config import apply_prefect_run_defaults

        apply_prefect_run_defaults()
        from flows.retention import retention
        from wedefi_dr.config import get_settings

        settings = get_settings()
        try:
            settings.require("primary_dsn", "ops_dsn")
            path = policy or settings.retention_policy
            if not Path(path).is_file():
                raise InvalidInput(f"retention policy not found: {path}")
            result = retention(
                dry_run=dry_run,
                as_of=as_of,
                operator=operator or settings.operator,
                policy_path=str(path),
            )
        except (DRError, ValueError) as exc:
            _fail(exc)
        _print_preview(result["preview"], result["results"])

    @bench_app.command("retention")
    def bench_retention(
        rows: Annotated[
            int, typer.Option(help="PriceSnapshot rows in the bench database")
        ] = 3_000_000,
        batch_size: Annotated[int, typer.Option(help="rows per batch")] = 10_000,
        baseline_seconds: Annotated[
            float, typer.Option(help="how long to sample the writer alone")
        ] = 10.0,
    ) -> None:
        """Archive rows/s on a big PriceSnapshot, and a concurrent writer's p99 ratio."""
        from wedefi_dr.config import get_settings
        from wedefi_dr_bench import retention as retention_bench

        try:
            figures = retention_bench.run(
                get_settings(), rows=rows, batch_size=batch_size, baseline_seconds=baseline_seconds
            )
        except (DRError, ValueError) as exc:
            _fail(exc)
        table = Table("figure", "value")
        for name, value in figures.items():
            if isinstance(value, float):
                value = f"{value:,.3f}"
            elif isinstance(value, int):
                value = f"{value:,}"
            table.add_row(name, str(value))
        out.print(table)
