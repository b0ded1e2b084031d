"""Cluster handles: where a PostgreSQL cluster lives and how its server is stopped and started.

Recovery acts on the files and the server of a cluster, so it needs more than a DSN: the
data directory, the port, the socket directory, the OS user that owns both, the binaries,
the server log, and how the server is run on that host (``pg_ctl``, or the host's own
commands such as ``systemctl start postgresql@15-main``). A :class:`ClusterHandle` holds
exactly that, and nothing secret (passwords stay in ``PGPASSFILE``).

Handles come from one place, the clusters file named by the ``WEDEFI_DR_CLUSTERS_FILE``
setting: a YAML (or JSON) mapping of cluster name to description. The local stack writes
its clusters there; on a real host the operator writes the same file, e.g.::

    primary:
      data_dir: /var/lib/postgresql/15/main
      port: 5432
      socket_dir: /var/run/postgresql
      log_file: /var/log/postgresql/postgresql-15-main.log
      start_command: [systemctl, start, postgresql@15-main]
      stop_command: [systemctl, stop, postgresql@15-main]
      production: true

``production: true`` marks the cluster whose recovery is break-glass. A description that
shares its data directory with a production one counts as production too, so a second
name for the same files cannot dodge the approval rule.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wedefi_dr.errors import DRError, InvalidInput
from wedefi_dr.postgres.tools import bindir, child_env, running_as_root

STOP_MODES = ("smart", "fast", "immediate")
# A scratch cluster's durability traded for speed (tests, local DR environments).
FAST_CONF = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
# Left in the data directory of a primary a failover replaced (wedefi_dr.physical.standby):
# starting it would make a second primary, so start() refuses while the file is there.
FENCE_MARKER = "wedefi-dr.fenced"


class UnknownCluster(InvalidInput):
    """No cluster of this name is described in the clusters file."""


class ClustersFileInvalid(InvalidInput):
    """The clusters file is missing, unreadable or describes a cluster wrongly."""


class ServerControlFailed(DRError):
    """Starting, stopping or initialising a server failed; the tool's own words follow."""


class ClusterFenced(ServerControlFailed):
    """The cluster was fenced by a failover: starting it could make a second primary."""


def conf_quote(value: str) -> str:
    """A ``postgresql.conf`` string literal."""
    return "'" + value.replace("'", "''") + "'"


