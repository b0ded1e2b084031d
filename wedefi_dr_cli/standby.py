"""``wedefi-dr standby``, ``failover`` and ``wal-stream``: Tier 1 and near-zero RPO.

``standby provision``, ``standby rejoin`` and ``failover`` run their flows (the failover
pauses for the break-glass approval in the Prefect UI); ``standby status`` asks the servers
directly;
``wal-stream`` is the resident ``pg_receivewal`` uploader, in the foreground until
Ctrl-C or SIGTERM (the local stack starts the same process with ``--with-wal-stream``).
"""

from __future__ import annotations

from typing import Annotated

import typer

from wedefi_dr_cli.common import EXIT_FAILED, print_json, ready, require_text, run_flow, summarize

app = typer.Typer(no_args_is_help=True, help="The streaming standby (Tier 1).")

Primary = Annotated[str, typer.Option(help="the primary's name in the clusters file")]
StandbyName = Annotated[str, typer.Option("--standby", help="the standby's name there")]
AsJson = Annotated[bool, typer.Option("--json", help="the full record instead of a summary")]


def _clusters_file_line(roles: dict) -> str:
    """What the run did to the clusters file, or what the operator must change in it."""
    return roles["operator_action"] or (
        f"clusters file: {', '.join(roles['changes']) or 'already so'}"
    )


def _described(settings, *names: str) -> None:  # noqa: ANN001 - Settings
    """Every named cluster is in the clusters file (refused before Prefect starts)."""
    from wedefi_dr.postgres.cluster import cluster_handle

    for name in names:
        cluster_handle(settings.clusters_file, name)


@app.command("provision")
def provision(
    primary: Primary = "primary",
    standby: StandbyName = "standby",
    slot: Annotated[str | None, typer.Option(help="replication slot (default: setting)")] = None,
    as_json: AsJson = False,
) -> None:
    """Flow ``standby``: pg_basebackup -R -X stream onto the standby, verify it streams."""
    from wedefi_dr.physical.pitr.approval import validate_cluster_name
    from wedefi_dr.physical.standby import validate_slot

    validate_cluster_name(primary)
    validate_cluster_name(standby)
    if slot is not None:
        validate_slot(slot)
    settings = ready(
        settings=("ops_dsn", "clusters_file"), tools=("pg_basebackup",), servers=("ops_dsn",)
    )
    _described(settings, primary, standby)
    record = run_flow("standby", "provision_standby", primary=primary, standby=standby, slot=slot)
    if as_json:
        print_json({**record.result, "flow_run_id": record.run_id})
        return
    r = record.result
    summarize(
        [
            f"standby {standby} (port {r['port']}) of {primary}: {r['state']} on slot "
            f"{r['slot']}, lag {r['lag_bytes']} bytes, copied in {r['copy_seconds']:.1f} s"
        ]
    )


@app.command("status")
def status(
    primary: Primary = "primary",
    standby: StandbyName = "standby",
    slot: Annotated[str | None, typer.Option(help="replication slot (default: setting)")] = None,
    as_json: AsJson = False,
) -> None:
    """Streaming state and lag in bytes (exit 1 when not streaming or above the alert)."""
    from wedefi_dr.physical import standby as tier1
    from wedefi_dr.postgres.cluster import cluster_handle

    settings = ready(settings=("clusters_file",))
    p = cluster_handle(settings.clusters_file, primary)
    s = cluster_handle(settings.clusters_file, standby)
    st = tier1.replication_status(p, s, tier1.validate_slot(slot or settings.standby_slot))
    if as_json:
        print_json(st)
    else:
        summarize(
            [
                f"{standby}: {st['state'] or 'NOT STREAMING'} ({st['sync_state']}), replayed "
                f"{st['replay_lsn']}, lag {st['lag_bytes']} bytes "
                f"(alert at {settings.replication_lag_warning_bytes})"
            ]
        )
    lag = st["lag_bytes"]
    if st["state"] != "streaming" or lag is None or lag > settings.replication_lag_warning_bytes:
        raise typer.Exit(EXIT_FAILED)


