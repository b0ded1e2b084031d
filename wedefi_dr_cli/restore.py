"""``wedefi-dr restore``: the restore-backup flow (verified download, decrypt, pg_restore,
exact check against the manifest), with a summary that puts the time taken next to the
RTO objective, since a restore is usually run because production needs it back."""

from __future__ import annotations

from typing import Annotated

import typer

from wedefi_dr_cli.common import print_json, ready, require_text, rto_line, run_flow, summarize


def restore(
    backup_id: Annotated[str, typer.Argument(help="a backup id, or 'latest'")],
    target_dsn: Annotated[str, typer.Option(help="database to restore into (no password)")],
    operator: Annotated[str, typer.Option(help="who is restoring")] = "",
    justification: Annotated[str, typer.Option(help="why (audit log)")] = "",
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            "--overwrite-source",
            help="replace a target that holds data; over production it waits for break-glass "
            "approval",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the full record instead of a summary")
    ] = False,
) -> None:
    """Run the restore-backup flow: verified download, decrypt, pg_restore, exact check."""
    from wedefi_dr.observability.audit import check_operator
    from wedefi_dr.postgres.conninfo import refuse_password_in_dsn

    check_operator(require_text(operator, "--operator", "who is restoring (audit log)"))
    require_text(justification, "--justification", "why this restore (audit log)")
    refuse_password_in_dsn(target_dsn)
    settings = ready(
        settings=("ops_dsn", "gpg_passphrase"), tools=("pg_restore",), servers=("ops_dsn",)
    )
    run = run_flow(
        "restore",
        "restore_backup",
        backup_id=backup_id,
        target_dsn=target_dsn,
        operator=operator,
        justification=justification,
        overwrite=overwrite,
    )
    record = {
        **run.result,
        "flow_run_id": run.run_id,
        "seconds": round(run.seconds, 3),
        "rto_objective_seconds": settings.dr_rto_objective_seconds,
    }
    if as_json:
        print_json(record)
        return
    summarize(
        [
            f"restored backup {record['backup_id']} into {record['target']}: "
            f"{record['tables']} tables, {record['rows']:,} rows identical to the manifest",
            rto_line("restore time", record["seconds"], record["rto_objective_seconds"]),
            f"report: flow run {record['flow_run_id']} (artifact restore-summary)",
        ]
    )
