"""``wedefi-dr sync`` (primary → DR region) and ``wedefi-dr archive-tier`` (Glacier)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer

from wedefi_dr_cli.common import print_json, ready, run_flow, summarize

archive_app = typer.Typer(no_args_is_help=True, help="The Glacier tier: archive, thaw.")


def sync(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="only list what would be copied or deleted")
    ] = False,
    operator: Annotated[str, typer.Option(help="who runs it (audit log)")] = "",
    json_out: Annotated[bool, typer.Option("--json", help="the full summary on stdout")] = False,
) -> None:
    """Run the sync flow: copy what the DR bucket lacks (server-side, each copy verified),
    propagate only the deletions the lifecycle recorded; refuse a wiped primary."""
    from wedefi_dr.config import get_settings
    from wedefi_dr.lifecycle.sync import check_regions, describe

    check_regions(get_settings())  # before any server is asked: a refusal needs none
    settings = ready(settings=("ops_dsn", "gpg_passphrase"), servers=("ops_dsn",))
    run = run_flow("sync", "sync", operator=operator or settings.operator, dry_run=dry_run)
    if json_out:
        print_json(run.result)
    else:
        summarize(describe(run.result))


def backup_retention(
    apply: Annotated[
        bool, typer.Option("--apply", help="delete what is listed (default: a dry run)")
    ] = False,
    as_of: Annotated[
        datetime | None, typer.Option(help="the run's moment in UTC (default: now)")
    ] = None,
    operator: Annotated[str, typer.Option(help="who runs it (audit log)")] = "",
) -> None:
    """Run the backup-retention flow: GFS, the PITR window, product records; lists every
    backup that goes and why, and deletes only with --apply."""
    from wedefi_dr.retention.guard import check_moment

    if as_of is not None:
        check_moment(as_of)
    settings = ready(settings=("ops_dsn", "gpg_passphrase"), servers=("ops_dsn",))
    run = run_flow(
        "backup_retention",
        "backup_retention",
        dry_run=not apply,
        as_of=as_of,
        operator=operator or settings.operator,
    )
    plan = run.result["plan"]
    verb = "deleted" if apply else "would go"
    lines = [f"backup lifecycle as of {plan['as_of']} ({'applied' if apply else 'dry run'})"]
    for kind in ("logical", "base"):
        for name, why in plan[kind]["delete"].items():
            lines.append(f"  {kind} {name} {verb}: {why}")
    lines.append(
        f"  WAL files {verb}: {len(plan['wal']['delete'])} ({plan['wal']['bytes']:,} bytes)"
    )
    records = run.result["records"]["plan"]
    lines.append(
        f"  records {verb}: {len(records['dr_reports'])} report objects, "
        f"{len(records['spool_files'])} spool files, {len(records['dr_environments'])} DR "
        f"environments, {run.result['records']['flow_runs']} Prefect runs"
    )
    summarize(lines)


@archive_app.command("archive")
def archive(
    backup_id: Annotated[str, typer.Argument(help="backup id or 'latest'")] = "latest",
    operator: Annotated[str, typer.Option(help="who runs it (audit log)")] = "",
) -> None:
    """Run the archive-tier flow: the backup and its manifest copied to the Glacier bucket."""
    from wedefi_dr.config import get_settings
    from wedefi_dr.storage.repository import require_s3

    require_s3(get_settings(), "the archive tier (Glacier)")
    settings = ready(settings=("ops_dsn", "gpg_passphrase"), servers=("ops_dsn",))
    run = run_flow(
        "archive_tier", "archive_tier", backup_id=backup_id, operator=operator or settings.operator
    )
    r = run.result
    state = "copied" if r["copied"] else "already there"
    summarize([f"{r['backup_id']} -> s3://{r['bucket']} as {r['storage_class']}: {state}"])


@archive_app.command("thaw")
def thaw(
    backup_id: Annotated[str, typer.Argument(help="backup id or 'latest' in the Glacier tier")],
    wait: Annotated[bool, typer.Option("--wait", help="wait until S3 has restored it")] = False,
    poll_seconds: Annotated[float, typer.Option(min=0.1, help="how often to look")] = 60.0,
) -> None:
    """Request the restore of an archived backup; then restore it with
    ``WEDEFI_DR_SOURCE_REGION=glacier wedefi-dr restore ID ...``."""
    from wedefi_dr.lifecycle import glacier

    settings = ready(settings=("gpg_passphrase",))
    r = glacier.thaw(settings, backup_id, wait=wait, poll_seconds=poll_seconds, say=print)
    summarize([f"{r['backup_id']}: {r['state']} ({r['storage_class']})"])
    if r["state"] != "readable":
        summarize([f"not readable yet: S3 takes {r['expected_hours']} hours; run this again"])
