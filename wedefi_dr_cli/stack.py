"""``wedefi-dr stack``: the embedded local stack (PostgreSQL primary and ops, an S3 endpoint).

Development and demos only: production points the settings at its own servers.
"""

from __future__ import annotations

from typing import Annotated

import typer

from wedefi_dr.errors import InvalidInput
from wedefi_dr_cli.common import EXIT_FAILED, err, out

app = typer.Typer(no_args_is_help=True, help="The embedded local stack.")


@app.command("up")
def up(
    fast: Annotated[bool, typer.Option(help="fsync off (tests, demos on slow disks)")] = False,
    with_standby: Annotated[
        bool, typer.Option(help="also a streaming standby of the primary (cluster 'standby')")
    ] = False,
    with_wal_stream: Annotated[
        bool, typer.Option(help="also pg_receivewal into the archive (near-zero RPO)")
    ] = False,
) -> None:
    """Start (creating when missing) the primary and ops clusters and the S3 endpoint."""
    from wedefi_dr_dev.stack import Stack

    stack = Stack(fast=fast)
    stack.up()
    if with_standby:
        stack.up_standby()
    if with_wal_stream:
        stack.start_wal_stream()
    for name, state in stack.status().items():
        err.print(f"{name:18} {state}")
    err.print(f'point commands at it: eval "$(wedefi-dr stack env)"  (state in {stack.root})')


@app.command("down")
def down() -> None:
    """Stop everything the stack started (the data stays)."""
    from wedefi_dr_dev.stack import Stack

    stopped = Stack().down()
    err.print("stopped: " + (", ".join(stopped) or "nothing was running"))


@app.command("status")
def status() -> None:
    """What is running, on which port (exit 1 when something is stopped)."""
    from wedefi_dr_dev.stack import Stack

    states = Stack().status()
    for name, state in states.items():
        out.print(f"{name:18} {state}")
    if any(state == "stopped" for state in states.values()):
        raise typer.Exit(EXIT_FAILED)


@app.command("env")
def env() -> None:
    """Print export lines: eval "$(wedefi-dr stack env)"."""
    from wedefi_dr_dev.stack import Stack

    stack = Stack()
    if not stack.state_path.exists():
        raise InvalidInput("no local stack here: run 'wedefi-dr stack up' first")
    print(stack.export_lines())
