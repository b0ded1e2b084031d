"""Tier 1: a streaming standby of the primary, its lag, the failover and the fence.

A standby is made the PostgreSQL 15 way: ``pg_basebackup -R -X stream -S <slot> -C``
copies the primary onto the standby's cluster handle with a physical replication slot of
its own (the primary keeps the WAL the standby has not received, so a slow standby never
falls off the end), and ``-R`` writes ``standby.signal`` and ``primary_conninfo``. The
password ``-R`` would write into ``postgresql.auto.conf`` goes instead into a passfile
beside the data directory, mode 600, owned by the server's OS user.

The failover stops the old primary first (a fast shutdown also hands the standby its last
WAL), fences it, then promotes the standby. The fence is two things:

- ``standby.signal`` plus ``primary_conninfo`` to the new primary in the old data
  directory: whoever starts it afterwards (pg_ctl, systemctl, a reboot) gets a read-only
  server in recovery, never a second primary. PostgreSQL itself enforces this, which a
  renamed directory does not (an operator renames it back, a unit file points at it);
  bringing it back as a standby is then ``pg_rewind`` and a start
  (:mod:`wedefi_dr.physical.rejoin`).
- a marker file, :data:`FENCE_MARKER`, saying when, why and who is primary now, which
  :meth:`ClusterHandle.start` (and so the local stack and PITR) refuses to start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wedefi_dr.config import Settings
from wedefi_dr.errors import DRError, InvalidInput
from wedefi_dr.postgres.cluster import (
    FENCE_MARKER,
    ClusterHandle,
    chown_to,
    cluster_handle,
    conf_quote,
    read_clusters,
)
from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.postgres.primary import primary_dsn
from wedefi_dr.postgres.tools import connect
from wedefi_dr.storage.secretfiles import replace_secret_file

log = logging.getLogger(__name__)

SLOT_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
PASSFILE_NAME = "replication.pgpass"
STREAM_WAIT_SECONDS = 60.0


class StandbyFailed(DRError):
    """Provisioning, streaming or promoting the standby did not work; the reason follows."""


def validate_slot(slot: str) -> str:
    """A replication slot name as PostgreSQL accepts it (lower case, digits, ``_``)."""
    slot = (slot or "").strip()
    if not SLOT_RE.match(slot):
        raise InvalidInput(
            f"replication slot {slot!r}: lower-case letters, digits and '_' only (max 63)"
        )
    return slot


def _give_tree(root: Path, os_user: str) -> None:
    """The whole data directory to the server's OS user (we may have copied it as root)."""
    chown_to(root, os_user)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            chown_to(Path(dirpath) / name, os_user)


def _conninfo_fields(conninfo: str) -> dict[str, str]:
    """``key=value`` pairs of a libpq conninfo as ``pg_basebackup -R`` writes it."""
    fields: dict[str, str] = {}
    for m in re.finditer(r"(\w+)=('(?:[^'\\]|\\.|'')*'|\S+)", conninfo):
        value = m.group(2)
        if value.startswith("'"):
            value = value[1:-1].replace("\\'", "'").replace("''", "'").replace("\\\\", "\\")
        fields[m.group(1)] = value
    return fields


def _libpq_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def replication_conninfo(upstream: ClusterHandle, passfile: Path, app_name: str) -> str:
    """``primary_conninfo`` to ``upstream``, the password in ``passfile`` (not in the conf)."""
    parts = {
        "host": upstream.host,
        "port": str(upstream.port),
        "user": upstream.superuser,
        "passfile": str(passfile),
        "application_name": app_name,
        "sslmode": "prefer",
    }
    return " ".join(f"{k}={_libpq_quote(v)}" for k, v in parts.items())


def _write_passfile(path: Path, upstream: ClusterHandle, password: str, os_user: str) -> None:
    line = ""
    if password:
        esc = password.replace("\\", "\\\\").replace(":", "\\:")
        line = f"{upstream.host}:{upstream.port}:*:{upstream.superuser}:{esc}\n"
    replace_secret_file(path.parent, path.name, line)  # never written through a wider mode
    chown_to(path, os_user)