@app.command("rejoin")
def rejoin(
    operator: Annotated[str, typer.Option(help="who is rejoining it")] = "",
    justification: Annotated[str, typer.Option(help="why (audit log)")] = "",
    old_primary: Annotated[str, typer.Option(help="the fenced old primary")] = "primary",
    new_primary: Annotated[str, typer.Option(help="the primary it streams from")] = "standby",
    slot: Annotated[str | None, typer.Option(help="replication slot (default: setting)")] = None,
    as_json: AsJson = False,
) -> None:
    """Flow ``rejoin``: the fenced old primary rewound (pg_rewind) into a standby."""
    from wedefi_dr.physical.pitr.approval import validate_cluster_name
    from wedefi_dr.physical.standby import validate_slot

    require_text(operator, "--operator", "who is rejoining the old primary (audit log)")
    require_text(justification, "--justification", "why (audit log)")
    validate_cluster_name(old_primary)
    validate_cluster_name(new_primary)
    if slot is not None:
        validate_slot(slot)
    settings = ready(
        settings=("ops_dsn", "clusters_file"),
        tools=("pg_rewind", "pg_basebackup", "pg_controldata"),
        servers=("ops_dsn",),
    )
    _described(settings, old_primary, new_primary)
    record = run_flow(
        "rejoin",
        "rejoin",
        operator=operator,
        justification=justification,
        old_primary=old_primary,
        new_primary=new_primary,
        slot=slot,
    )
    r = record.result
    if as_json:
        print_json({**r, "flow_run_id": record.run_id})
        return
    kept = r["wal_kept"]
    summarize(
        [
            f"{old_primary}: {r['state']} from {new_primary} on slot {r['slot']}, lag "
            f"{r['lag_bytes']} bytes ({r['method']}: {r['rewind']})",
            *([r["fallback"]] if r["fallback"] else []),
            f"WAL kept: {len(kept['pushed'])} segment(s) pushed, {len(kept['copied_aside'])} "
            f"copied to {kept['aside']}",
            _clusters_file_line(r["clusters_file"]),
        ]
    )
    if r["clusters_file"]["operator_action"]:
        raise typer.Exit(EXIT_FAILED)


def failover(
    operator: Annotated[str, typer.Option(help="who is failing over")] = "",
    justification: Annotated[str, typer.Option(help="why (audit log)")] = "",
    primary: Primary = "primary",
    standby: StandbyName = "standby",
    as_json: AsJson = False,
) -> None:
    """Flow ``failover``: break-glass approval, fence the old primary, promote the standby."""
    from wedefi_dr.observability.audit import check_operator
    from wedefi_dr.physical.pitr.approval import validate_cluster_name

    check_operator(require_text(operator, "--operator", "who is failing over (audit log)"))
    require_text(justification, "--justification", "why (audit log)")
    validate_cluster_name(primary)
    validate_cluster_name(standby)
    settings = ready(settings=("ops_dsn", "clusters_file"), tools=("pg_ctl",), servers=("ops_dsn",))
    _described(settings, primary, standby)
    record = run_flow(
        "failover",
        "failover",
        operator=operator,
        justification=justification,
        primary=primary,
        standby=standby,
    )
    r = record.result
    if as_json:
        print_json({**r, "flow_run_id": record.run_id})
        return
    summarize(
        [
            f"new primary: {r['new_primary']} at {r['new_primary_address']}, timeline "
            f"{r['timeline']}; last archived {r['last_archived_wal']}",
            f"old primary {r['old_primary']}: {r['fence']['stopped']}, fenced: "
            f"{r['fence']['fenced']}",
            f"approved by {', '.join(r['approvers'])}; flow run {record.run_id}",
            _clusters_file_line(r["clusters_file"]),
            f"next: {r['next_steps']}",
        ]
    )
    if r["archive_problem"] or r["clusters_file"]["operator_action"]:
        raise typer.Exit(EXIT_FAILED)


def wal_stream(
    slot: Annotated[str | None, typer.Option(help="its own slot (default: setting)")] = None,
    directory: Annotated[
        str | None, typer.Option("--dir", help="pg_receivewal's folder (default: setting)")
    ] = None,
    synchronous: Annotated[
        bool | None, typer.Option(help="pg_receivewal --synchronous (default: setting)")
    ] = None,
) -> None:
    """pg_receivewal from the primary into the archive until stopped (near-zero RPO)."""
    from pathlib import Path

    from wedefi_dr.physical import walreceiver
    from wedefi_dr.physical.standby import validate_slot
    from wedefi_dr.postgres.conninfo import ConnTarget
    from wedefi_dr.postgres.primary import primary_dsn

    settings = ready(settings=("primary_dsn", "gpg_passphrase"), tools=("pg_receivewal",))
    dsn = primary_dsn(settings)
    target = ConnTarget.parse(dsn, allow_password=True)
    where = Path(directory or settings.wal_stream_dir or settings.spool_path / "wal-stream")
    stream = walreceiver.WalStream(
        settings,
        dsn,
        where,
        validate_slot(slot or settings.wal_stream_slot),
        synchronous=settings.wal_stream_synchronous if synchronous is None else synchronous,
        interval=settings.wal_stream_interval_seconds,
    )
    typer.echo(f"streaming WAL of {target.location} into the archive from {where}", err=True)
    raise typer.Exit(stream.run_forever())
