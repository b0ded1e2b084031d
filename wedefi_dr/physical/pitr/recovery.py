"""Recovering a cluster in place, PostgreSQL 12+ style, through its handle.

The plan's runbook writes a ``recovery.conf``; PostgreSQL 12 removed it (a server that
finds one refuses to start). Recovery is now ``recovery.signal`` in the data directory
plus ``restore_command`` and ``recovery_target_*`` as ordinary settings, here appended to
``postgresql.auto.conf`` of the restored base backup.

The steps, in runbook order: stage and verify the base backup beside the data directory
(the cluster still runs), then stop it, move the old data directory aside (never deleted)
and rename the verified one into place, push WAL the old server had not archived, write
the recovery settings, start the server (through the handle: pg_ctl or the host's own
commands) and wait until replay pauses at the target, count the rows, promote. A failure
after the stop rolls back: the old directory returns and starts as it was. Plain Python,
no Prefect import: ``flows/pitr.py`` strings these together.
"""

from __future__ import annotations

import contextlib
import hashlib
import shlex
import shutil
import subprocess
import sys
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from psycopg2 import sql

from wedefi_dr.config import Settings
from wedefi_dr.errors import DRError
from wedefi_dr.physical import basebackup, wal
from wedefi_dr.physical.archiving import PREFETCH_SCRIPT
from wedefi_dr.physical.basebackup import BaseBackupManifest
from wedefi_dr.physical.pitr.target import RecoveryTarget
from wedefi_dr.physical.pitr.verify import BaseBackupRefused, verify_staged
from wedefi_dr.physical.walnames import lsn_to_int, segment_file, segment_number
from wedefi_dr.postgres.cluster import ClusterHandle, conf_quote, os_user_kwargs
from wedefi_dr.postgres.conninfo import with_dbname
from wedefi_dr.postgres.tools import child_env, connect
from wedefi_dr.storage import authentication, encryption
from wedefi_dr.storage.pipeline import widen_pipe
from wedefi_dr.storage.repository import READ_CHUNK, Repository, open_store


class RecoveryFailed(DRError):
    """The server stopped or timed out before reaching the target."""


class RolledBack(RecoveryFailed):
    """Recovery failed after the cluster was stopped; what the rollback did is in the
    message (normally: the old data directory is back and running as it was)."""


class ApprovalTimedOut(DRError):
    """Nobody approved within the timeout; nothing was changed."""


def _stamp() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}"


def move_aside(cluster: ClusterHandle, why: str = "before-pitr") -> Path | None:
    """Keep what was there (nothing is lost): rename it, never delete it."""
    data_dir = cluster.data_dir
    if not data_dir.exists():
        return None
    aside = data_dir.with_name(f"{data_dir.name}.{why}-{_stamp()}")
    data_dir.rename(aside)
    return aside


def staging_dir(cluster: ClusterHandle) -> Path:
    """Beside the data directory (same file system, so putting it in place is a rename)."""
    return cluster.data_dir.with_name(f"{cluster.data_dir.name}.pitr-staging")


def _gunzip_hashed(source: IO[bytes], sink: IO[bytes]) -> tuple[str, int]:
    """``source`` gunzipped into ``sink``; the sha256 and size of the tar that went through."""
    inflate = zlib.decompressobj(31)
    digest, size = hashlib.sha256(), 0
    try:
        while chunk := source.read(READ_CHUNK):
            tar = inflate.decompress(chunk)
            digest.update(tar)
            size += len(tar)
            sink.write(tar)
        tail = inflate.flush()
        digest.update(tail)
        size += len(tail)
        sink.write(tail)
    finally:
        sink.close()
    return digest.hexdigest(), size


def backup_passphrase(settings: Settings, store: Repository, manifest: BaseBackupManifest) -> str:
    """The passphrase ``manifest``'s base backup was encrypted under: the one whose key
    signed its manifest (the current one, or after a rotation one of
    ``WEDEFI_DR_GPG_PREVIOUS_PASSPHRASES``). The key id picks it, so no decryption is tried
    with a wrong passphrase; a key id no configured passphrase derives is named."""
    keyring = authentication.keyring_of(settings)
    key = basebackup.manifest_key(store, manifest.backup_id)
    what = f"manifest s3://{store.bucket}/{key}"
    document = store.get_json(key)
    if document is None:
        raise BaseBackupRefused(f"base backup {manifest.backup_id}: {what} is gone")
    auth = document.get(authentication.FIELD)
    key_id = auth.get("key_id") if isinstance(auth, dict) else None
    if key_id and keyring.key(str(key_id)) is None:
        raise BaseBackupRefused(
            f"base backup {manifest.backup_id} was written under key id {key_id!r}, which no "
            f"configured passphrase derives ({', '.join(keyring.key_ids)}): add the passphrase "
            "it was taken with to WEDEFI_DR_GPG_PREVIOUS_PASSPHRASES"
        )
    return authentication.verify(document, keyring, what).passphrase