def _passfile_password(path: Path) -> str:
    """The password of a one-line passfile this module wrote ('' when there is none)."""
    try:
        line = path.read_text().splitlines()[0]
    except (OSError, IndexError):
        return ""
    fields = re.split(r"(?<!\\):", line, maxsplit=4)
    return fields[4].replace("\\:", ":").replace("\\\\", "\\") if len(fields) == 5 else ""


def passfile_to(new_primary: ClusterHandle, old: ClusterHandle) -> Path:
    """``old``'s passfile for streaming from (or rewinding onto) ``new_primary``, which was
    its standby. The new primary's superuser password is the old one's (the base backup
    copied pg_authid): the passfile the standby streamed with, keyed for the new address."""
    passfile = old.home / PASSFILE_NAME
    _write_passfile(
        passfile, new_primary, _passfile_password(new_primary.home / PASSFILE_NAME), old.os_user
    )
    return passfile


def pgpass_lookup(cluster: ClusterHandle) -> str:
    """The superuser's password for ``cluster`` as libpq would find it (``PGPASSFILE``,
    else ``~/.pgpass``), for the standby's own passfile; '' when there is none."""
    path = Path(os.environ.get("PGPASSFILE") or Path.home() / ".pgpass")
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return ""
    wanted = (cluster.host, str(cluster.port), "replication", cluster.superuser)
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        fields = [
            f.replace("\\:", ":").replace("\\\\", "\\")
            for f in re.split(r"(?<!\\):", line, maxsplit=4)
        ]
        if len(fields) == 5 and all(f in ("*", w) for f, w in zip(fields[:4], wanted, strict=True)):
            return fields[4]
    return ""


def _append_auto_conf(data_dir: Path, note: str, settings: dict[str, str]) -> None:
    """Appended to ``postgresql.auto.conf``: it wins over ``postgresql.conf`` and over the
    primary's own ``ALTER SYSTEM`` values copied with the base backup."""
    lines = [f"\n# --- {note} ---"]
    lines += [f"{key} = {conf_quote(value)}" for key, value in settings.items()]
    with (data_dir / "postgresql.auto.conf").open("a") as f:
        f.write("\n".join(lines) + "\n")


def _strip_generated_conninfo(data_dir: Path) -> str:
    """Remove the ``primary_conninfo`` line ``-R`` wrote; returns the password it held."""
    auto = data_dir / "postgresql.auto.conf"
    keep, password = [], ""
    for line in auto.read_text().splitlines():
        if line.startswith("primary_conninfo"):
            raw = line.split("=", 1)[1].strip()
            fields = _conninfo_fields(raw[1:-1].replace("''", "'"))
            password = fields.get("password", "")
            continue
        keep.append(line)
    auto.write_text("\n".join(keep) + "\n")
    return password


def write_standby_settings(
    primary: ClusterHandle,
    standby: ClusterHandle,
    passfile: Path,
    slot: str,
    archive_command: str | None,
) -> None:
    """``standby``'s own identity (port, sockets, name) and its streaming from ``primary``
    appended to ``postgresql.auto.conf``, after whatever a copy of the primary brought
    along (pg_basebackup and pg_rewind both copy the primary's configuration files).

    ``wal_log_hints=on``: the day this standby is promoted and its old primary rejoins,
    or the day it is itself the old primary, ``pg_rewind`` needs hint-bit changes in the
    WAL; a cluster with data checksums logs them anyway, one without would be refused.
    """
    settings = {
        "primary_conninfo": replication_conninfo(primary, passfile, standby.name),
        "primary_slot_name": slot,
        "port": str(standby.port),
        "listen_addresses": standby.host,
        "unix_socket_directories": str(standby.sockets),
        "cluster_name": standby.name,
        "hot_standby": "on",
        "wal_log_hints": "on",
        "archive_mode": "on" if archive_command else "off",
    }
    if archive_command:
        settings["archive_command"] = archive_command
    _append_auto_conf(standby.data_dir, f"standby of {primary.name} by wedefi-dr", settings)
    signal = standby.data_dir / "standby.signal"
    signal.touch()
    standby.give(signal)
    for leftover in ("postmaster.pid", "postmaster.opts"):
        (standby.data_dir / leftover).unlink(missing_ok=True)


