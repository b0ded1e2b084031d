"""Where the primary is now: ``WEDEFI_DR_PRIMARY_DSN`` followed through a failover.

The DSN setting lives in every worker's environment and names a server by host and port.
A failover (``flows.failover``) cannot rewrite those environments, but it does rewrite the
clusters file (:mod:`wedefi_dr.postgres.clusters_file`): the promoted cluster
``production: true``, the old one ``production: false``, ``fenced: true`` and
``replaced_by: <the promoted one>``. So every
backup, lock, probe and check of the primary reads the DSN through :func:`primary_dsn`,
which applies the file's roles to it:

- no clusters file, a DSN whose server the file does not describe, or a DSN listing
  several hosts (libpq's ``target_session_attrs`` already picks the primary among them):
  the DSN as written;
- the DSN names a production cluster: the DSN as written;
- it names a cluster a failover replaced (``replaced_by``, written with ``fenced: true`` and
  kept through the rejoin that makes it a standby): the production cluster that chain of
  failovers leads to. Following the recorded successor, rather than "the one production
  cluster", keeps a file that describes several production clusters (a fleet's hosts)
  unambiguous. The connection takes that cluster's address; every other key of the DSN
  (user, dbname, passfile, sslmode, options) is kept, so credentials and TLS rules are the
  operator's as before;
- it names a fenced cluster with no successor recorded (a file edited by hand): the one
  unfenced production cluster, if there is exactly one;
- otherwise, while the DSN names a fenced cluster or a broken chain:
  :class:`PrimaryUnresolved`, before anything connects (guessing would back up, lock or
  compare against the wrong server);
- it names an unfenced cluster that is not production and no failover replaced (another
  database's cluster, a standby, a DR target): the DSN as written, where the operator
  pointed it.

A followed DSN is logged once per process and clusters file (a warning naming both clusters:
the setting names a server that is not the primary any more).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from psycopg2.extensions import make_dsn

from wedefi_dr.errors import InvalidInput
from wedefi_dr.postgres.cluster import ClusterHandle, read_clusters
from wedefi_dr.postgres.conninfo import ConnTarget

if TYPE_CHECKING:
    from wedefi_dr.config import Settings

log = logging.getLogger(__name__)

# Names libpq resolves to this host's loopback interface: one server, however it is spelled.
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_PORT = 5432


class PrimaryUnresolved(InvalidInput):
    """The DSN names a cluster that is no longer the primary, and the clusters file does
    not say which one is."""


@dataclass(frozen=True)
class Primary:
    """The DSN to connect to the primary with, and which cluster of the file that is."""

    dsn: str = field(repr=False)
    # The clusters-file name of the server the DSN reaches (None: not described there).
    cluster: str | None = None
    # The cluster the setting names, when the DSN was moved away from it.
    followed_from: str | None = None
    # Why it was moved, and where to (``host:port``): for the note.
    why: str = ""
    address: str = ""

    @property
    def followed(self) -> bool:
        return self.followed_from is not None

    @property
    def note(self) -> str:
        """One line for the log and the operator (cluster names and addresses only)."""
        if not self.followed:
            return ""
        return (
            f"WEDEFI_DR_PRIMARY_DSN names cluster {self.followed_from} ({self.why}): "
            f"connecting to the production cluster {self.cluster} at {self.address} instead"
        )


def _address(params: dict[str, str]) -> tuple[str, int] | None:
    """The one host and port libpq would connect to, or None when that is not one known
    server (several hosts, a service file, the compiled-in default socket)."""
    host = (
        params.get("hostaddr")
        or params.get("host")
        or os.environ.get("PGHOSTADDR")
        or os.environ.get("PGHOST")
    )
    port = params.get("port") or os.environ.get("PGPORT") or str(DEFAULT_PORT)
    if not host or "," in host or "," in port or (params.get("service") and "host" not in params):
        return None
    try:
        return host, int(port)
    except ValueError:
        return None


def _is_socket(host: str) -> bool:
    return host.startswith(("/", "@"))


def _same_host(host: str, cluster: ClusterHandle) -> bool:
    if _is_socket(host):
        return Path(host) == cluster.sockets
    if host in LOOPBACK and cluster.host in LOOPBACK:
        return True
    return host == cluster.host


def _moved(params: dict[str, str], host: str, to: ClusterHandle) -> str:
    """The DSN with ``to``'s address (a socket directory for a socket, as before)."""
    moved = {k: v for k, v in params.items() if k != "hostaddr"}
    moved["host"] = str(to.sockets) if _is_socket(host) else to.host
    moved["port"] = str(to.port)
    return make_dsn(**moved)


