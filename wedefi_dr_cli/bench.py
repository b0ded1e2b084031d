"""``wedefi-dr bench``: the flows measured against the bare tools (``wedefi_dr_bench``).

Bare ``wedefi-dr bench`` runs the logical backup/restore benchmark; the subcommands run the
retention, DR-test and PITR benchmarks. The measuring code lives in ``wedefi_dr_bench``;
this module only parses options and prints figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from wedefi_dr_cli.common import err, out, print_json, ready, run_flow

app = typer.Typer(help="Benchmarks: the flows measured against the bare tools.")


@app.callback(invoke_without_command=True)
def logical(
    ctx: typer.Context,
    scale: Annotated[
        float | None,
        typer.Option(help="seed scale of the bench database [default: 40, about 1 GB]"),
    ] = None,
    reuse: Annotated[
        bool, typer.Option("--reuse/--no-reuse", help="keep wedefi_bench if already seeded")
    ] = True,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="write every figure to this file")
    ] = None,
    keep_backup: Annotated[
        bool, typer.Option(help="keep the bench's backup in the bucket (default: delete)")
    ] = False,
    only: Annotated[
        str | None, typer.Option(help="run only 'logical' or 'physical' [default: both]")
    ] = None,
    physical_scale: Annotated[
        int, typer.Option(help="pgbench scale of the physical bench's cluster (70: ~1.1 GB)")
    ] = 70,
    seconds: Annotated[int, typer.Option(help="length of each pgbench run")] = 60,
    pushes: Annotated[int, typer.Option(help="segments timed one at a time")] = 20,
    rounds: Annotated[
        int, typer.Option(min=1, help="logical runs one after the other; the table adds medians")
    ] = 1,
    restore_attempts: Annotated[
        int, typer.Option(min=1, help="attempts of each logical restore in a run; the best counts")
    ] = 3,
) -> None:
    """The whole set in one run: the logical flows against bare pg_dump | gpg and
    pg_restore, and the physical path against pgBackRest, cp and /bin/true; one table.
    """
    if ctx.invoked_subcommand is not None:
        return
    if only not in (None, "logical", "physical"):
        raise typer.BadParameter("--only is 'logical' or 'physical'")
    from wedefi_dr_bench import logical as bench
    from wedefi_dr_bench import physical as physical_bench
    from wedefi_dr_bench import summary

    settings = ready(
        settings=("primary_dsn", "ops_dsn", "gpg_passphrase"),
        tools=("pg_dump", "pg_restore"),
        servers=("primary_dsn", "ops_dsn"),
    )
    console = Console()
    if not console.is_terminal:  # a file or a pipe: wide enough for the tables
        console = Console(width=120)

    def say(message: str) -> None:
        err.print(f"[bold]bench[/] {message}")

    report: dict = {}
    if only in (None, "logical"):
        report["logical"] = bench.run_rounds(
            settings,
            rounds,
            scale=bench.DEFAULT_SCALE if scale is None else scale,
            reuse=reuse,
            keep_backup=keep_backup,
            say=say,
            restore_attempts=restore_attempts,
        )
        bench.render(report["logical"], console)
    if only in (None, "physical"):
        ready(tools=("pgbench", "pg_basebackup", "initdb", "pg_verifybackup"))
        report["physical"] = physical_bench.run_bench(
            settings, scale=physical_scale, seconds=seconds, clients=4, pushes=pushes, say=say
        )
    summary.render(report, console)
    if json_file is not None:
        json_file.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        err.print(f"figures written to {json_file}")


@app.command("retention")
def retention(
    rows: Annotated[int, typer.Option(help="PriceSnapshot rows in the bench database")] = 3_000_000,
    batch_size: Annotated[int, typer.Option(help="rows per batch")] = 10_000,
    baseline_seconds: Annotated[
        float, typer.Option(help="how long to sample the writer alone")
    ] = 10.0,
) -> None:
    """Archive rows/s on a big PriceSnapshot, and a concurrent writer's p99 ratio."""
    from wedefi_dr_bench import retention as retention_bench

    settings = ready(settings=("primary_dsn",), servers=("primary_dsn",))
    figures = retention_bench.run(
        settings, rows=rows, batch_size=batch_size, baseline_seconds=baseline_seconds
    )
    table = Table("figure", "value")
    for name, value in figures.items():
        if isinstance(value, float):
            value = f"{value:,.3f}"
        elif isinstance(value, int):
            value = f"{value:,}"
        table.add_row(name, str(value))
    out.print(table)


@app.command("dr-test")
def dr_test(
    backup_id: Annotated[str, typer.Argument(help="a backup id, or 'latest'")] = "latest",
) -> None:
    """One DR test, printing the split: restore / validate / smoke / benchmark seconds."""
    ready(
        settings=("primary_dsn", "ops_dsn", "gpg_passphrase"),
        tools=("pg_restore",),
        servers=("primary_dsn", "ops_dsn"),
    )
    result = run_flow(
        "dr_test",
        "dr_test",
        backup_id=backup_id,
        operator="bench",
        justification="DR test benchmark",
    ).result
    split = {s["key"]: round(s["seconds"], 2) for s in result["steps"] if s["seconds"]}
    print_json(
        {
            "rto_seconds": result["rto_seconds"],
            "split_seconds": split,
            "validate_split_seconds": result["validation_seconds"],
            "report": result["report_html"],
        }
    )


@app.command("pitr")
def pitr(
    seconds: Annotated[int, typer.Option(help="length of the pgbench run")] = 60,
    clients: Annotated[int, typer.Option(help="pgbench clients")] = 4,
    pushes: Annotated[int, typer.Option(help="segments for the push latency")] = 20,
) -> None:
    """wal-push latency per segment, archive backlog under pgbench, replay MB/s."""
    from wedefi_dr_bench import pitr as pitr_bench

    settings = ready(settings=("gpg_passphrase",), tools=("pgbench", "pg_basebackup", "initdb"))
    print_json(pitr_bench.run_bench(settings, seconds=seconds, clients=clients, pushes=pushes))


@app.command("delta")
def delta(
    scale: Annotated[int, typer.Option(help="pgbench scale of the bench's cluster")] = 10,
    rounds: Annotated[int, typer.Option(help="rounds; the best is reported")] = 3,
) -> None:
    """Delta restore of a base backup against a full staging of the same backup."""
    from wedefi_dr_bench import delta as delta_bench

    settings = ready(settings=("gpg_passphrase",), tools=("pgbench", "pg_basebackup", "initdb"))
    print_json(delta_bench.run_bench(settings, scale=scale, rounds=rounds))


@app.command("rpo")
def rpo(
    seconds: Annotated[float, typer.Option(help="seconds of load before the kill -9")] = 20.0,
    clients: Annotated[int, typer.Option(help="pgbench clients beside the acking one")] = 2,
) -> None:
    """The RPO drill: commits lost at a kill -9, with and without pg_receivewal streaming."""
    from wedefi_dr_bench import rpo as rpo_bench

    settings = ready(
        settings=("gpg_passphrase",), tools=("pgbench", "pg_basebackup", "pg_receivewal")
    )
    print_json(
        rpo_bench.run_bench(
            settings, seconds=seconds, clients=clients, say=lambda m: err.print(f"[bold]rpo[/] {m}")
        )
    )