def provision(
    primary: ClusterHandle,
    standby: ClusterHandle,
    slot: str,
    *,
    archive_command: str | None = None,
    timeout: float = 3600,
) -> dict[str, Any]:
    """Copy ``primary`` onto ``standby``'s empty data directory as a streaming standby.

    ``archive_command`` is what the standby will archive with once promoted (PostgreSQL
    does not archive in recovery with ``archive_mode=on``); None keeps archiving off.
    Refused before anything when the standby's directory holds a cluster or is fenced.
    """
    slot = validate_slot(slot)
    if standby.data_dir.resolve() == primary.data_dir.resolve():
        raise InvalidInput("the standby's data directory is the primary's: refused")
    if standby.initialized() or (standby.data_dir / FENCE_MARKER).exists():
        raise InvalidInput(
            f"{standby.data_dir} already holds a cluster: a standby is provisioned into an "
            "empty directory (remove it, or rejoin an old primary with pg_rewind)"
        )
    standby.home.mkdir(parents=True, exist_ok=True)
    standby.give(standby.home)
    if standby.data_dir.exists():
        if any(standby.data_dir.iterdir()):
            raise InvalidInput(f"{standby.data_dir} is not empty: refused")
        standby.data_dir.rmdir()  # pg_basebackup creates it with mode 700
    t0 = time.monotonic()
    argv = [
        standby.tool("pg_basebackup"),
        "-h",
        primary.host,
        "-p",
        str(primary.port),
        "-U",
        primary.superuser,
        "-D",
        str(standby.data_dir),
        "-R",
        "-X",
        "stream",
        "-S",
        slot,
        "-C",
        "--checkpoint=fast",
        "--no-password",
    ]
    env = ConnTarget.parse(
        primary.dsn(), allow_password=False
    ).tool_env()  # libpq's variables, none of ours
    result = subprocess.run(argv, capture_output=True, text=True, cwd="/", timeout=timeout, env=env)
    if result.returncode != 0:
        raise StandbyFailed(
            f"pg_basebackup from {primary.name} exited {result.returncode}: "
            f"{result.stderr.strip()[-800:]}"
        )
    copied = time.monotonic() - t0
    password = _strip_generated_conninfo(standby.data_dir) or pgpass_lookup(primary)
    passfile = standby.home / PASSFILE_NAME
    _write_passfile(passfile, primary, password, standby.os_user)
    write_standby_settings(primary, standby, passfile, slot, archive_command)
    _give_tree(standby.data_dir, standby.os_user)
    standby.start(wait=True)
    return {"slot": slot, "copy_seconds": round(copied, 3), "passfile": str(passfile)}


