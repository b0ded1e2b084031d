"""``wedefi-dr`` physical backups: ``wal-push``, ``wal-fetch``, ``base-backup``, ``pitr``.

``wal-push``/``wal-fetch`` are here for operators; the server's ``archive_command`` and
``restore_command`` call ``python -I -m wedefi_dr.physical.wal`` directly (same code, no
typer or rich import: see ``wedefi_dr.physical.wal``), and their exit statuses are the
ones PostgreSQL expects, not the CLI's table.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from wedefi_dr_cli.common import (
    EXIT_FAILED,
    print_json,
    ready,
    require_text,
    rto_line,
    run_flow,
    summarize,
)

app = typer.Typer(no_args_is_help=True, help="Point-in-time recovery.")


def wal_push(
    path: Annotated[str, typer.Argument(help="%p: the WAL file to archive")],
    env_file: Annotated[str | None, typer.Option(help="KEY=VALUE settings file")] = None,
) -> None:
    """archive_command: archive one WAL file (exit 0 only once durably stored)."""
    from wedefi_dr.physical import wal

    raise typer.Exit(wal.run("push", env_file, path=path))


def wal_fetch(
    name: Annotated[str, typer.Argument(help="%f: the file the server asks for")],
    dest: Annotated[str, typer.Argument(help="%p: where to write it")],
    env_file: Annotated[str | None, typer.Option(help="KEY=VALUE settings file")] = None,
) -> None:
    """restore_command: fetch one WAL file (1 = not archived; 128 = abort recovery)."""
    from wedefi_dr.physical import wal

    raise typer.Exit(wal.run("fetch", env_file, name=name, dest=dest))


def base_backup(
    operator: Annotated[str, typer.Option(help="who asked for it (audit log)")] = "",
) -> None:
    """Run the base-backup flow (pg_basebackup streamed, encrypted); prints its manifest."""
    settings = ready(
        settings=("primary_dsn", "ops_dsn", "gpg_passphrase"),
        tools=("pg_basebackup",),
        servers=("primary_dsn", "ops_dsn"),
    )
    run = run_flow("base_backup", "base_backup", operator=operator or settings.operator)
    print(json.dumps(run.result, indent=2))


@app.command("window")
def window(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The recoverable window: earliest base-backup end → newest archived WAL."""
    from wedefi_dr.physical.pitr.window import recoverable_window

    w = recoverable_window(ready())
    d = w.describe()
    if as_json:
        print(json.dumps(d, indent=2))
        return
    if not w.base_backups:
        typer.echo("no base backups: nothing is recoverable yet (wedefi-dr base-backup)")
        raise typer.Exit(EXIT_FAILED)
    typer.echo(f"recoverable from {d['from']}  (end of base backup {d['from_base_backup']})")
    typer.echo(f"             to {d['to']}  (newest archived WAL {d['to_wal']})")
    typer.echo(f"{d['base_backups']} base backup(s), {d['wal_objects']} archived WAL file(s)")


@app.command("run")
def run(
    target: Annotated[str, typer.Option(help="time | lsn | name | latest")] = "latest",
    value: Annotated[str, typer.Option(help="ISO time with zone, LSN, or name")] = "",
    operator: Annotated[str, typer.Option(help="who is recovering")] = "",
    justification: Annotated[str, typer.Option(help="why (audit log)")] = "",
    cluster: Annotated[
        str, typer.Option(help="a cluster named in the clusters file (WEDEFI_DR_CLUSTERS_FILE)")
    ] = "pitr-scratch",
    inclusive: Annotated[bool, typer.Option(help="stop just after the target")] = False,
    timeline: Annotated[str, typer.Option(help="latest | current | N")] = "latest",
    delta: Annotated[
        bool,
        typer.Option(
            "--delta",
            help="a stopped, non-production copy of the same system: rewrite only what differs "
            "from the base backup in its own directory (no old copy kept)",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the full record instead of a summary")
    ] = False,
) -> None:
    """Run the point-in-time-recovery flow; it pauses for approval (Prefect UI)."""
    from wedefi_dr.observability.audit import check_operator
    from wedefi_dr.physical.pitr.approval import validate_cluster_name
    from wedefi_dr.physical.pitr.target import RecoveryTarget

    check_operator(require_text(operator, "--operator", "who is recovering (audit log)"))
    require_text(justification, "--justification", "why (audit log)")
    RecoveryTarget.parse(target, value, inclusive, timeline)
    validate_cluster_name(cluster)
    settings = ready(
        settings=("ops_dsn", "gpg_passphrase"), tools=("pg_ctl",), servers=("ops_dsn",)
    )
    flow_run = run_flow(
        "pitr",
        "point_in_time_recovery",
        target_kind=target,
        target_value=value,
        operator=operator,
        justification=justification,
        cluster=cluster,
        inclusive=inclusive,
        timeline=timeline,
        delta=delta,
    )
    record = {
        **flow_run.result,
        "flow_run_id": flow_run.run_id,
        "rto_objective_seconds": settings.dr_rto_objective_seconds,
    }
    if as_json:
        print_json(record)
        return
    lines = [
        f"recovered cluster {record['cluster']} (port {record['port']}) to "
        f"{record['target']} from base backup {record['base_backup_id']}: timeline "
        f"{record['timeline']}, {record['tables']} tables, {record['rows']:,} rows validated",
        rto_line(
            "recovery time without the approval wait",
            record["recovery_seconds"],
            record["rto_objective_seconds"],
        ),
        f"approved by {', '.join(record['approvers'])}; report: flow run "
        f"{record['flow_run_id']} (artifact pitr-report)",
    ]
    if applied := record.get("delta"):
        lines.append(
            f"delta restore in place: {applied['written']} file(s) written, "
            f"{applied['kept']} kept, {applied['removed']} removed"
        )
    summarize(lines)
