"""``wedefi-dr``: the command line the on-call engineer types.

Fast paths stay fast: Prefect and the flows are imported inside the commands that run
them, never at module import, so ``stack``, ``backups`` and (later) ``wal-push`` start
in a fraction of a second.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from wedefi_dr.errors import DRError, InvalidInput
from wedefi_dr_bench import logical as bench
from wedefi_dr_cli import drtest, pitr, retention

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
stack_app = typer.Typer(no_args_is_help=True, help="The embedded local stack.")
backups_app = typer.Typer(no_args_is_help=True, help="The backup catalog.")
app.add_typer(stack_app, name="stack")
app.add_typer(backups_app, name="backups")
out = Console()
err = Console(stderr=True)


def _fail(exc: Exception) -> None:
    kind = type(exc).__name__
    err.print(f"[bold red]error[/] ({kind}): {exc}")
    raise typer.Exit(2 if isinstance(exc, InvalidInput) else 1)


def _settings():
    from wedefi_dr.config import get_settings

    return get_settings()


# ---- stack -----------------------------------------------------------------------------
@stack_app.command("up")
def stack_up(
    fast: Annotated[bool, typer.Option(help="fsync off (tests, demos on slow disks)")] = False,
) -> None:
    """Start (creating when missing) the primary and ops clusters and the S3 endpoint."""
    from wedefi_dr_dev.stack import Stack

    stack = Stack(fast=fast)
    try:
        stack.up()
    except DRError as exc:
        _fail(exc)
    for name, state in stack.status().items():
        err.print(f"{name:18} {state}")
    err.print(f'point commands at it: eval "$(wedefi-dr stack env)"  (state in {stack.root})')


@stack_app.command("down")
def stack_down() -> None:
    """Stop everything the stack started (the data stays)."""
    from wedefi_dr_dev.stack import Stack

    stopped = Stack().down()
    err.print("stopped: " + (", ".join(stopped) or "nothing was running"))


@stack_app.command("status")
def stack_status() -> None:
    """What is running, on which port."""
    from wedefi_dr_dev.stack import Stack

    status = Stack().status()
    for name, state in status.items():
        out.print(f"{name:18} {state}")
    if any(state == "stopped" for state in status.values()):
        raise typer.Exit(1)


@stack_app.command("env")
def stack_env() -> None:
    """Print export lines: eval "$(wedefi-dr stack env)"."""
    from wedefi_dr_dev.stack import Stack

    stack = Stack()
    if not stack.state_path.exists():
        _fail(InvalidInput("no local stack here: run 'wedefi-dr stack up' first"))
    print(stack.export_lines())


# ---- data ------------------------------------------------------------------------------
@app.command()
def seed(
    scale: Annotated[float, typer.Option(help="1 loads in seconds; see wedefi_dr_dev.seed")] = 1.0,
    reset: Annotated[
        bool, typer.Option(help="drop the WeDefiDaily tables first (sample databases only)")
    ] = False,
) -> None:
    """Create the WeDefiDaily schema in the primary database and fill it deterministically."""
    from wedefi_dr_dev import seed as seeding

    dsn = _settings().primary_dsn.get_secret_value()
    if not dsn:
        _fail(InvalidInput('WEDEFI_DR_PRIMARY_DSN is not set: eval "$(wedefi-dr stack env)"'))
    try:
        seeding.prepare(dsn, reset=reset)
    except DRError as exc:
        _fail(exc)
    counts = seeding.seed(dsn, scale)
    err.print(f"seeded {len(counts)} tables, {sum(counts.values()):,} rows (scale {scale})")


# ---- backup ----------------------------------------------------------------------------
@app.command()
def backup(
    operator: Annotated[str, typer.Option(help="who asked for it (audit log)")] = "",
) -> None:
    """Run the logical-backup flow; prints the backup id."""
    from wedefi_dr.config import apply_prefect_run_defaults

    apply_prefect_run_defaults()
    from flows.backup import logical_backup

    try:
        backup_id = logical_backup(operator=operator or _settings().operator)
    except DRError as exc:
        _fail(exc)
    print(backup_id)


@backups_app.command("list")
def backups_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Backups that have a manifest, oldest first."""
    from wedefi_dr.catalog import listing
    from wedefi_dr.storage.s3 import ObjectStore

    manifests = listing.list_backups(ObjectStore(_settings()))
    if as_json:
        print(
            json.dumps([m.model_dump(mode="json", exclude={"tables"}) for m in manifests], indent=2)
        )
        return
    table = Table("backup id", "finished (UTC)", "database", "size", "tables", "rows")
    for m in manifests:
        table.add_row(
            m.backup_id,
            f"{m.finished_at:%Y-%m-%d %H:%M:%S}",
            m.source.dbname,
            f"{m.object.size_bytes / 1e6:,.1f} MB",
            str(len(m.tables)),
            f"{m.total_rows:,}",
        )
    out.print(table)


@backups_app.command("show")
def backups_show(backup_id: str) -> None:
    """The whole manifest of one backup (or 'latest')."""
    from wedefi_dr.catalog import listing
    from wedefi_dr.storage.s3 import ObjectStore

    try:
        manifest = listing.resolve(ObjectStore(_settings()), backup_id)
    except DRError as exc:
        _fail(exc)
    print(json.dumps(manifest.model_dump(mode="json"), indent=2))


@app.command()
def restore(
    backup_id: Annotated[str, typer.Argument(help="a backup id, or 'latest'")],
    target_dsn: Annotated[str, typer.Option(help="database to restore into (no password)")],
    operator: Annotated[str, typer.Option(help="who is restoring")] = "",
    justification: Annotated[str, typer.Option(help="why (audit log)")] = "",
    overwrite_source: Annotated[
        bool, typer.Option(help="allow restoring over the backup's own source database")
    ] = False,
) -> None:
    """Run the restore-backup flow: verified download, decrypt, pg_restore, exact check."""
    from wedefi_dr.postgres.conninfo import refuse_password_in_dsn

    try:
        if not operator.strip():
            raise InvalidInput("--operator is required: who is restoring (audit log)")
        if not justification.strip():
            raise InvalidInput("--justification is required: why this restore (audit log)")
        refuse_password_in_dsn(target_dsn)
    except DRError as exc:
        _fail(exc)
    from wedefi_dr.config import apply_prefect_run_defaults

    apply_prefect_run_defaults()
    from flows.restore import restore_backup

    try:
        result = restore_backup(
            backup_id=backup_id,
            target_dsn=target_dsn,
            operator=operator,
            justification=justification,
            overwrite_source=overwrite_source,
        )
    except DRError as exc:
        _fail(exc)
    print(json.dumps(result, indent=2))


bench_app = typer.Typer(help="Benchmarks: the flows measured against the bare tools.")
app.add_typer(bench_app, name="bench")
bench.register(bench_app)
for area in (retention, pitr, drtest):
    area.register(app, bench_app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
