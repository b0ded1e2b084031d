"""``wedefi-dr backup`` (the logical-backup flow) and ``wedefi-dr backups`` (the catalog).

``backup`` prints the backup id alone on stdout, so ``id=$(wedefi-dr backup)`` works in
scripts, and its human summary on stderr, next to the flow's log lines; ``--json`` puts
the full record (the manifest) on stdout instead of the id.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from wedefi_dr_cli.common import out, print_json, ready, run_flow, summarize, to_stderr

backups_app = typer.Typer(no_args_is_help=True, help="The backup catalog.")

BACKUP_SETTINGS = ("primary_dsn", "ops_dsn", "gpg_passphrase")


def backup(
    operator: Annotated[str, typer.Option(help="who asked for it (audit log)")] = "",
    as_json: Annotated[
        bool, typer.Option("--json", help="print the full record instead of the id")
    ] = False,
) -> None:
    """Run the logical-backup flow; prints the backup id (a summary goes to stderr)."""
    from wedefi_dr.observability.audit import check_operator

    check_operator(operator)
    settings = ready(
        settings=BACKUP_SETTINGS, tools=("pg_dump",), servers=("primary_dsn", "ops_dsn")
    )
    run = run_flow("backup", "logical_backup", operator=operator or settings.operator)
    if not as_json:  # first: the backup exists whatever happens to its summary
        print(run.result, flush=True)
    from wedefi_dr.catalog import listing
    from wedefi_dr.storage.repository import open_store

    store = open_store(settings)
    manifest = listing.resolve(store, run.result)
    record = {
        "backup_id": run.result,
        "location": store.url(manifest.object.key),
        "flow_run_id": run.run_id,
        "seconds": round(run.seconds, 3),
        "manifest": manifest.model_dump(mode="json"),
    }
    summarize(backup_summary(record), to=to_stderr)
    if as_json:
        print_json(record)


def backup_summary(record: dict) -> list[str]:
    """What was backed up, where it is stored, and where the run's record is."""
    m = record["manifest"]
    obj = m["object"]
    rows = sum(t["rows"] for t in m["tables"].values())
    return [
        f"backup {record['backup_id']}: database {m['source']['dbname']}, "
        f"{len(m['tables'])} tables, {rows:,} rows",
        f"stored at {record['location']} ({obj['size_bytes'] / 1e6:,.1f} MB, "
        f"encrypted, sha256 {obj['sha256'][:12]}…)",
        f"took {record['seconds']:.1f} s; report: flow run {record['flow_run_id']} "
        "(artifact backup-summary)",
    ]


@backups_app.command("list")
def backups_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Backups that have a manifest, oldest first."""
    from wedefi_dr.catalog import listing
    from wedefi_dr.storage.repository import open_store

    manifests = listing.list_backups(open_store(ready()))
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
    from wedefi_dr.storage.repository import open_store

    manifest = listing.resolve(open_store(ready()), backup_id)
    print(json.dumps(manifest.model_dump(mode="json"), indent=2))