class _TarSink:
    """``tar -x`` into a folder as the cluster's OS user: where the plaintext goes."""

    def __init__(self, folder: Path, os_user: str) -> None:
        self.proc = subprocess.Popen(
            ["tar", "-xf", "-", "-C", str(folder)],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",
            env=child_env(),
            **os_user_kwargs(os_user),
        )
        self.stdin = self.proc.stdin

    def wait(self) -> str | None:
        """Its error once the stream is in, or None."""
        err = self.proc.stderr.read().decode(errors="replace")
        return f"tar -x failed: {err[-500:]}" if self.proc.wait() != 0 else None

    def kill(self) -> None:
        self.proc.kill()


def stream_plaintext(
    settings: Settings,
    store: Repository,
    manifest: BaseBackupManifest,
    cipher: Path,
    sink: Any,
    what: str,
) -> None:
    """The downloaded ``cipher`` decrypted (the passphrase its manifest's key id picks) and
    decompressed into ``sink`` (``.stdin`` an OS pipe, ``.wait()`` -> error or None,
    ``.kill()``), then every check of the stream: gpg's status (encrypted before a byte
    reaches the sink, intact at the end), the decompressor's, and the sink's own error.

    zstd and lz4 write straight into the sink's pipe: the tar is not hashed again on its
    way, since every byte of it is already proven. The ciphertext's sha256 matched the
    authenticated manifest before this runs, gpg's MDC proves the decryption, each zstd
    and lz4 frame carries its content checksum (on by default in both tools, checked as
    they decompress), and ``pg_verifybackup`` then checks every file against the
    authenticated ``backup_manifest``. Hashing the tar in this process cost as much as the
    rest of the restore. An in-process gzip stream (earlier backups) is still hashed and
    held to the manifest's plaintext sha256 and size: this process inflates it anyway.

    Both pipes get a megabyte (``widen_pipe``): ``lz4 -d`` decompresses and writes in turn,
    64 KiB at a time from one thread, and with the default pipe it waited on its reader at
    every block. A 1.1 GB tar of pgbench tables through gpg, lz4 and tar: into /dev/null
    1.83-1.86 s with 64 KiB pipes, 1.21-1.25 s with 1 MiB; into files 1.81-2.36 s and
    1.63-1.75 s. zstd, which writes from a thread of its own: 0.83-0.99 and 0.82-0.87 s,
    into files 1.53-1.67 and 1.33-1.64 s.
    """
    unpack_argv = basebackup.decompressor_argv(basebackup.compression_of(manifest))
    gpg = encryption.start_decrypt(backup_passphrase(settings, store, manifest), cipher)
    widen_pipe(gpg.stdout)
    widen_pipe(sink.stdin)
    unpack = None
    try:
        gpg.require_encrypted()  # before the sink gets a byte
        if unpack_argv is not None:
            unpack = subprocess.Popen(
                unpack_argv, stdin=gpg.stdout, stdout=sink.stdin, stderr=subprocess.PIPE
            )
            gpg.stdout.close()
            sink.stdin.close()
            unpack_err = unpack.stderr.read().decode(errors="replace")
            if unpack.wait() != 0:
                sink.kill()
                if gpg.wait() != 0:  # gpg ended the stream: its error names the cause
                    raise encryption.decrypt_error(gpg.returncode, gpg.stderr.read())
                raise BaseBackupRefused(
                    f"{what}: {unpack_argv[0]} of the decrypted stream failed: "
                    f"{unpack_err.strip()[-300:]}"
                    + (f" ({error})" if (error := sink.wait()) else "")
                )
            checked = None
        else:
            try:
                checked = _gunzip_hashed(gpg.stdout, sink.stdin)
            except (zlib.error, BrokenPipeError) as exc:
                sink.kill()
                gpg.kill()
                raise BaseBackupRefused(
                    f"{what}: decompressing/tar of the decrypted stream failed: {exc}"
                    + (f" ({error})" if (error := sink.wait()) else "")
                ) from exc
        sink_error = sink.wait()
        gpg_err = gpg.stderr.read()
        if gpg.wait() != 0:
            raise encryption.decrypt_error(gpg.returncode, gpg_err)
        gpg.require_authentic()
        if checked is not None and checked != (
            manifest.plaintext_sha256,
            manifest.plaintext_size_bytes,
        ):
            raise BaseBackupRefused(
                f"{what}: plaintext check failed: the decrypted tar has sha256 {checked[0]} and "
                f"{checked[1]} bytes, its manifest says {manifest.plaintext_sha256} and "
                f"{manifest.plaintext_size_bytes}: refusing to start a server on it"
            )
        if sink_error:
            raise BaseBackupRefused(f"{what}: {sink_error}")
    finally:
        if unpack is not None and unpack.poll() is None:
            unpack.kill()
        if gpg.poll() is None:
            gpg.kill()


