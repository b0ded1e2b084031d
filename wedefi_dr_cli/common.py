"""What every ``wedefi-dr`` command shares: the one exit policy, settings checks, flow runs.

The exit policy lives here and only here: :func:`exit_code` maps an error to the status a
script can act on, :func:`report` prints it as one line. ``app.main`` applies both to
whatever a command raised, so no command catches errors just to print them.

Checks that can refuse a command (settings, binaries, servers) run before Prefect is
imported: a bad command line or a missing ``eval "$(wedefi-dr stack env)"`` is answered in
a fraction of a second, and the flow's failure path (audit row, notification, each with
retries) never runs against a database that is not there.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Console

from wedefi_dr.errors import (
    DRError,
    InvalidInput,
    OperationBusy,
    ServerUnreachable,
    SettingsMissing,
    ToolNotFound,
)

if TYPE_CHECKING:
    from wedefi_dr.config import Settings

out = Console()
err = Console(stderr=True)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_SETTINGS_MISSING = 3
EXIT_TOOL_MISSING = 4
EXIT_SERVER_UNREACHABLE = 5
EXIT_BUSY = 6

# Most specific first: the first class the error is an instance of decides.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (InvalidInput, EXIT_BAD_INPUT),
    (SettingsMissing, EXIT_SETTINGS_MISSING),
    (ToolNotFound, EXIT_TOOL_MISSING),
    (ServerUnreachable, EXIT_SERVER_UNREACHABLE),
    (OperationBusy, EXIT_BUSY),
)


def exit_code(exc: BaseException) -> int:
    """The documented exit status for ``exc`` (README, Commands): 1 unless operator-caused."""
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return EXIT_FAILED


def one_line(exc: BaseException) -> str:
    """``exc`` as the single line the operator reads, scrubbed of the configured secrets.

    Errors that are not ``DRError`` are unexpected: their type is named, since their
    message alone (a ``KeyError``'s key) may say nothing.
    """
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, DRError):
        text = f"{type(exc).__name__}: {text}"
    return _scrub(text)


def _scrub(text: str) -> str:
    from wedefi_dr.config import get_settings

    try:
        s = get_settings()
    except ValueError:  # the settings themselves are what failed: nothing to scrub with
        return text
    for secret in (s.gpg_passphrase, s.primary_dsn, s.ops_dsn):
        value = secret.get_secret_value()
        if value:
            text = text.replace(value, "***")
    return text


def report(exc: BaseException) -> int:
    """Print ``error: <message>`` on stderr and return the exit status for ``exc``."""
    print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
    return exit_code(exc)


def require_text(value: str, option: str, why: str) -> str:
    """A required free-text option (``--operator``) that is not blank."""
    if not value.strip():
        raise InvalidInput(f"{option} is required: {why}")
    return value


def ready(
    *,
    settings: tuple[str, ...] = (),
    tools: tuple[str, ...] = (),
    servers: tuple[str, ...] = (),
) -> Settings:
    """The settings, once the command's environment is known to be usable.

    In this order, so the message names the first thing to fix: ``settings`` set
    (``SettingsMissing``), PostgreSQL ``tools`` installed (``ToolNotFound``), the servers of
    the DSN settings in ``servers`` accepting connections (``ServerUnreachable``): for
    ``primary_dsn`` the primary it leads to now (:mod:`wedefi_dr.postgres.primary`; a DSN
    the clusters file cannot lead to one primary is bad input).
    """
    from wedefi_dr.config import get_settings
    from wedefi_dr.postgres.primary import primary_dsn
    from wedefi_dr.postgres.tools import connect, tool

    s = get_settings()
    s.require(*settings, *(name for name in servers if name not in settings))
    for name in tools:
        tool(name)
    for name in servers:
        dsn = primary_dsn(s) if name == "primary_dsn" else getattr(s, name).get_secret_value()
        with connect(dsn, application_name="wedefi-dr check"):
            pass
    return s


@dataclass(frozen=True)
class FlowRun:
    """What a flow returned, with the run's id (where its logs and artifacts are) and
    its wall-clock time as the operator waited for it."""

    result: Any
    run_id: str
    seconds: float


def run_flow(module: str, name: str, **params: Any) -> FlowRun:
    """Apply the Prefect run defaults, then import ``flows.<module>.<name>`` and run it.

    The import happens here, after the command's checks, so that ``--help`` and refused
    command lines never pay for Prefect. A failed run raises the flow's own exception.
    """
    import importlib

    from wedefi_dr.config import apply_prefect_run_defaults

    apply_prefect_run_defaults()
    flow = getattr(importlib.import_module(f"flows.{module}"), name)
    t0 = time.monotonic()
    state = flow(**params, return_state=True)
    seconds = time.monotonic() - t0
    result = state.result(raise_on_failure=True)
    return FlowRun(result=result, run_id=str(state.state_details.flow_run_id), seconds=seconds)


def print_json(record: Any) -> None:
    """The full record for scripts (``--json``): stdout, nothing else on it."""
    import json

    print(json.dumps(record, indent=2, default=str))


def summarize(lines: list[str], *, to: Callable[[str], None] | None = None) -> None:
    """A few lines for the operator (no markup: pasted into tickets and chats as is)."""
    say = to or (lambda line: print(line, flush=True))
    for line in lines:
        say(line)


def rto_line(label: str, seconds: float, objective: float) -> str:
    """``restore time: 84.2 s, RTO objective 900 s (within)``: the one figure that tells
    an incident channel whether recovery is on time."""
    verdict = "within" if seconds <= objective else "OVER"
    return f"{label}: {seconds:,.1f} s, RTO objective {objective:,.0f} s ({verdict})"


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
