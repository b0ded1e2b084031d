"""The fenced old primary back as a streaming standby of the new one (``pg_rewind``).

After a failover the old primary's data directory is fenced (:mod:`wedefi_dr.physical.
standby`): ``standby.signal``, a ``primary_conninfo`` to the new primary and the marker
:data:`FENCE_MARKER`. Its WAL may hold a tail the new primary never received (a standby
that lagged when the old primary stopped), so it cannot simply stream: ``pg_rewind`` first
puts it back on the new primary's timeline by copying the blocks that changed since the
two diverged.

``pg_rewind`` discards that divergent tail, and nothing is lost, ever: before it runs,
every segment the old server had marked ``.ready`` goes to the archive with ``wal-push``'s
rules, and every segment the archive is not known to hold (no ``.done``), up to the end of
the old server's WAL, is copied aside into the cluster's home folder, named in the report.

``pg_rewind`` needs the old cluster to have logged hint-bit changes (data checksums, or
``wal_log_hints=on``; the standby flow writes the latter), a clean shutdown and the WAL
back to the last common checkpoint. When it cannot, the old directory is moved aside
(still fenced) and a fresh ``pg_basebackup`` re-provisions the standby, and the report
says why.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wedefi_dr.config import Settings
from wedefi_dr.errors import DRError, InvalidInput
from wedefi_dr.physical import standby, wal
from wedefi_dr.physical.pitr.recovery import backup_label_start, move_aside, push_unarchived
from wedefi_dr.physical.walnames import lsn_to_int, segment_file, segment_number, segment_of
from wedefi_dr.postgres.cluster import FENCE_MARKER, ClusterHandle, chown_to, os_user_kwargs
from wedefi_dr.postgres.tools import child_env, connect

CLEAN_STATES = ("shut down", "shut down in recovery")


class RewindFailed(DRError):
    """pg_rewind exited non-zero; its own words follow."""


def controldata(cluster: ClusterHandle) -> dict[str, str]:
    """``pg_controldata`` of a stopped cluster as ``{field: value}``."""
    result = subprocess.run(
        [cluster.tool("pg_controldata"), "-D", str(cluster.data_dir)],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
        env={**child_env(), "LC_ALL": "C"},
        **os_user_kwargs(cluster.os_user),
    )
    if result.returncode != 0:
        raise InvalidInput(
            f"pg_controldata of {cluster.name} exited {result.returncode}: "
            f"{result.stderr.strip()[-400:]}"
        )
    fields = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def rewindable(control: dict[str, str]) -> str | None:
    """None when pg_rewind can work on this cluster (its hint-bit changes are in the WAL),
    else why not. The source's ``full_page_writes=on`` is checked on the server."""
    if control.get("Data page checksum version", "0") != "0":
        return None
    if control.get("wal_log_hints setting") == "on":
        return None
    return "the old primary has neither data checksums nor wal_log_hints=on"


def check_request(old: ClusterHandle, new_primary: ClusterHandle, slot: str) -> dict[str, Any]:
    """Every refusal before anything changes: the old primary fenced, stopped cleanly and a
    copy of the same cluster as the new primary; the new primary running, writable and its
    slot for the old one not in use. Returns what the rewind step needs to know."""
    if not old.initialized():
        raise InvalidInput(f"cluster {old.name} holds no data directory at {old.data_dir}")
    if not (old.data_dir / FENCE_MARKER).exists():
        raise InvalidInput(
            f"cluster {old.name} is not fenced ({old.data_dir / FENCE_MARKER} is missing): "
            "rejoin only rewinds an old primary a failover fenced"
        )
    if old.is_running():
        raise InvalidInput(f"cluster {old.name} is running: stop it before it is rewound")
    control = controldata(old)
    state = control.get("Database cluster state", "?")
    if state not in CLEAN_STATES:
        raise InvalidInput(
            f"cluster {old.name} was not stopped cleanly (state: {state}): start it once as "
            "the standby its fence makes it (pg_ctl start; standby.signal keeps it read-only), "
            "stop it, and rejoin again"
        )
    if not new_primary.is_running():
        raise InvalidInput(f"the new primary {new_primary.name} is not running")
    with connect(new_primary.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT pg_is_in_recovery(), (SELECT system_identifier FROM pg_control_system()),"
            " (SELECT active FROM pg_replication_slots WHERE slot_name = %s),"
            " current_setting('full_page_writes')",
            (slot,),
        )
        in_recovery, system_id, slot_active, full_page_writes = cur.fetchone()
    if in_recovery:
        raise InvalidInput(f"{new_primary.name} is in recovery: it is no primary to rejoin")
    if str(system_id) != control.get("Database system identifier"):
        raise InvalidInput(
            f"{old.name} and {new_primary.name} are not copies of one cluster (system "
            f"identifiers {control.get('Database system identifier')} and {system_id})"
        )
    if slot_active:
        raise InvalidInput(f"slot {slot} on {new_primary.name} is in use by another standby")
    return {
        "state": state,
        "timeline": int(control.get("Latest checkpoint's TimeLineID", "1")),
        "end_lsn": control.get("Latest checkpoint location", "0/0"),
        "segment_bytes": int(control.get("Bytes per WAL segment", str(16 * 2**20))),
        "not_rewindable": rewindable(control)
        or (
            None
            if full_page_writes == "on"
            else f"the new primary {new_primary.name} runs with full_page_writes=off"
        ),
    }


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def keep_wal(settings: Settings, old: ClusterHandle, request: dict[str, Any]) -> dict[str, Any]:
    """Before pg_rewind discards anything: ``.ready`` segments to the archive, and every
    segment up to the end of the old WAL that the archive is not known to hold copied into
    ``<home>/wal-kept-<stamp>`` (both named in the result)."""
    pushed = push_unarchived(settings, old.data_dir)
    wal_dir = old.data_dir / "pg_wal"
    last = segment_of(request["timeline"], request["end_lsn"], request["segment_bytes"])
    done = {p.name[: -len(".done")] for p in (wal_dir / "archive_status").glob("*.done")}
    candidates = sorted(
        p
        for p in wal_dir.iterdir()
        if p.is_file() and len(p.name) == 24 and p.name <= last and p.name not in done
    )
    aside = old.home / f"wal-kept-{_stamp()}"
    if candidates:
        aside.mkdir()
        for path in candidates:
            shutil.copy2(path, aside / path.name)
    return {
        "pushed": pushed["pushed"],
        "not_pushed": pushed["kept"],
        "copied_aside": [p.name for p in candidates],
        "aside": str(aside) if candidates else None,
    }


