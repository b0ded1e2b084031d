"""PostgreSQL client and server tools: where the binaries are, how to call them safely.

Command lines are argument lists, never shell strings. Where a tool connects, and with
which environment, is :mod:`wedefi_dr.postgres.conninfo`'s business.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import psycopg2

from wedefi_dr.errors import InvalidInput, ServerUnreachable, ToolNotFound
from wedefi_dr.postgres.conninfo import ConnTarget


class _Unreachable(ServerUnreachable, psycopg2.OperationalError):
    """What :func:`connect` raises: a ``DRError`` for the CLI's exit policy, and still a
    ``psycopg2.OperationalError`` for the loops that poll a server until it accepts
    connections (recovery start-up, a DR container coming up)."""


@cache
def bindir() -> Path:
    """The newest PostgreSQL bin directory: $WEDEFI_DR_PG_BINDIR, pg_config, Debian's layout, PATH.

    Debian's ``/usr/bin/pg_dump`` is a wrapper that picks a version by cluster; the real
    binaries live in ``/usr/lib/postgresql/<major>/bin``, which is also where ``initdb``
    and ``pg_ctl`` are (they are not on PATH on Debian).
    """
    explicit = os.environ.get("WEDEFI_DR_PG_BINDIR")
    if explicit:
        # An operator who names a directory means that one: falling back to another
        # version's binaries would hide the mistake until a major-version check fails.
        if (Path(explicit) / "initdb").is_file() and (Path(explicit) / "pg_dump").is_file():
            return Path(explicit)
        raise ToolNotFound(
            f"WEDEFI_DR_PG_BINDIR={explicit} has no initdb and pg_dump: point it at a "
            "PostgreSQL bin directory (e.g. /usr/lib/postgresql/15/bin) or unset it"
        )
    candidates: list[Path] = []
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(re.sub(r"\D", "", p.split("/")[-2]) or 0),
        reverse=True,
    )
    candidates += [Path(p) for p in debian]
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for c in candidates:
        if (c / "initdb").is_file() and (c / "pg_dump").is_file():
            return c
    raise ToolNotFound(
        "PostgreSQL server binaries not found (initdb, pg_ctl, pg_dump): install the "
        "Debian package 'postgresql' (apt-get install postgresql) or set WEDEFI_DR_PG_BINDIR"
    )


def tool(name: str) -> str:
    """Absolute path of a PostgreSQL binary such as ``pg_dump``."""
    path = bindir() / name
    if not path.is_file():
        raise ToolNotFound(f"{name} not found in {bindir()}")
    return str(path)


def tool_major_version(name: str) -> int:
    """Major version of a client binary (``pg_dump (PostgreSQL) 15.18`` -> 15)."""
    out = subprocess.run([tool(name), "--version"], capture_output=True, text=True, check=True)
    match = re.search(r"(\d+)(?:\.\d+)?", out.stdout)
    if not match:
        raise ToolNotFound(f"cannot read the version of {name}: {out.stdout!r}")
    return int(match.group(1))


def running_as_root() -> bool:
    return os.geteuid() == 0


def _redacted(dsn: str) -> str:
    try:
        return ConnTarget.parse(dsn, allow_password=True).redacted
    except InvalidInput:
        return "<unparseable conninfo>"


@contextmanager
def connect(dsn: str, *, autocommit: bool = False, application_name: str = "wedefi-dr"):
    """A psycopg2 connection in UTC, closed on exit (committed unless an error escaped).

    A failed connection raises :class:`~wedefi_dr.errors.ServerUnreachable` naming the
    server by its redacted DSN, so the operator learns which of the several servers
    (primary, ops, a DR copy) it was, and never sees its password.
    """
    try:
        conn = psycopg2.connect(dsn, application_name=application_name, options="-c TimeZone=UTC")
    except psycopg2.OperationalError as exc:
        reason = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise _Unreachable(f"cannot connect to {_redacted(dsn)}: {reason}") from exc
    conn.autocommit = autocommit
    try:
        yield conn
        if not autocommit:
            conn.commit()
    except BaseException:
        if not autocommit:
            conn.rollback()
        raise
    finally:
        conn.close()


# What a server binary, tar or an operator's start/stop command needs from our environment:
# where programs are and the locale. The project's settings and secrets (the backup
# passphrase, cloud keys, database passwords) stay here: a server started with them would
# hand them to every backend and every archive_command it runs.
_CHILD_EXACT = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH"})


def child_env() -> dict[str, str]:
    """The environment of a child that is not a libpq client (pg_ctl, initdb, tar...)."""
    return {k: v for k, v in os.environ.items() if k in _CHILD_EXACT or k.startswith("LC_")}
