"""Point-in-time recovery: the window, the target checks, the PostgreSQL 12+ settings.

The plan's runbook writes a ``recovery.conf``; PostgreSQL 12 removed it (a server that
finds one refuses to start). Recovery is now ``recovery.signal`` in the data directory
plus ``restore_command`` and ``recovery_target_*`` as ordinary settings, here appended to
``postgresql.auto.conf`` of the restored base backup.

Every check that can refuse a request runs before anything is changed: the target's form,
whether it lies in the recoverable window (earliest base-backup end → newest archived
WAL), which base backup to start from, and the approval rules (a production recovery is
break-glass: an emergency declared and two approvers other than the operator).

Plain Python, no Prefect import: the flow in ``flows/pitr.py`` strings these together.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from psycopg2 import sql

from wedefi_dr.config import Settings
from wedefi_dr.errors import DRError, InvalidInput
from wedefi_dr.physical import wal
from wedefi_dr.physical.basebackup import BaseBackupManifest, list_base_backups, lsn_to_int
from wedefi_dr.postgres.tools import connect, running_as_root, server_user_kwargs, tool
from wedefi_dr.storage import encryption
from wedefi_dr.storage.s3 import ObjectStore

TARGET_KINDS = ("time", "lsn", "name", "latest")
CLUSTER_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,40}$")
LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
PRODUCTION_CLUSTER = "primary"
RESERVED_CLUSTERS = ("ops",)  # the audit cluster: a recovery never rewrites its own record


class TargetOutsideWindow(InvalidInput):
    """The recovery target is not covered by base backups plus archived WAL."""


class ApprovalRefused(InvalidInput):
    """The approvals given do not meet the rule for this target."""


class RecoveryFailed(DRError):
    """The server stopped or timed out before reaching the target."""


# ---- the target --------------------------------------------------------------------------
@dataclass(frozen=True)
class RecoveryTarget:
    """What to recover to; ``inclusive`` false (the plan) stops just before the target."""

    kind: str
    value: str = ""
    inclusive: bool = False
    timeline: str = "latest"

    @classmethod
    def parse(
        cls, kind: str, value: str = "", inclusive: bool = False, timeline: str = "latest"
    ) -> RecoveryTarget:
        kind = (kind or "").strip().lower()
        value = (value or "").strip()
        if kind not in TARGET_KINDS:
            raise InvalidInput(f"target kind must be one of {TARGET_KINDS}, not {kind!r}")
        if kind == "time":
            try:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError as exc:
                raise InvalidInput(
                    f"target time {value!r} is not ISO 8601 (e.g. 2026-11-24T14:05:00Z)"
                ) from exc
            if parsed.tzinfo is None:
                raise InvalidInput(f"target time {value!r} needs a time zone (e.g. Z for UTC)")
            value = parsed.astimezone(UTC).isoformat()
        elif kind == "lsn" and not LSN_RE.match(value):
            raise InvalidInput(f"target LSN {value!r} is not of the form 0/5A000028")
        elif kind == "name" and not (0 < len(value) < 64):
            raise InvalidInput("a named restore point needs its name (1-63 characters)")
        elif kind == "latest" and value:
            raise InvalidInput("target 'latest' takes no value")
        timeline = (timeline or "latest").strip().lower()
        if timeline not in ("latest", "current") and not timeline.isdigit():
            raise InvalidInput(
                f"timeline must be 'latest', 'current' or a number, not {timeline!r}"
            )
        return cls(kind, value, bool(inclusive), timeline)

    @property
    def time(self) -> datetime | None:
        return datetime.fromisoformat(self.value) if self.kind == "time" else None

    def describe(self) -> str:
        if self.kind == "latest":
            return "latest (end of archived WAL)"
        edge = "inclusive" if self.inclusive else "exclusive"
        return f"{self.kind} {self.value} ({edge}, timeline {self.timeline})"

    def settings(self) -> dict[str, str]:
        """The ``recovery_target_*`` settings (values unquoted)."""
        out: dict[str, str] = {"recovery_target_timeline": self.timeline}
        if self.kind == "latest":
            return out  # no target: replay to the end of the archive, then promote
        out[f"recovery_target_{self.kind}"] = self.value
        out["recovery_target_inclusive"] = "on" if self.inclusive else "off"
        out["recovery_target_action"] = "pause"
        return out


# ---- the window --------------------------------------------------------------------------
@dataclass
class Window:
    base_backups: list[BaseBackupManifest]
    newest_wal: str | None
    newest_wal_time: datetime | None
    wal_objects: int

    @property
    def earliest(self) -> BaseBackupManifest | None:
        return self.base_backups[0] if self.base_backups else None

    def describe(self) -> dict[str, Any]:
        e = self.earliest
        return {
            "from": e.finished_at.isoformat() if e else None,
            "from_base_backup": e.backup_id if e else None,
            "from_lsn": e.stop_lsn if e else None,
            "to": self.newest_wal_time.isoformat() if self.newest_wal_time else None,
            "to_wal": self.newest_wal,
            "base_backups": len(self.base_backups),
            "wal_objects": self.wal_objects,
        }


def recoverable_window(settings: Settings) -> Window:
    """Earliest base-backup end → newest archived WAL segment (its upload time)."""
    store = ObjectStore(settings)
    backups = list_base_backups(store)
    newest: tuple | None = None
    count = 0
    for obj in store.list_keys(wal.archive_prefix(settings) + "/"):
        name = obj["Key"].rsplit("/", 1)[-1]
        count += 1
        is_segment = wal.SEGMENT_RE.match(name[:24]) and not name.endswith(".backup")
        if is_segment and (newest is None or (obj["LastModified"], name) > newest):
            newest = (obj["LastModified"], name)
    if newest is None:
        return Window(backups, None, None, count)
    # S3 keeps LastModified to the second: the upload ended before the next second, and
    # every commit in the segment before its upload.
    return Window(backups, newest[1], newest[0] + timedelta(seconds=1), count)


def choose_base_backup(target: RecoveryTarget, window: Window) -> BaseBackupManifest:
    """The newest base backup that ends before the target; refuse if there is none.

    A named restore point has no time or LSN to compare before replay, so it starts from
    the earliest base backup (always correct, possibly a longer replay).
    """
    if not window.base_backups:
        raise TargetOutsideWindow("no base backups in the archive: run 'wedefi-dr base-backup'")
    earliest = window.base_backups[0]
    if target.kind == "time":
        t = target.time
        assert t is not None
        usable = [b for b in window.base_backups if b.finished_at <= t]
        if not usable:
            raise TargetOutsideWindow(
                f"target time {t.isoformat()} is before the earliest base backup "
                f"({earliest.backup_id}, consistent at {earliest.finished_at.isoformat()}): "
                "nothing to recover from; nothing was changed"
            )
        if window.newest_wal_time is None or t > window.newest_wal_time:
            raise TargetOutsideWindow(
                f"target time {t.isoformat()} is after the newest archived WAL "
                f"({window.newest_wal} at {window.newest_wal_time}): the archive cannot "
                "reach it; nothing was changed"
            )
        return usable[-1]
    if target.kind == "lsn":
        lsn = lsn_to_int(target.value)
        usable = [b for b in window.base_backups if lsn_to_int(b.stop_lsn) <= lsn]
        if not usable:
            raise TargetOutsideWindow(
                f"target LSN {target.value} is before the end of the earliest base backup "
                f"({earliest.backup_id}, {earliest.stop_lsn}); nothing was changed"
            )
        return usable[-1]
    if target.kind == "name":
        return earliest
    return window.base_backups[-1]


# ---- approvals ---------------------------------------------------------------------------
def check_approval(
    *,
    production: bool,
    approve: bool,
    approvers: list[str],
    emergency_declared: bool,
    operator: str,
) -> list[str]:
    """The approval rule: scratch needs one approver, production is break-glass.

    Approvers are people other than the operator (four eyes), counted once each.
    Returns the distinct approvers; raises ApprovalRefused otherwise.
    """
    if not approve:
        raise ApprovalRefused("the recovery was rejected at the approval step; nothing changed")
    me = operator.strip().lower()
    distinct = sorted({a.strip().lower() for a in approvers if a.strip()} - {me})
    if production:
        if not emergency_declared:
            raise ApprovalRefused(
                "recovering over the production cluster is break-glass: an emergency must be "
                "declared; nothing was changed"
            )
        if len(distinct) < 2:
            raise ApprovalRefused(
                "recovering over the production cluster needs two distinct approvers other "
                f"than the operator; got {distinct or 'none'}; nothing was changed"
            )
    elif not distinct:
        raise ApprovalRefused(
            "a recovery needs one approver other than the operator; nothing was changed"
        )
    return distinct


def is_production(settings: Settings, cluster_name: str, data_dir: Path) -> bool:
    if cluster_name == PRODUCTION_CLUSTER:
        return True
    prod = settings.production_data_dir
    return bool(prod) and Path(prod).resolve() == data_dir.resolve()


def validate_cluster_name(name: str) -> str:
    name = (name or "").strip()
    if not CLUSTER_NAME_RE.match(name):
        raise InvalidInput(f"cluster name {name!r}: lower-case letters, digits and '-' only")
    if name in RESERVED_CLUSTERS:
        raise InvalidInput(f"cluster {name!r} holds the audit tables: never a recovery target")
    return name


# ---- preparing the data directory --------------------------------------------------------
def _chown_postgres(path: Path) -> None:
    if running_as_root():
        import pwd

        entry = pwd.getpwnam("postgres")
        os.chown(path, entry.pw_uid, entry.pw_gid)


def write_wal_env(settings: Settings, path: Path, prefix: str | None = None) -> Path:
    """The settings ``wal-fetch``/``wal-push`` need, readable only by ``postgres``.

    Secrets go to this file, never into ``postgresql.auto.conf``.
    """
    values = {
        "WEDEFI_DR_AWS_REGION": settings.aws_region,
        "WEDEFI_DR_BUCKET": settings.bucket,
        "WEDEFI_DR_PREFIX": prefix or settings.prefix,
        "WEDEFI_DR_GPG_PASSPHRASE": settings.gpg_passphrase.get_secret_value(),
        "WEDEFI_DR_GPG_CIPHER": settings.gpg_cipher,
        "WEDEFI_DR_STORAGE_CLASS": settings.storage_class,
        "WEDEFI_DR_SSE": settings.sse,
        "WEDEFI_DR_WAL_PREFETCH": str(settings.wal_prefetch),
    }
    if settings.aws_endpoint_url:
        values["WEDEFI_DR_AWS_ENDPOINT_URL"] = settings.aws_endpoint_url
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        if os.environ.get(key):
            values[key] = os.environ[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{k}={v}\n" for k, v in values.items()))
    path.chmod(0o600)
    _chown_postgres(path)
    return path


def move_aside(data_dir: Path) -> Path | None:
    """Keep what was there (nothing is lost): rename it, never delete it."""
    if not data_dir.exists():
        return None
    aside = data_dir.with_name(f"{data_dir.name}.before-pitr-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
    data_dir.rename(aside)
    return aside


def extract_base_backup(
    settings: Settings, manifest: BaseBackupManifest, data_dir: Path, spool: Path
) -> None:
    """Verified download (encrypted, in the spool), then gpg -d | tar -xz as ``postgres``."""
    from wedefi_dr.errors import IntegrityError

    store = ObjectStore(settings)
    spool.mkdir(parents=True, exist_ok=True)
    cipher = spool / f"{manifest.backup_id}.base.tar.gz.gpg"
    store.download_verified(
        manifest.object.key,
        cipher,
        size_bytes=manifest.object.size_bytes,
        sha256=manifest.object.sha256,
    )
    try:
        data_dir.mkdir(mode=0o700, parents=True)
        _chown_postgres(data_dir)
        gpg = encryption.start_decrypt(settings.gpg_passphrase.get_secret_value(), cipher)
        tar = subprocess.Popen(
            ["tar", "-xzf", "-", "-C", str(data_dir)],
            stdin=gpg.stdout,
            stderr=subprocess.PIPE,
            cwd="/",
            **server_user_kwargs(),
        )
        gpg.stdout.close()
        tar_err = tar.communicate()[1].decode(errors="replace")
        gpg_err = gpg.stderr.read()
        if gpg.wait() != 0:
            raise encryption.decrypt_error(gpg.returncode, gpg_err)
        if tar.returncode != 0:
            raise IntegrityError(f"tar -xz of base backup {manifest.backup_id} failed: {tar_err}")
    finally:
        cipher.unlink(missing_ok=True)


def write_recovery_settings(
    data_dir: Path,
    target: RecoveryTarget,
    *,
    restore_command: str,
    socket_dir: Path,
    archive_command: str | None,
    note: str,
) -> dict[str, str]:
    """``recovery.signal`` plus the settings, appended to ``postgresql.auto.conf``.

    ``archive_command`` None turns archiving off: a recovered copy must never write into
    the production archive unless it becomes production.
    """
    from wedefi_dr_dev.stack import conf_quote

    settings = {
        "restore_command": restore_command,
        **target.settings(),
        "unix_socket_directories": str(socket_dir),
        "listen_addresses": "127.0.0.1",
        "hot_standby": "on",
    }
    if archive_command is None:
        settings["archive_mode"] = "off"
    else:
        settings["archive_mode"] = "on"
        settings["archive_command"] = archive_command
    lines = [f"\n# --- point-in-time recovery by wedefi-dr: {note} ---"]
    for key, value in settings.items():
        lines.append(f"{key} = {conf_quote(value)}")
    auto = data_dir / "postgresql.auto.conf"
    with auto.open("a") as f:
        f.write("\n".join(lines) + "\n")
    signal = data_dir / "recovery.signal"
    signal.write_text("")
    _chown_postgres(signal)
    return {k: v for k, v in settings.items() if k != "restore_command"}


# ---- the server --------------------------------------------------------------------------
def start_server(data_dir: Path, port: int, log_path: Path) -> None:
    """``pg_ctl start`` without waiting: replay may take longer than pg_ctl's timeout."""
    subprocess.run(
        [
            tool("pg_ctl"),
            "-D",
            str(data_dir),
            "-l",
            str(log_path),
            "-W",
            "-o",
            f"-p {port}",
            "start",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd="/",
        **server_user_kwargs(),
    )


def server_running(data_dir: Path) -> bool:
    return (
        subprocess.run(
            [tool("pg_ctl"), "-D", str(data_dir), "status"],
            capture_output=True,
            cwd="/",
            **server_user_kwargs(),
        ).returncode
        == 0
    )


def log_evidence(log_path: Path, limit: int = 12) -> str:
    """The lines of the server log that say why recovery stopped."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no server log)"
    keep = [
        ln
        for ln in lines
        if any(w in ln for w in ("FATAL", "PANIC", "GAP", "wedefi-dr wal", "recovery", "ERROR"))
    ]
    return "\n".join(keep[-limit:])


def wait_for_target(dsn: str, data_dir: Path, log_path: Path, timeout: float) -> dict[str, Any]:
    """Poll until replay pauses at the target (or the server promoted itself at 'latest').

    Raises RecoveryFailed, with the server log's evidence (a named WAL gap, a target the
    WAL never reached), when the server stops or time runs out.
    """
    import psycopg2

    deadline = time.monotonic() + timeout
    started = time.monotonic()
    while time.monotonic() < deadline:
        try:
            with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
                cur.execute(
                    "SELECT pg_is_in_recovery(),"
                    " CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() END,"
                    " pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp()"
                )
                in_recovery, pause_state, lsn, ts = cur.fetchone()
            if not in_recovery or pause_state == "paused":
                return {
                    "paused": bool(in_recovery),
                    "replay_lsn": lsn,
                    "last_replayed_commit": ts.isoformat() if ts else None,
                    "seconds": round(time.monotonic() - started, 3),
                }
        except psycopg2.OperationalError:
            pass  # not yet consistent, or starting up
        if time.monotonic() - started > 2 and not server_running(data_dir):
            raise RecoveryFailed(
                "the server stopped before reaching the recovery target; from its log:\n"
                + log_evidence(log_path)
            )
        time.sleep(0.5)
    raise RecoveryFailed(
        f"replay did not reach the target within {timeout:.0f} s; from the server log:\n"
        + log_evidence(log_path)
    )


def row_counts(dsn: str) -> dict[str, int]:
    """Exact row counts of every user table in every database of the recovered cluster."""
    from wedefi_dr.postgres.conninfo import with_dbname

    counts: dict[str, int] = {}
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate")
        dbs = [r[0] for r in cur.fetchall()]
    for db in dbs:
        with connect(with_dbname(dsn, db), autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("SELECT schemaname, relname FROM pg_stat_user_tables ORDER BY 1, 2")
            for schema, table in cur.fetchall():
                cur.execute(
                    sql.SQL("SELECT count(*) FROM {}.{}").format(
                        sql.Identifier(schema), sql.Identifier(table)
                    )
                )
                counts[f"{db}.{schema}.{table}"] = cur.fetchone()[0]
    return counts


def promote(dsn: str) -> dict[str, Any]:
    """``pg_promote()`` and proof: ``pg_is_in_recovery()`` is false afterwards."""
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery()")
        if cur.fetchone()[0]:
            cur.execute("SELECT pg_promote(wait => true, wait_seconds => 120)")
            if not cur.fetchone()[0]:
                raise RecoveryFailed("pg_promote() did not finish within 120 s")
        cur.execute("SELECT pg_is_in_recovery()")
        if cur.fetchone()[0]:
            raise RecoveryFailed("the server is still in recovery after pg_promote()")
        # The targets served their purpose; a later restart must not look for them.
        for name in (
            "recovery_target_time",
            "recovery_target_lsn",
            "recovery_target_name",
            "recovery_target_inclusive",
            "recovery_target_action",
        ):
            cur.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
        cur.execute("SELECT pg_reload_conf()")
        return {"in_recovery": False}


def current_timeline(dsn: str) -> int:
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")
        return int(cur.fetchone()[0], 16)


def run_commands(commands: list[str]) -> list[str]:
    """The configured application stop/start commands (argument lists, no shell)."""
    import shlex

    done = []
    for command in commands:
        subprocess.run(shlex.split(command), check=True, capture_output=True, timeout=300)
        done.append(command.split()[0])
    return done


def clear_prefetch(data_dir: Path) -> None:
    with contextlib.suppress(OSError):
        wal.clear_spool(data_dir / "pg_wal")


def remove_tree(path: Path) -> None:
    """For tests' own scratch clusters only."""
    shutil.rmtree(path, ignore_errors=True)