def download_cipher(store: Repository, manifest: BaseBackupManifest, spool: Path) -> Path:
    """The base backup's object into ``spool``, its size and sha256 checked."""
    spool.mkdir(parents=True, exist_ok=True)
    cipher = spool / f"{manifest.backup_id}.{Path(manifest.object.key).name}"
    try:
        store.download_verified(
            manifest.object.key,
            cipher,
            size_bytes=manifest.object.size_bytes,
            sha256=manifest.object.sha256,
        )
    except BaseException:
        cipher.unlink(missing_ok=True)
        raise
    return cipher


class _StepClock:
    """Seconds since the previous lap, per step, into ``into`` (nothing when None)."""

    def __init__(self, into: dict[str, float] | None) -> None:
        self.into, self.last = into, time.monotonic()

    def lap(self, step: str) -> None:
        now = time.monotonic()
        if self.into is not None:
            self.into[step] = round(now - self.last, 2)
        self.last = now


def stage_base_backup(
    settings: Settings,
    manifest: BaseBackupManifest,
    cluster: ClusterHandle,
    spool: Path,
    timings: dict[str, float] | None = None,
) -> Path:
    """Download, decrypt and verify the base backup into :func:`staging_dir`; the data
    directory (a running production server) is not touched.

    The checks, each named when it fails: the object's size and sha256; gpg's status (an
    encrypted message before tar starts, an intact one at the end); the decompressor's frame
    checksums (a gzip stream: the tar's sha256 and size, see :func:`stream_plaintext`);
    PostgreSQL's own ``backup_manifest`` (``pg_verifybackup``, WAL included, plus what it
    leaves out: see ``verify.py``). Only a directory that passed all of them is returned.
    ``timings`` receives the seconds of each step (``download``, ``extract``, ``verify``).
    """
    staged = staging_dir(cluster)
    if staged.exists():
        shutil.rmtree(staged)  # an earlier attempt's leftovers: never a live data directory
    store = open_store(settings)
    what = f"base backup {manifest.backup_id}"
    cipher: Path | None = None
    clock = _StepClock(timings)
    try:
        cipher = download_cipher(store, manifest, spool)
        clock.lap("download")
        if not cluster.home.exists():  # a new scratch cluster: its socket goes here too
            cluster.home.mkdir(parents=True)
            cluster.give(cluster.home)
        staged.mkdir(mode=0o700)
        cluster.give(staged)
        stream_plaintext(settings, store, manifest, cipher, _TarSink(staged, cluster.os_user), what)
        clock.lap("extract")
        verify_staged(cluster, staged, manifest.pg_backup_manifest, what)
        clock.lap("verify")
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    finally:
        if cipher is not None:
            cipher.unlink(missing_ok=True)
    return staged


def install_staged(cluster: ClusterHandle, staged: Path) -> Path | None:
    """The stopped cluster's data directory aside, the verified one in its place."""
    if not staged.is_dir():
        raise RecoveryFailed(f"no staged base backup at {staged}: stage it first")
    aside = move_aside(cluster)
    try:
        staged.rename(cluster.data_dir)
    except OSError:
        if aside is not None:
            aside.rename(cluster.data_dir)
        raise
    return aside


def roll_back(cluster: ClusterHandle, aside: Path | None, *, restart: bool) -> str:
    """Undo :func:`install_staged`: the recovered server stopped, its directory kept aside
    for forensics, the original renamed back and (``restart``) started as it was."""
    with contextlib.suppress(Exception):
        cluster.stop("immediate")
    if aside is None:
        return f"the failed recovery is left stopped in {cluster.data_dir}"
    failed = move_aside(cluster, "failed-pitr")
    aside.rename(cluster.data_dir)
    if restart:
        cluster.start(wait=True)
    return (
        f"rolled back: the original data directory is back in {cluster.data_dir}"
        + (" and running" if restart else "")
        + (f"; the failed recovery is kept at {failed}" if failed else "")
    )


