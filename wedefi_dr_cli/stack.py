"""``wedefi-dr stack``: the embedded local stack (PostgreSQL primary and ops, an S3 endpoint,
the Prefect server and its worker).

Development and demos only: production points the settings at its own servers.
"""

from __future__ import annotations

import time
from pathlib import Path
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
    with_deployments: Annotated[
        bool, typer.Option(help="also register the work pool and every deployment")
    ] = False,
    repo: Annotated[
        str | None,
        typer.Option(
            help="s3 (moto, in memory: lost at `stack down`) or posix (a directory kept "
            "across `stack down`/`stack up`); default: as the stack was last brought up"
        ),
    ] = None,
    repo_path: Annotated[
        Path | None,
        typer.Option(help="with --repo posix: the directory (default: repo/ in the stack)"),
    ] = None,
) -> None:
    """Start (creating when missing) the primary and ops clusters, the S3 endpoint, the
    Prefect server and a worker for the local work pool."""
    from wedefi_dr_dev.stack import Stack

    if repo_path is not None and repo != "posix":
        raise InvalidInput("--repo-path goes with --repo posix")
    t0 = time.monotonic()
    stack = Stack(fast=fast, repo=repo, repo_path=repo_path)
    stack.up()
    ready_after = time.monotonic() - t0
    if with_standby:
        stack.up_standby()
    if with_wal_stream:
        stack.start_wal_stream()
    for name, state in stack.status().items():
        err.print(f"{name:22} {state}")
    err.print(f"{'repository':22} {stack.repo_path or 's3 (moto, in memory)'}")
    err.print(f"Prefect UI answering {ready_after:.1f} s after `stack up` began")
    if with_deployments:
        _deploy(stack)
    err.print(f'point commands at it: eval "$(wedefi-dr stack env)"  (state in {stack.root})')
    err.print(f"Prefect UI: {stack.prefect_ui_url}")


def _deploy(stack) -> None:  # noqa: ANN001 - a wedefi_dr_dev.stack.Stack, imported lazily
    t0 = time.monotonic()
    names = stack.deploy()
    err.print(
        f"deployed {len(names)} deployment(s) to pool wedefi-dr-local in "
        f"{time.monotonic() - t0:.1f} s: {', '.join(names)}"
    )
    err.print(f"host concurrency limit: {stack.host_limit_name()} (1 slot)")


@app.command("deploy")
def deploy() -> None:
    """Create the work pool and the host's concurrency limit, then register every
    deployment of prefect.yaml on the stack's Prefect server."""
    from wedefi_dr_dev.stack import Stack

    stack = Stack()
    if not stack.state_path.exists() or not stack.prefect_ready():
        raise InvalidInput("the stack's Prefect server is not running: run 'wedefi-dr stack up'")
    _deploy(stack)
    print(f"{stack.prefect_ui_url}/deployments")


@app.command("url")
def url() -> None:
    """Print the Prefect UI's URL (exit 1 when the server is not answering)."""
    from wedefi_dr_dev.stack import Stack

    stack = Stack()
    if not stack.state_path.exists() or not stack.prefect_ready():
        err.print("the stack's Prefect server is not running: run 'wedefi-dr stack up'")
        raise typer.Exit(EXIT_FAILED)
    print(stack.prefect_ui_url)


@app.command("down")
def down(
    purge_repo: Annotated[
        bool,
        typer.Option(help="also delete the stack's own posix repository and every backup in it"),
    ] = False,
) -> None:
    """Stop everything the stack started (the data stays: clusters, ops database, Prefect
    history and a posix repository; moto's buckets are in its memory and go)."""
    from wedefi_dr_dev.stack import Stack

    stack = Stack()
    stopped = stack.down()
    err.print("stopped: " + (", ".join(stopped) or "nothing was running"))
    if purge_repo:
        purged = stack.purge_repo()
        err.print(f"removed the posix repository {purged}" if purged else "no posix repository")


@app.command("status")
def status() -> None:
    """What is running, on which port (exit 1 when something is stopped)."""
    from wedefi_dr_dev.stack import Stack

    states = Stack().status()
    for name, state in states.items():
        out.print(f"{name:22} {state}")
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