def chown_to(path: Path, os_user: str = "postgres") -> None:
    """Give ``path`` to the server's OS user when we are root (the server must own its
    files and read its env files); a no-op otherwise, where we already are that user."""
    if running_as_root():
        entry = pwd.getpwnam(os_user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def free_port(taken: Collection[int] = ()) -> int:
    """A TCP port free on loopback now and not in ``taken``: ports handed out already to
    servers still starting are free to the kernel until they bind them, and it may offer
    one again (the stack once gave its Prefect server and its Pushgateway one port)."""
    held: list[socket.socket] = []
    try:
        while True:
            s = socket.socket()
            held.append(s)  # kept bound until the end, so the next bind gets another port
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in taken:
                return port
    finally:
        for s in held:
            s.close()


def os_user_kwargs(os_user: str = "postgres") -> dict[str, Any]:
    """subprocess keyword arguments that run a server binary as ``os_user`` when we are root.

    PostgreSQL refuses to run as root; as any other user we can only run as ourselves.
    """
    if not running_as_root():
        return {}
    group = pwd.getpwnam(os_user).pw_gid
    return {"user": os_user, "group": group, "extra_groups": []}


class ClusterHandle(BaseModel):
    """One PostgreSQL cluster on this host, as its description says; plain data plus the
    server operations recovery needs (no secret: the superuser's password is in PGPASSFILE).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    data_dir: Path
    port: int = Field(gt=0, lt=65536)
    # Default: the folder holding the data directory (the local stack's layout).
    socket_dir: Path | None = None
    host: str = "127.0.0.1"
    superuser: str = "postgres"
    os_user: str = "postgres"
    bindir: Path | None = None  # default: the newest PostgreSQL found on this host
    log_file: Path | None = None  # default: server.log beside the data directory
    # argv lists, run as we are (e.g. root for systemctl); empty: pg_ctl as os_user.
    start_command: list[str] = Field(default_factory=list)
    stop_command: list[str] = Field(default_factory=list)
    production: bool = False
    # Set by a failover on the old primary (its data directory carries FENCE_MARKER too),
    # cleared by the rejoin that makes it a standby again (wedefi_dr.postgres.clusters_file).
    fenced: bool = False
    # The cluster a failover promoted in this one's place: set with ``fenced``, kept through
    # the rejoin, cleared when this one is promoted again. A DSN naming this cluster leads
    # to the primary along it (wedefi_dr.postgres.primary).
    replaced_by: str | None = None

    # ---- where things are ---------------------------------------------------------------
    @property
    def home(self) -> Path:
        """The folder around the data directory: recovery keeps the old data and its WAL env
        files here, next to the data they belong to."""
        return self.data_dir.parent

    @property
    def sockets(self) -> Path:
        return self.socket_dir or self.home

    @property
    def log(self) -> Path:
        return self.log_file or self.home / "server.log"

    def tool(self, name: str) -> str:
        path = (self.bindir or bindir()) / name
        if not path.is_file():
            raise ServerControlFailed(f"{name} not found in {path.parent} (cluster {self.name})")
        return str(path)

    def dsn(self, dbname: str = "postgres", user: str | None = None) -> str:
        """A password-less DSN (as the superuser unless ``user``): libpq finds the password
        in PGPASSFILE."""
        return f"host={self.host} port={self.port} user={user or self.superuser} dbname={dbname}"

    def give(self, path: Path) -> None:
        """Make ``path`` the OS user's, as files of a data directory must be."""
        chown_to(path, self.os_user)

    # ---- the server ---------------------------------------------------------------------
    def _run(self, argv: list[str], *, as_os_user: bool, timeout: float = 300) -> None:
        """``argv`` with :func:`child_env` only: a server started with our environment
        would hand our secrets to every backend, archive_command and restore_command."""
        kwargs = os_user_kwargs(self.os_user) if as_os_user else {}
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            cwd="/",
            timeout=timeout,
            env=child_env(),
            **kwargs,
        )
        if result.returncode != 0:
            raise ServerControlFailed(
                f"cluster {self.name}: {Path(argv[0]).name} exited {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()[-800:]}"
            )

    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def is_running(self) -> bool:
        """``pg_ctl status`` (whoever started the server: it reads postmaster.pid)."""
        if not self.initialized():
            return False
        status = subprocess.run(
            [self.tool("pg_ctl"), "-D", str(self.data_dir), "status"],
            capture_output=True,
            cwd="/",
            timeout=60,
            env=child_env(),
            **os_user_kwargs(self.os_user),
        )
        return status.returncode == 0

    def pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError, PermissionError):
            return None

    def start(self, wait: bool = True, timeout: int = 60) -> None:
        """Start the server; ``wait`` False returns at once (recovery replay may outlast any
        fixed timeout, so the caller polls instead). A fenced cluster is refused."""
        self.refuse_if_fenced()
        if self.start_command:
            self._run(self.start_command, as_os_user=False)
        else:
            self._run(
                [
                    self.tool("pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log),
                    *(["-w", "-t", str(timeout)] if wait else ["-W"]),
                    "-o",
                    f"-p {self.port}",
                    "start",
                ],
                as_os_user=True,
                timeout=timeout + 30,
            )
        if wait and self.start_command:
            self._wait_running(timeout)

    def refuse_if_fenced(self) -> None:
        """:class:`ClusterFenced` with the marker's words when a failover fenced this one."""
        marker = self.data_dir / FENCE_MARKER
        if marker.exists():
            try:
                why = " ".join(marker.read_text().split())[:400]
            except OSError:
                why = "(marker unreadable)"
            raise ClusterFenced(
                f"cluster {self.name} was fenced by a failover and is not started: {why}"
            )

    def _wait_running(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_running():
            if time.monotonic() > deadline:
                raise ServerControlFailed(f"cluster {self.name} not running {timeout:.0f} s in")
            time.sleep(0.3)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server if it runs; ``mode`` is pg_ctl's (a configured stop command
        decides its own)."""
        if mode not in STOP_MODES:
            raise InvalidInput(f"stop mode must be one of {STOP_MODES}, not {mode!r}")
        if not self.is_running():
            return
        if self.stop_command:
            self._run(self.stop_command, as_os_user=False)
            return
        self._run(
            [self.tool("pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"],
            as_os_user=True,
        )

    # ---- scratch clusters ---------------------------------------------------------------
    def initdb(
        self, password: str, conf: Mapping[str, str] | None = None, *, fast: bool = False
    ) -> None:
        """A new cluster in ``data_dir``: data checksums, scram authentication with
        ``password`` for the superuser, UTC, ``wal_level=replica``, listening on ``host``
        and ``socket_dir`` only; ``conf`` (values as written in postgresql.conf) last."""
        if self.initialized():
            raise ServerControlFailed(f"{self.data_dir} already holds a cluster")
        self.home.mkdir(parents=True, exist_ok=True)
        self.give(self.home)
        pwfile = self.home / ".pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        self.give(pwfile)
        try:
            self._run(
                [
                    self.tool("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self.superuser,
                    "--data-checksums",
                    "--auth-local=scram-sha-256",
                    "--auth-host=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ],
                as_os_user=True,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        settings = {
            "listen_addresses": conf_quote(self.host),
            "port": str(self.port),
            "unix_socket_directories": conf_quote(str(self.sockets)),
            "wal_level": "replica",
            "max_wal_senders": "10",
            "timezone": "'UTC'",
            "log_timezone": "'UTC'",
            **(FAST_CONF if fast else {}),
            **(conf or {}),
        }
        with (self.data_dir / "postgresql.conf").open("a") as f:
            f.write("\n# --- written by wedefi-dr initdb ---\n")
            f.writelines(f"{key} = {value}\n" for key, value in settings.items())


# ---- the clusters file -------------------------------------------------------------------
def read_clusters(path: Path) -> dict[str, ClusterHandle]:
    """Every cluster the file describes, by name; refuses a malformed file with the reason."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ClustersFileInvalid(f"clusters file {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ClustersFileInvalid(f"clusters file {path}: expected a mapping of name -> cluster")
    handles: dict[str, ClusterHandle] = {}
    for name, description in raw.items():
        if not isinstance(description, dict):
            raise ClustersFileInvalid(f"clusters file {path}: {name!r} is not a mapping")
        try:
            handles[str(name)] = ClusterHandle.model_validate({**description, "name": name})
        except ValidationError as exc:
            reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ClustersFileInvalid(
                f"clusters file {path}, cluster {name!r}: {reasons}"
            ) from None
    production_dirs = {h.data_dir.resolve() for h in handles.values() if h.production}
    return {
        name: h.model_copy(update={"production": h.data_dir.resolve() in production_dirs})
        for name, h in handles.items()
    }


def write_clusters(path: Path, handles: Mapping[str, ClusterHandle]) -> None:
    """The clusters file as the local stack writes it (JSON, which YAML readers accept)."""
    import json

    body = {
        name: h.model_dump(mode="json", exclude={"name"}, exclude_defaults=True)
        for name, h in sorted(handles.items())
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.replace(path)


def cluster_handle(clusters_file: Path | None, name: str) -> ClusterHandle:
    """The handle named ``name``; refused before any side effect when it is not described."""
    if clusters_file is None:
        raise UnknownCluster(
            f"cluster {name!r}: no clusters file is configured (set WEDEFI_DR_CLUSTERS_FILE; "
            'for the local stack: eval "$(wedefi-dr stack env)")'
        )
    handles = read_clusters(clusters_file)
    if name not in handles:
        raise UnknownCluster(
            f"cluster {name!r} is not described in {clusters_file}; "
            f"described: {', '.join(sorted(handles)) or 'none'}"
        )
    return handles[name]