def push_unarchived(settings: Settings, aside: Path) -> dict[str, list[str]]:
    """WAL the old server had not archived yet (``.ready``), pushed with ``wal-push``'s
    rules; what could not be pushed stays in ``aside`` and is named, never dropped."""
    wal_dir = aside / "pg_wal"
    names = sorted(p.name[: -len(".ready")] for p in (wal_dir / "archive_status").glob("*.ready"))
    pushed, kept = [], []
    archive = wal.Archive(settings) if names else None
    for name in names:
        try:
            assert archive is not None
            archive.push_bytes(wal.validate_name(name), (wal_dir / name).read_bytes())
            pushed.append(name)
        except Exception as exc:
            kept.append(f"{wal_dir / name} ({type(exc).__name__}: {exc})")
    return {"pushed": pushed, "kept": kept}


def write_recovery_settings(
    cluster: ClusterHandle,
    target: RecoveryTarget,
    *,
    restore_command: str,
    archive_command: str | None,
    note: str,
) -> dict[str, str]:
    """``recovery.signal`` plus the settings, appended to ``postgresql.auto.conf``.

    ``archive_command`` None turns archiving off: a recovered copy must never write into
    the production archive unless it becomes production. The server listens on loopback
    only while it recovers, so no application reaches a half-recovered database.
    """
    data_dir = cluster.data_dir
    settings = {
        "restore_command": restore_command,
        **target.settings(),
        "port": str(cluster.port),
        "unix_socket_directories": str(cluster.sockets),
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
    cluster.give(signal)
    return {k: v for k, v in settings.items() if k != "restore_command"}


def backup_label_start(data_dir: Path) -> tuple[int, str] | None:
    """Where replay starts, as ``backup_label`` says (a base backup's or pg_rewind's): the
    position and the WAL file holding it. None without one (a stopped copy recovers from
    its own checkpoint) or when the line is not in the expected form."""
    label = data_dir / "backup_label"
    if not label.exists():
        return None
    for line in label.read_text().splitlines():
        if line.startswith("START WAL LOCATION:") and "(file " in line:
            lsn = line.split(":", 1)[1].split()[0]
            name = line.split("(file ", 1)[1].rstrip(")").strip()
            return (lsn_to_int(lsn), name) if wal.SEGMENT_RE.match(name) else None
    return None


def first_segment(data_dir: Path) -> str | None:
    """The WAL file replay starts from, as ``backup_label`` names it (see
    :func:`backup_label_start`)."""
    start = backup_label_start(data_dir)
    return start[1] if start else None


def prime_prefetch(cluster: ClusterHandle, restore_env: Path, segment_bytes: int) -> bool:
    """Start replay's prefetcher before the server does, from the base backup's first
    segment, as the server's OS user (the spool is in its ``pg_wal``). The first
    ``restore_command`` calls then find it importing and downloading, instead of each
    running a full ``wal-fetch``. Best effort: False when nothing was started, and replay
    fetches as it always can."""
    first = first_segment(cluster.data_dir)
    number = segment_number(first, segment_bytes) if first else 0
    if first is None or number == 0:
        return False
    before = segment_file(int(first[:8], 16), number - 1, segment_bytes)
    dest = cluster.data_dir / "pg_wal" / "RECOVERYXLOG"
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            str(PREFETCH_SCRIPT),
            "--prime",
            "--env-file",
            str(restore_env),
            before,
            str(dest),
        ],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=30,
        env=child_env(),
        **os_user_kwargs(cluster.os_user),
    )
    return result.returncode == 0


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


def wait_for_target(cluster: ClusterHandle, timeout: float) -> dict[str, Any]:
    """Poll until replay pauses at the target (or the server promoted itself at 'latest').

    Raises RecoveryFailed, with the server log's evidence (a named WAL gap, a target the
    WAL never reached), when the server stops or time runs out.
    """
    import psycopg2

    dsn = cluster.dsn()
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
        if time.monotonic() - started > 2 and not cluster.is_running():
            raise RecoveryFailed(
                "the server stopped before reaching the recovery target; from its log:\n"
                + log_evidence(cluster.log)
            )
        time.sleep(0.5)
    raise RecoveryFailed(
        f"replay did not reach the target within {timeout:.0f} s; from the server log:\n"
        + log_evidence(cluster.log)
    )


def row_counts(dsn: str) -> dict[str, int]:
    """Exact row counts of every user table in every database of the recovered cluster."""
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
        # The targets served their purpose; a later restart must not look for them, and
        # listens where the cluster's own configuration says, not on recovery's loopback.
        for name in (
            "listen_addresses",
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
    done = []
    for command in commands:
        subprocess.run(
            shlex.split(command), check=True, capture_output=True, timeout=300, env=child_env()
        )
        done.append(command.split()[0])
    return done


def clear_prefetch(cluster: ClusterHandle) -> None:
    """Drop segments fetched ahead for a replay that is over."""
    with contextlib.suppress(OSError):
        wal.clear_spool(cluster.data_dir / "pg_wal")
