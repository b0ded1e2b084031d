"""One typed connection target, parsed once by libpq, handed whole to every tool.

A restore must write to the server and database its identity check saw (invariant 5).
The check connects with psycopg2; ``pg_dump``, ``pg_restore`` and ``pg_basebackup`` are
separate libpq programs. Both resolve a connection the same way when they get the same
two inputs: the full conninfo (every key: ``hostaddr``, ``service``, ``sslmode``,
``options``, ``connect_timeout``...) and the same ``PG*`` environment, where keys of the
conninfo win and the environment (and a service file) fills in the keys it lacks. So a
:class:`ConnTarget` gives the tools exactly that: ``--dbname=<full conninfo>`` (libpq
expands a ``--dbname`` holding ``=`` as a connection string) and the caller's libpq
environment. A password reaches the tool in neither: a command line is visible to ``ps``,
and an environment to ``/proc/PID/environ`` (and to every child the tool starts). It goes
into a passfile of this process (mode 0600 from creation, in a private folder), which
the conninfo names with ``passfile=``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
from psycopg2.extensions import make_dsn, parse_dsn

from wedefi_dr.errors import InvalidInput
from wedefi_dr.storage.secretfiles import runtime_dir, write_secret_file

PASSWORD_KEY = "password"
PASSFILE_KEY = "passfile"
# The environment variable libpq takes a password from: never handed to a child.
PASSWORD_ENV = "PGPASSWORD"
# libpq has no environment variable for the key file's passphrase: on a tool's command
# line it would be visible to every local user, so it is refused outright.
UNPASSABLE_SECRET_KEYS = ("sslpassword",)
# What a libpq tool needs from its parent's environment. Everything else (the GPG
# passphrase, cloud keys, the project's settings) stays out of the child's environment.
INHERITED_EXACT = frozenset(
    {"HOME", "PATH", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH"}
)
INHERITED_PREFIXES = ("PG", "LC_", "KRB5")


def _inherited(name: str) -> bool:
    return name != PASSWORD_ENV and (name in INHERITED_EXACT or name.startswith(INHERITED_PREFIXES))


_passfiles: dict[str, Path] = {}
_passfiles_lock = threading.Lock()


def _pgpass_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def passfile_for(password: str) -> Path:
    """A passfile holding only ``password`` (for any host, port, database and user: it is
    named by one conninfo only), one per password and process, removed at exit."""
    if any(c in password for c in "\r\n\0"):
        raise InvalidInput(
            "the database password contains a line break or NUL: no PostgreSQL tool can "
            "receive it safely (a passfile holds one entry per line); change the password"
        )
    key = hashlib.sha256(password.encode()).hexdigest()
    with _passfiles_lock:
        path = _passfiles.get(key)
        if path is None or not path.exists():
            name = f"pgpass-{len(_passfiles)}-{os.urandom(6).hex()}"
            path = write_secret_file(runtime_dir(), name, f"*:*:*:*:{_pgpass_escape(password)}\n")
            _passfiles[key] = path
        return path


@dataclass(frozen=True)
class ConnTarget:
    """A parsed libpq conninfo: immutable, hashable and picklable.

    Being plain data, it can be a Prefect task input (the cache key hashes it) and a
    persisted value. Its ``repr`` is redacted, so a traceback or a log line that shows
    it never shows a password.
    """

    params: tuple[tuple[str, str], ...] = field(repr=False)

    @classmethod
    def parse(cls, dsn: str, *, allow_password: bool) -> ConnTarget:
        """Parse ``dsn`` (keyword/value or URI form) with libpq itself, once.

        ``allow_password=False`` is for DSNs that arrive as flow parameters or on a
        command line: Prefect records parameters, so a password there would be stored.
        """
        if not isinstance(dsn, str):
            raise InvalidInput(f"a PostgreSQL DSN must be a string, not {type(dsn).__name__}")
        try:
            parsed = parse_dsn(dsn)
        except (psycopg2.ProgrammingError, ValueError):
            # Neither libpq's message nor its exception as the cause: both quote the
            # DSN, which may hold a password, and tracebacks reach the logs.
            raise InvalidInput(
                "not a valid PostgreSQL DSN: expected key=value pairs (host=... dbname=...) "
                "or a postgresql:// URI"
            ) from None
        for key in UNPASSABLE_SECRET_KEYS:
            if key in parsed:
                raise InvalidInput(
                    f"the DSN sets {key}: a PostgreSQL tool could only receive it on its "
                    "command line, where any local user can read it; use a key file "
                    "without a passphrase (mode 600) instead"
                )
        if not allow_password and PASSWORD_KEY in parsed:
            raise InvalidInput(
                "the DSN contains a password; flow parameters are recorded, so put the "
                "password in PGPASSFILE (~/.pgpass) and pass the DSN without it"
            )
        return cls(tuple(parsed.items()))

    @property
    def conninfo(self) -> str:
        """The full conninfo, password included: for psycopg2 in this process only."""
        return make_dsn(**dict(self.params))

    @property
    def dbname(self) -> str:
        """The database the conninfo names ('' when it leaves the choice to libpq)."""
        return dict(self.params).get("dbname", "")

    @property
    def redacted(self) -> str:
        """The conninfo with its password masked, for logs and error messages."""
        shown = {k: ("***" if k == PASSWORD_KEY else v) for k, v in self.params}
        return make_dsn(**shown)

    @property
    def location(self) -> str:
        """``host:port/dbname`` for audit rows and reports, naming a service or
        ``hostaddr`` when that is what the conninfo gives instead of a host (and no
        port when a service file may choose it)."""
        p = dict(self.params)
        service = f"service={p['service']}" if p.get("service") else ""
        host = p.get("host") or p.get("hostaddr") or service or "localhost"
        port = p.get("port") or ("" if service else "5432")
        return f"{host}:{port}/{self.dbname}" if port else f"{host}/{self.dbname}"

    def with_dbname(self, name: str) -> ConnTarget:
        """The same server, credentials and options; another database."""
        params = dict(self.params)
        params["dbname"] = name
        return ConnTarget(tuple(params.items()))

    def _password(self) -> str | None:
        """The password psycopg2 in this process would send: the conninfo's, else the
        caller's ``PGPASSWORD`` (libpq's own order)."""
        return dict(self.params).get(PASSWORD_KEY) or os.environ.get(PASSWORD_ENV) or None

    def tool_args(self) -> list[str]:
        """``["--dbname=<conninfo without the password>"]``: one argument, whatever the
        values hold (quotes, spaces, newlines, a leading dash), quoted by libpq. When a
        password applies, the conninfo names a private passfile holding it instead."""
        shown = {k: v for k, v in self.params if k != PASSWORD_KEY}
        password = self._password()
        if password:
            shown[PASSFILE_KEY] = str(passfile_for(password))
        return [f"--dbname={make_dsn(**shown)}"]

    def tool_env(self) -> dict[str, str]:
        """The child environment: what libpq reads from ours (every ``PG*`` variable but
        ``PGPASSWORD``, ``HOME`` for ``~/.pgpass`` and ``~/.pg_service.conf``, locale), so
        inherited defaults apply to the tool exactly as to psycopg2 here. No secret: the
        password, if any, is in the passfile :meth:`tool_args` names."""
        return {k: v for k, v in os.environ.items() if _inherited(k)}

    def __repr__(self) -> str:
        return f"ConnTarget({self.redacted!r})"


def refuse_password_in_dsn(dsn: str) -> ConnTarget:
    """Validate a DSN given as a flow parameter or option: parsed, no password."""
    return ConnTarget.parse(dsn, allow_password=False)


def with_dbname(dsn: str, name: str) -> str:
    """For callers that hold a settings DSN as a string: the same server, another database."""
    return ConnTarget.parse(dsn, allow_password=True).with_dbname(name).conninfo


def dbname_of(dsn: str) -> str:
    """For callers that hold a settings DSN as a string: the database it names."""
    return ConnTarget.parse(dsn, allow_password=True).dbname
