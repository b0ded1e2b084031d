"""``wedefi-dr audit``: prove the audit trail intact, list it, close abandoned runs.

``verify`` exits 0 when the chain and every row agree, 1 naming the first broken event or
row (deleted, edited, reordered, inserted around the audit functions).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from wedefi_dr.errors import InvalidInput
from wedefi_dr_cli.common import EXIT_FAILED, out, print_json, ready, summarize, to_stderr

app = typer.Typer(no_args_is_help=True, help="The audit trail: verify, list, sweep.")

LOG_NAMES = ("backup", "recovery", "retention")


def _log_option(value: str | None) -> str | None:
    if value is not None and value not in LOG_NAMES:
        raise InvalidInput(f"--log must be one of {', '.join(LOG_NAMES)}, not {value!r}")
    return value


@app.command("verify")
def verify(
    expect_head: Annotated[
        str | None,
        typer.Option(help="a 'seq:hash' printed by an earlier verify, kept elsewhere"),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="the full report")] = False,
) -> None:
    """Walk the hash chain and compare every audit row with it; exit 1 if anything broke."""
    from wedefi_dr.observability import audit_chain

    settings = ready(settings=("ops_dsn",), servers=("ops_dsn",))
    report = audit_chain.verify(settings.ops_dsn.get_secret_value(), expect_head=expect_head)
    if json_output:
        print_json({**report.__dict__, "intact": report.intact})
    elif report.intact:
        summarize(
            [
                f"audit trail intact: {report.events} chain events, {report.rows} rows",
                f"head {report.head} (keep it: --expect-head proves nothing was rewritten)",
            ]
        )
    else:
        to_stderr(f"audit trail BROKEN: {report.problems[0]}")
        for problem in report.problems[1:]:
            to_stderr(f"  also: {problem}")
    if not report.intact:
        raise typer.Exit(EXIT_FAILED)


@app.command("list")
def list_rows(
    log: Annotated[str | None, typer.Option(help="backup, recovery or retention")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000, help="how many rows")] = 20,
    json_output: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
) -> None:
    """The latest audit rows, newest first."""
    from wedefi_dr.observability import audit

    settings = ready(settings=("ops_dsn",), servers=("ops_dsn",))
    rows = audit.recent(settings.ops_dsn.get_secret_value(), log_name=_log_option(log), limit=limit)
    if json_output:
        print_json(rows)
        return
    table = Table("log", "started (UTC)", "kind", "target", "status", "operator", "error")
    for r in rows:
        table.add_row(
            r["log"],
            f"{r['start_time']:%Y-%m-%d %H:%M:%S}",
            r["kind"],
            r["target"] or "",
            r["status"],
            r["operator_id"] or "",
            (r["error_message"] or "")[:80],
        )
    out.print(table)


@app.command("sweep")
def sweep(
    log: Annotated[str | None, typer.Option(help="backup, recovery or retention")] = None,
    older_than: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="also rows started on other hosts this many seconds ago or more (their "
            "process cannot be checked from here)",
        ),
    ] = None,
) -> None:
    """Mark abandoned the ``running`` rows whose starter is gone (a new chained event)."""
    from wedefi_dr.observability import audit

    settings = ready(settings=("ops_dsn",), servers=("ops_dsn",))
    marked = audit.sweep(
        settings.ops_dsn.get_secret_value(),
        log_name=_log_option(log),
        older_than_seconds=older_than,
    )
    summarize(
        [f"{m.log} row {m.audit_id} abandoned: {m.evidence}" for m in marked]
        + [f"{len(marked)} abandoned row(s) marked"]
    )