def ensure_slot(new_primary: ClusterHandle, slot: str) -> None:
    """A physical slot on the new primary reserving WAL from now on for the rejoined one."""
    with connect(new_primary.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT pg_create_physical_replication_slot(%s, true)"
            " WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s)",
            (slot, slot),
        )


def pg_rewind(old: ClusterHandle, new_primary: ClusterHandle, *, timeout: float) -> dict[str, Any]:
    """``pg_rewind --target-pgdata --source-server`` as the server's OS user, the
    password in the passfile the conninfo names (never in argv or the environment)."""
    passfile = standby.passfile_to(new_primary, old)
    source = (
        f"host={new_primary.host} port={new_primary.port} user={new_primary.superuser} "
        f"dbname=postgres passfile={passfile} connect_timeout=10"
    )
    result = subprocess.run(
        [
            old.tool("pg_rewind"),
            f"--target-pgdata={old.data_dir}",
            f"--source-server={source}",
            "--progress",
        ],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=timeout,
        env={**child_env(), "LC_ALL": "C"},
        **os_user_kwargs(old.os_user),
    )
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        raise RewindFailed(f"pg_rewind exited {result.returncode}: {output[-800:]}")
    diverged = next((line for line in output.splitlines() if "diverged at" in line), None)
    return {"method": "pg_rewind", "diverged": diverged}


def timeline_begins(history: str, timeline: int) -> dict[int, int]:
    """``{timeline: position where it began}`` for ``timeline`` and its ancestors, from its
    history file (one line per ancestor: its id and the position where it was left)."""
    begins, start = {}, 0
    for fields in (line.split() for line in history.splitlines()):
        if len(fields) >= 2 and fields[0].isdigit():
            begins[int(fields[0])] = start
            start = lsn_to_int(fields[1])
    begins[timeline] = start
    return begins