def replication_status(primary: ClusterHandle, standby: ClusterHandle, slot: str) -> dict[str, Any]:
    """What the primary says of the standby on ``slot`` and what the standby says of itself.

    ``lag_bytes`` is the primary's current WAL position minus what the standby replayed
    (the plan's replication_lag_bytes); ``state`` is None when no walsender serves the slot.
    """
    with connect(primary.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT r.state, r.sent_lsn::text, r.replay_lsn::text,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), r.replay_lsn)::bigint,"
            " r.sync_state, r.application_name"
            " FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid"
            " WHERE s.slot_name = %s",
            (slot,),
        )
        row = cur.fetchone()
    with connect(standby.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text")
        in_recovery, standby_replay = cur.fetchone()
    state, sent, replay, lag, sync, app = row or (None, None, None, None, None, None)
    return {
        "state": state,
        "sent_lsn": sent,
        "replay_lsn": replay or standby_replay,
        "lag_bytes": int(lag) if lag is not None else None,
        "sync_state": sync,
        "application_name": app,
        "standby_in_recovery": bool(in_recovery),
    }


def wait_streaming(
    primary: ClusterHandle,
    standby: ClusterHandle,
    slot: str,
    timeout: float = STREAM_WAIT_SECONDS,
) -> dict[str, Any]:
    """Poll until the primary shows the standby ``streaming``, the standby is in recovery
    and has reported a replay position (so the lag is known); StandbyFailed with the
    standby's log when it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            status = replication_status(primary, standby, slot)
        except DRError:
            status = {}
        if (
            status.get("state") == "streaming"
            and status.get("standby_in_recovery")
            and status.get("lag_bytes") is not None
        ):
            return status
        time.sleep(0.3)
    raise StandbyFailed(
        f"standby {standby.name} is not streaming on slot {slot} after {timeout:.0f} s "
        f"(last seen: {status or 'unreachable'}); its log: {_log_tail(standby)}"
    )


def _log_tail(cluster: ClusterHandle, lines: int = 6) -> str:
    try:
        text = cluster.log.read_text(errors="replace").splitlines()
    except OSError:
        return "(no server log)"
    return " | ".join(text[-lines:])


def in_recovery(cluster: ClusterHandle) -> bool:
    """The running server's own word: a standby (or a recovering copy) or not."""
    with connect(cluster.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery()")
        return bool(cur.fetchone()[0])


def check_is_standby(standby: ClusterHandle) -> None:
    """Refuse a failover onto a server that is not a running standby."""
    if not in_recovery(standby):
        raise InvalidInput(
            f"cluster {standby.name} is not in recovery: it is no standby to promote"
        )


def configure_archiving(standby: ClusterHandle, archive_command: str) -> None:
    """``archive_mode=on`` and the production ``archive_command`` on the standby before its
    promotion, so the new timeline's history file and segments reach the archive."""
    with connect(standby.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SHOW archive_mode")
        mode = cur.fetchone()[0]
        cur.execute("ALTER SYSTEM SET archive_command = %s", (archive_command,))
        if mode != "on":
            cur.execute("ALTER SYSTEM SET archive_mode = 'on'")
        cur.execute("SELECT pg_reload_conf()")
    if mode != "on":  # archive_mode needs a restart; still a standby, so nothing is lost
        standby.stop()
        standby.start(wait=True)


def promote(standby: ClusterHandle) -> dict[str, Any]:
    """``pg_promote()``; proof it worked: not in recovery, writable, its new timeline."""
    with connect(standby.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_promote(wait => true, wait_seconds => 120)")
        if not cur.fetchone()[0]:
            raise StandbyFailed(f"pg_promote() on {standby.name} did not finish within 120 s")
        cur.execute(
            "SELECT pg_is_in_recovery(), current_setting('transaction_read_only'),"
            " substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8), pg_current_wal_lsn()::text"
        )
        in_recovery, read_only, tli, lsn = cur.fetchone()
        if in_recovery or read_only == "on":
            raise StandbyFailed(f"{standby.name} is still read-only after pg_promote()")
        # The promotion's first segment of the new timeline goes to the archive now rather
        # than after archive_timeout: the archive is on the new timeline at once.
        cur.execute("SELECT pg_switch_wal()::text")
    return {"timeline": int(tli, 16), "promoted_at_lsn": lsn, "in_recovery": False}


def fence(old: ClusterHandle, new_primary: ClusterHandle, *, reason: str) -> dict[str, Any]:
    """Stop ``old`` if it runs and fence its data directory (see the module docstring).

    Returns what was done; a data directory out of reach (another host's disk) is named,
    so the operator fences it before that host comes back.
    """
    was_running = False
    stopped = "not running"
    try:
        was_running = old.is_running()
        if was_running:
            old.stop("fast")
            stopped = "stopped (fast shutdown)"
    except DRError as exc:
        stopped = f"could not be stopped: {exc}"
    data = old.data_dir
    if not old.initialized():
        return {
            "old_primary": old.name,
            "stopped": stopped,
            "fenced": False,
            "note": f"{data} is not reachable from here: fence it before its host comes back",
        }
    passfile = passfile_to(new_primary, old)
    (data / "standby.signal").write_text("")
    old.give(data / "standby.signal")
    _append_auto_conf(
        data,
        f"fenced by wedefi-dr failover to {new_primary.name}",
        {"primary_conninfo": replication_conninfo(new_primary, passfile, old.name)},
    )
    marker = {
        "fenced_at": datetime.now(UTC).isoformat(),
        "reason": reason,
        "new_primary": f"{new_primary.name} ({new_primary.host}:{new_primary.port})",
        "rejoin": (
            f"wedefi-dr standby rejoin --old-primary {old.name} --new-primary "
            f"{new_primary.name} (pg_rewind, its WAL kept; wedefi_dr.physical.rejoin)"
        ),
    }
    (data / FENCE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    old.give(data / FENCE_MARKER)
    return {
        "old_primary": old.name,
        "stopped": stopped,
        "fenced": True,
        "marker": str(data / FENCE_MARKER),
    }


def unfence(old: ClusterHandle, *, restart: bool) -> str:
    """Undo :func:`fence` when the promotion failed: the old primary is the only one
    there is, so its marker and ``standby.signal`` go and it starts again if it ran."""
    (old.data_dir / FENCE_MARKER).unlink(missing_ok=True)
    (old.data_dir / "standby.signal").unlink(missing_ok=True)
    if restart:
        old.start(wait=True)
        return f"the old primary {old.name} was unfenced and started again"
    return f"the old primary {old.name} was unfenced (it was not running)"


def drop_slot(primary: ClusterHandle, slot: str) -> bool:
    """Drop ``slot`` on ``primary`` if it exists and is inactive (a removed standby's slot
    would keep WAL on the primary forever)."""
    with connect(primary.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE slot_name = %s AND NOT active",
            (slot,),
        )
        return cur.rowcount > 0


def backup_source(settings: Settings) -> str:
    """The DSN a base backup reads from: the primary now, or, with
    ``WEDEFI_DR_BASE_BACKUP_SOURCE_CLUSTER`` set, that standby's (pgBackRest's
    backup-standby: the copy's I/O lands on the standby, not on the primary). The standby
    must have replayed WAL written with ``full_page_writes=on`` (PostgreSQL refuses
    otherwise, and says so).

    A failover promotes the standby the setting names, and the setting stays behind in
    every worker's environment. The clusters file records the promotion (the old primary's
    ``replaced_by``), so then the backup reads from a standby streaming from the promoted
    cluster (the rejoined old primary), else from the promoted cluster itself, and says so: the
    scheduled base backup after a failover still runs. A named cluster that is not in
    recovery and was not promoted is a mistake in the setting, and is refused."""
    name = settings.base_backup_source_cluster
    if not name:
        return primary_dsn(settings)
    source = cluster_handle(settings.clusters_file, name)
    if in_recovery(source):
        return source.dsn()
    handles = read_clusters(settings.clusters_file) if settings.clusters_file else {}
    if not any(h.replaced_by == name for h in handles.values()):
        raise InvalidInput(
            f"base_backup_source_cluster {name!r} is not a standby (not in recovery): "
            "unset it to back up the primary"
        )
    for standby in streaming_standbys(source, handles):
        log.warning(
            "base_backup_source_cluster %s was promoted by a failover: backing up %s, "
            "which streams from it",
            name,
            standby.name,
        )
        return standby.dsn()
    log.warning(
        "base_backup_source_cluster %s was promoted by a failover and no standby streams "
        "from it: backing up %s itself, the primary now",
        name,
        name,
    )
    return source.dsn()


def streaming_standbys(
    primary: ClusterHandle, handles: dict[str, ClusterHandle]
) -> list[ClusterHandle]:
    """The unfenced clusters of the file streaming from ``primary`` now (its
    ``pg_stat_replication``, by ``application_name``: each standby's cluster name), in
    recovery by their own account, sorted by name."""
    with connect(primary.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'")
        names = sorted({row[0] for row in cur.fetchall()})
    found = []
    for name in names:
        handle = handles.get(name)
        if handle is None or handle.fenced or name == primary.name:
            continue
        try:
            if in_recovery(handle):
                found.append(handle)
        except Exception as exc:  # a standby we cannot reach is no source
            log.warning("standby %s streams but cannot be reached: %s", name, exc)
    return found
