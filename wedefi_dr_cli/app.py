"""``wedefi-dr``: the command line the on-call engineer types.

Fast paths stay fast: Prefect and the flows are imported inside the commands that run
them, never at module import, so ``--help``, ``stack`` and ``backups`` start in a fraction
of a second.

Every command raises what went wrong; :func:`main` is the one place that turns it into
``error: <message>`` on stderr and an exit status (``wedefi_dr_cli.common.EXIT_CODES``).
"""

from __future__ import annotations

import sys

import typer

from wedefi_dr_cli import (
    approve,
    audit,
    backup,
    bench,
    drtest,
    pitr,
    restore,
    retention,
    seed,
    stack,
    standby,
    status,
    sync,
    verify,
)
from wedefi_dr_cli.common import report

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Backup and disaster recovery for the WeDefiDaily PostgreSQL database.",
    epilog=(
        "Exit status: 0 done, 1 the operation failed, 2 bad input, 3 settings missing, "
        "4 a binary missing, 5 a server unreachable, 6 another run holds the lock."
    ),
)
app.add_typer(stack.app, name="stack")
app.command("seed")(seed.seed)
app.command("backup")(backup.backup)
app.add_typer(backup.backups_app, name="backups")
app.command("restore")(restore.restore)
app.command("wal-push")(pitr.wal_push)
app.command("wal-fetch")(pitr.wal_fetch)
app.command("base-backup")(pitr.base_backup)
app.add_typer(pitr.app, name="pitr")
app.add_typer(drtest.app, name="dr-test")
app.command("retention")(retention.retention)
app.add_typer(bench.app, name="bench")
app.add_typer(audit.app, name="audit")
app.command("status")(status.status)
app.command("approve")(approve.approve)
app.add_typer(approve.runs_app, name="runs")
app.add_typer(standby.app, name="standby")
app.command("failover")(standby.failover)
app.command("wal-stream")(standby.wal_stream)
app.command("sync")(sync.sync)
app.add_typer(sync.archive_app, name="archive-tier")
app.command("verify")(verify.verify)
app.command("backup-retention")(sync.backup_retention)


def main() -> None:
    """Run the command line; any error a command raised ends as one line and its exit code."""
    try:
        app()
    except Exception as exc:  # the one exit policy: see wedefi_dr_cli.common
        sys.exit(report(exc))


if __name__ == "__main__":
    main()