def segment_timeline(begins: dict[int, int], segno: int, segment_bytes: int) -> int:
    """The timeline whose file holds segment ``segno`` on the way to the newest one: the
    newest timeline that began at or before that segment (as the server picks a file)."""
    return max(t for t, at in begins.items() if at // segment_bytes <= segno)


def _replay_start(data_dir: Path, control: dict[str, str]) -> int:
    """Where the rewound cluster's recovery begins: pg_rewind's ``backup_label`` when it
    wrote one, else the last checkpoint's redo position."""
    start = backup_label_start(data_dir)
    return start[0] if start else lsn_to_int(control["Latest checkpoint's REDO location"])


def complete_new_timeline_wal(
    settings: Settings, old: ClusterHandle, new_primary: ClusterHandle, slot: str
) -> dict[str, list[str]]:
    """Every segment the rewound cluster replays before streaming can take over, under the
    new primary's timeline, in its ``pg_wal``; the old timeline's divergent files there
    removed (``keep_wal`` pushed or copied them aside first).

    pg_rewind copies only the WAL the new primary still holds. A busy new primary has
    archived and recycled the segment where its timeline began, and then the rewound
    cluster would replay its own divergent copy of that segment past the fork point and
    never match the stream. Segments from the slot's reserved position on are streamed;
    the ones before it come from the archive when the new primary no longer has them.
    """
    with connect(new_primary.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        # The timeline WAL is written on now (the last checkpoint's lags a fresh promotion).
        cur.execute("SELECT ('x' || left(pg_walfile_name(pg_current_wal_lsn()), 8))::bit(32)::int")
        (timeline,) = cur.fetchone()
        name = f"{timeline:08X}.history"
        history = ""
        if timeline > 1:
            cur.execute("SELECT pg_read_binary_file(%s)", (f"pg_wal/{name}",))
            history = bytes(cur.fetchone()[0]).decode()
        cur.execute(
            "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        )
        row = cur.fetchone()
    if row is None or row[0] is None:
        raise RewindFailed(f"slot {slot} on {new_primary.name} reserves no WAL")
    control = controldata(old)
    segment_bytes = int(control.get("Bytes per WAL segment", str(16 * 2**20)))
    begins = timeline_begins(history, timeline)
    wal_dir = old.data_dir / "pg_wal"
    if history and not (wal_dir / name).exists():
        _write_wal_file(wal_dir / name, history.encode(), old.os_user)
    first = _replay_start(old.data_dir, control) // segment_bytes
    streamed_from = lsn_to_int(row[0]) // segment_bytes
    fork = min((at // segment_bytes for t, at in begins.items() if at), default=None)
    removed = []
    if fork is not None:
        for path in sorted(wal_dir.iterdir()):
            if not (path.is_file() and wal.SEGMENT_RE.match(path.name)):
                continue
            file_timeline, segno = int(path.name[:8], 16), segment_number(path.name, segment_bytes)
            if segno >= fork and file_timeline < segment_timeline(begins, segno, segment_bytes):
                path.unlink()
                removed.append(path.name)
    fetched = []
    archive = None
    for segno in range(first, streamed_from):
        wanted = segment_file(segment_timeline(begins, segno, segment_bytes), segno, segment_bytes)
        if (wal_dir / wanted).exists():
            continue
        archive = archive or wal.Archive(settings)
        plain = archive.fetch_bytes(wanted, old.home)
        if plain is None:
            raise RewindFailed(
                f"{wanted} is needed to replay up to the stream from {new_primary.name} and "
                f"is neither on {new_primary.name} nor in the archive"
            )
        _write_wal_file(wal_dir / wanted, plain, old.os_user)
        fetched.append(wanted)
    return {"fetched": fetched, "removed": removed}


def _write_wal_file(path: Path, data: bytes, os_user: str) -> None:
    """A WAL file the server owns, mode 0600, in place only when whole."""
    partial = path.with_name(path.name + ".rejoin-tmp")
    partial.write_bytes(data)
    partial.chmod(0o600)
    chown_to(partial, os_user)
    partial.replace(path)


def refence(data_dir: Path, os_user: str, why: str) -> None:
    """Put the fence back on a directory pg_rewind changed (it removes the files the source
    lacks, the marker and ``standby.signal`` among them)."""
    for name, text in (("standby.signal", ""), (FENCE_MARKER, why + "\n")):
        path = data_dir / name
        if not path.exists():
            path.write_text(text)
            chown_to(path, os_user)


def rewind_or_reprovision(
    settings: Settings,
    old: ClusterHandle,
    new_primary: ClusterHandle,
    slot: str,
    *,
    not_rewindable: str | None,
    archive_command: str | None,
    timeout: float,
) -> dict[str, Any]:
    """pg_rewind when it can (``not_rewindable`` None, see :func:`rewindable`); else the
    old directory aside (fenced) and a fresh ``pg_basebackup`` of the new primary in its
    place, started (``method`` says which, ``fallback`` why)."""
    why = not_rewindable
    if why is None:
        ensure_slot(new_primary, slot)
        try:
            rewound = pg_rewind(old, new_primary, timeout=timeout)
            rewound["wal"] = complete_new_timeline_wal(settings, old, new_primary, slot)
        except (RewindFailed, subprocess.TimeoutExpired) as exc:
            why = f"pg_rewind could not rewind {old.name}: {exc}"
            refence(old.data_dir, old.os_user, why)
        else:
            # Fenced until configure_and_unfence: a start in between must not make a primary.
            refence(old.data_dir, old.os_user, "rewound by rejoin, not yet a configured standby")
            return {**rewound, "fallback": None}
    standby.drop_slot(new_primary, slot)  # pg_basebackup -C makes it afresh
    aside = move_aside(old, "before-rejoin")
    if aside is not None:
        refence(aside, old.os_user, f"kept by rejoin before a fresh pg_basebackup: {why}")
    try:
        done = standby.provision(
            new_primary, old, slot, archive_command=archive_command, timeout=timeout
        )
    except DRError as exc:
        raise standby.StandbyFailed(
            f"{why}; the fresh pg_basebackup failed too: {exc}; the old directory is kept, "
            f"fenced, at {aside}"
        ) from exc
    return {
        "method": "pg_basebackup",
        "fallback": f"{why}; re-provisioned with pg_basebackup, the old directory kept at {aside}",
        "kept_at": str(aside) if aside else None,
        "copy_seconds": done["copy_seconds"],
    }


def configure_and_unfence(
    old: ClusterHandle, new_primary: ClusterHandle, slot: str, archive_command: str | None
) -> None:
    """After pg_rewind: the old cluster's own settings and streaming from the new primary
    (pg_rewind copied the new primary's configuration files), then the fence removed."""
    passfile = standby.passfile_to(new_primary, old)
    standby.write_standby_settings(new_primary, old, passfile, slot, archive_command)
    (old.data_dir / FENCE_MARKER).unlink(missing_ok=True)