def _distinct(handles: list[ClusterHandle]) -> list[ClusterHandle]:
    """One handle per data directory (a second name for the same files is the same cluster)."""
    seen: dict[Path, ClusterHandle] = {}
    for h in sorted(handles, key=lambda h: h.name):
        seen.setdefault(h.data_dir.resolve(), h)
    return list(seen.values())


def _successor(
    named: list[ClusterHandle], handles: dict[str, ClusterHandle]
) -> ClusterHandle | None:
    """The production cluster the failovers recorded in ``replaced_by`` lead to from
    ``named``, or None when none recorded one; refused when the chain is broken."""
    at = next((h for h in named if h.replaced_by), None)
    if at is None:
        return None
    chain = [at.name]
    while at.replaced_by:
        if at.replaced_by not in handles or at.replaced_by in chain:
            raise PrimaryUnresolved(
                f"the clusters file's replaced_by chain {' -> '.join(chain)} -> "
                f"{at.replaced_by} is broken (an undescribed cluster, or a loop): fix "
                "replaced_by there, or point WEDEFI_DR_PRIMARY_DSN at the primary"
            )
        at = handles[at.replaced_by]
        chain.append(at.name)
        if at.production and not at.fenced:
            return at
    raise PrimaryUnresolved(
        f"WEDEFI_DR_PRIMARY_DSN names cluster {chain[0]}, replaced by a failover "
        f"({' -> '.join(chain)}), and {at.name} is not an unfenced production cluster: mark "
        "the primary `production: true` in the clusters file, or point "
        "WEDEFI_DR_PRIMARY_DSN at it"
    )


def _followed(
    params: dict[str, str], host: str, names: str, to: ClusterHandle, why: str
) -> Primary:
    return Primary(
        _moved(params, host, to),
        cluster=to.name,
        followed_from=names,
        why=why,
        address=f"{to.host}:{to.port}",
    )


def resolve(dsn: str, clusters_file: Path | None) -> Primary:
    """Apply the clusters file's roles to ``dsn`` (the rules are the module's docstring)."""
    if clusters_file is None:
        return Primary(dsn)
    params = dict(ConnTarget.parse(dsn, allow_password=True).params)
    address = _address(params)
    if address is None:
        return Primary(dsn)
    host, port = address
    handles = read_clusters(Path(clusters_file))
    named = [h for h in handles.values() if h.port == port and _same_host(host, h)]
    if not named:
        return Primary(dsn)
    names = "/".join(sorted(h.name for h in named))
    if any(h.production and not h.fenced for h in named):
        return Primary(dsn, cluster=names)
    fenced = any(h.fenced for h in named)
    why = "fenced by a failover" if fenced else "replaced by a failover"
    successor = _successor(named, handles)
    if successor is not None:
        return _followed(params, host, names, successor, why)
    if not fenced:
        return Primary(dsn, cluster=names)
    production = _distinct([h for h in handles.values() if h.production and not h.fenced])
    if len(production) == 1:
        return _followed(params, host, names, production[0], why)
    found = ", ".join(h.name for h in production) or "none"
    raise PrimaryUnresolved(
        f"WEDEFI_DR_PRIMARY_DSN names cluster {names} ({why}) and {clusters_file} does not "
        f"name one unfenced production cluster to use instead (production: {found}): mark "
        "the primary `production: true` there, or point WEDEFI_DR_PRIMARY_DSN at it"
    )


_said: set[tuple[str, str, str]] = set()
_said_lock = threading.Lock()


def _say_once(primary: Primary, clusters_file: Path) -> None:
    key = (str(clusters_file), primary.followed_from or "", primary.cluster or "")
    with _said_lock:
        if key in _said:
            return
        _said.add(key)
    log.warning("%s", primary.note)


def current_primary(settings: Settings) -> Primary:
    """Where the protected database's primary is now (see the module docstring)."""
    settings.require("primary_dsn")
    primary = resolve(settings.primary_dsn.get_secret_value(), settings.clusters_file)
    if primary.followed and settings.clusters_file is not None:
        _say_once(primary, settings.clusters_file)
    return primary


def primary_dsn(settings: Settings) -> str:
    """The DSN of the primary now: what every reader of ``WEDEFI_DR_PRIMARY_DSN`` uses."""
    return current_primary(settings).dsn


def primary_target(settings: Settings) -> ConnTarget:
    """:func:`primary_dsn`, parsed once for the tools."""
    return ConnTarget.parse(primary_dsn(settings), allow_password=True)
