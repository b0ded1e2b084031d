"""Restore a logical backup into a named target, proving every step.

Order matters, because the target must stay untouched by anything unverified:

1. validate the request (backup exists, operator and justification given, the target
   allowed by :func:`check_target`) — no side effect yet;
2. download the ciphertext to a spool file (it is encrypted; no plaintext on disk) and
   check its size and sha256 against the manifest: a flipped byte or a truncated object
   stops here;
3. start ``gpg --decrypt`` and read the first block: a wrong passphrase stops here, before
   ``pg_restore`` starts;
4. ``pg_restore --clean --if-exists`` turns the plaintext stream (hashed on the way) into
   SQL that ``psql --single-transaction -v ON_ERROR_STOP=1`` runs in one transaction;
   any error rolls the whole restore back;
5. the transaction commits only when this process says so: psql sends COMMIT at the end
   of its input, and this process holds a write end of psql's input pipe until gpg
   confirmed an intact message and the plaintext matched the manifest's sha256 and size.
   Letting ``pg_restore`` connect itself would leave the COMMIT to it: it commits when the
   archive's last entry is done, which may be before the stream's end (and gpg's integrity
   check) or after it stopped reading;
6. before that end of input, this process appends the fingerprint queries of every table
   to psql's script: they run in the restore transaction, on the restored rows, and their
   results come back on a pipe of their own. A table that differs from the manifest kills
   psql before COMMIT, so a restore that is not the backup never commits (an overwritten
   target keeps what it held). Reading the rows inside the transaction that wrote them
   also spares the full second pass a later session would pay: it would set every row's
   hint bits, writing (and with data checksums WAL-logging) every page once more;
7. after COMMIT, :func:`verify` checks what is not a table (large objects, sequences) and
   reports the counts.

Steps 3-6 are for a target that exists (it may hold data, and must keep it until the
restore is proven). A target that does not exist yet is built on every CPU instead, under
a name of its own, and renamed to the target only once proven (:mod:`.build`); a restore
with ``WEDEFI_DR_RESTORE_JOBS=1``, or of an archive larger than half the free memory, takes
the streamed way into a new empty database.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg2
from pydantic import BaseModel

from wedefi_dr.catalog import listing
from wedefi_dr.catalog.manifest import BackupManifest
from wedefi_dr.config import Settings
from wedefi_dr.errors import (
    DecryptionFailed,
    InvalidInput,
    RestoreFailed,
    TargetRefused,
    VerificationFailed,
)
from wedefi_dr.logical import build, plaintext
from wedefi_dr.observability.audit import check_operator
from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.postgres.fingerprint import (
    FINGERPRINT_SETTINGS,
    METHODS,
    Fingerprints,
    compare,
    fingerprint_extras,
    fingerprint_tables,
    is_table_entry,
    session_table_queries,
    table_entry,
)
from wedefi_dr.postgres.primary import primary_target
from wedefi_dr.postgres.tools import child_env, connect, tool
from wedefi_dr.storage.pipeline import widen_pipe
from wedefi_dr.storage.repository import READ_CHUNK, open_store

log = logging.getLogger(__name__)


class Restored(BaseModel):
    """What a committed restore proved: every table's fingerprint, computed from the
    restored rows before COMMIT (or before a new database took the target's name), equal
    to the manifest's.
    ``verify_seconds``: how long those fingerprints took, of the whole restore."""

    tables: Fingerprints
    verify_seconds: float = 0.0


# Never a restore target: the templates every new database is copied from, and the
# maintenance database every tool connects to first.
RESERVED_DATABASES = ("template0", "template1", "postgres")


@dataclass
class RestoreRequest:
    """``overwrite``: the operator named the target for overwrite (it may hold data)."""

    backup_id: str
    target: ConnTarget
    operator: str
    justification: str
    overwrite: bool = False


@dataclass(frozen=True)
class TargetCheck:
    """What the target policy found. ``production`` says why the target counts as
    production ('' when it does not); overwriting such a target is break-glass.
    ``privileged``: the warning that the target's login may run OS commands on the
    target host ('' when it may not, see :func:`privileged_login`)."""

    holds_data: bool
    production: str
    privileged: str = ""

    @property
    def break_glass(self) -> bool:
        """An overwrite of production: the restore waits for the break-glass approval."""
        return self.holds_data and bool(self.production)


# Predefined roles whose members reach the server host's programs or files from SQL
# (``COPY ... PROGRAM``, ``COPY ... TO/FROM 'file'``, ``pg_read_file``).
HOST_ACCESS_ROLES = ("pg_execute_server_program", "pg_read_server_files", "pg_write_server_files")


def restore_command(*, no_owner: bool = False) -> list[str]:
    """pg_restore turning the plaintext archive on stdin into SQL on stdout, replacing what
    the archive holds (it connects nowhere: :func:`apply_command` does). ``no_owner``:
    every object belongs to the login that restores it, which then needs no right over
    the source's roles (a non-superuser owner can restore)."""
    owner = ["--no-owner"] if no_owner else []
    return [tool("pg_restore"), "--clean", "--if-exists", *owner, "--file=-"]


def apply_command(target: ConnTarget) -> list[str]:
    """psql running the SQL on stdin into ``target``: all or nothing (one transaction, the
    first error stops it), no ~/.psqlrc, COMMIT only at the end of its input."""
    return [
        tool("psql"),
        "--no-psqlrc",
        "--quiet",
        "--no-password",
        "--single-transaction",
        "--set=ON_ERROR_STOP=1",
        "--file=-",
        *target.tool_args(),
    ]


def _server_identity(server: ConnTarget, what: str, *, maintenance: bool = True) -> str:
    """A server's system identifier (read-only; the target db may not exist yet)."""
    where = server.with_dbname("postgres") if maintenance else server
    try:
        with connect(where.conninfo) as conn, conn.cursor() as cur:
            cur.execute("SELECT system_identifier::text FROM pg_control_system()")
            return cur.fetchone()[0]
    except psycopg2.OperationalError as exc:
        raise InvalidInput(f"cannot reach {what} {server.redacted}: {str(exc).strip()}") from exc


def privileged_login(target: ConnTarget) -> str:
    """What lets the target's login run commands or touch files on the target host
    ('' when nothing does): superuser, or membership of :data:`HOST_ACCESS_ROLES`.

    The archive's SQL runs as that login, and the source database's own code runs with
    it: an index expression or CHECK constraint calling a function that does
    ``COPY ... FROM PROGRAM`` is executed by CREATE INDEX / ALTER TABLE during the
    restore. Authenticating the backup proves we wrote it, not that its source was benign.
    """
    with connect(target.with_dbname("postgres").conninfo) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT current_user, rolsuper, ARRAY(SELECT g FROM unnest(%s::text[]) g "
            "WHERE pg_has_role(current_user, g::name, 'MEMBER')) "
            "FROM pg_roles WHERE rolname = current_user",
            (list(HOST_ACCESS_ROLES),),
        )
        user, is_super, roles = cur.fetchone()
    if is_super:
        return f"{user} is a superuser"
    if roles:
        return f"{user} is a member of {', '.join(roles)}"
    return ""


def restore_privilege_warning(target: ConnTarget, privileged: str) -> str:
    """The one-line warning for a restore that runs as a privileged login."""
    return (
        f"restoring into {target.location} as a privileged login ({privileged}): the "
        "archive's SQL, and any function of the source database an index or constraint "
        "calls, runs with its rights and could run OS commands on the target host; "
        "restore as the database's non-superuser owner where possible"
    )


def database_exists(target: ConnTarget) -> bool:
    """Whether the target's database exists on its server."""
    with connect(target.with_dbname("postgres").conninfo) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target.dbname,))
        return cur.fetchone() is not None


def user_tables(target: ConnTarget) -> int:
    """How many tables outside the system schemas the target holds (0: absent or empty)."""
    if not database_exists(target):
        return 0
    with connect(target.conninfo) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT LIKE 'pg\\_%' "
            "AND n.nspname <> 'information_schema'"
        )
        return int(cur.fetchone()[0])


def _production_reason(
    settings: Settings, target: ConnTarget, identity: str, manifest: BackupManifest
) -> str:
    """Why the target counts as production, or '' when nothing says it does."""
    source = manifest.source
    if identity == source.system_identifier:
        if target.dbname == source.dbname:
            return f"it is the database backup {manifest.backup_id} was taken from"
        return f"it is on the server backup {manifest.backup_id} was taken from"
    if settings.primary_dsn.get_secret_value():
        try:
            primary = primary_target(settings)
            primary_identity = _server_identity(primary, "the production primary")
        except InvalidInput as exc:
            # Production being down is when restores run; a target this process can
            # reach while the primary cannot be reached is not the primary's server.
            log.warning("%s; judging the target without it", exc)
        else:
            if identity == primary_identity:
                return "it is on the production primary's cluster (WEDEFI_DR_PRIMARY_DSN)"
    listed = {target.dbname, target.location, identity} & set(settings.production_targets)
    if listed:
        return f"WEDEFI_DR_PRODUCTION_TARGETS lists it ({', '.join(sorted(listed))})"
    return ""


def check_target(
    settings: Settings, target: ConnTarget, manifest: BackupManifest, *, overwrite: bool
) -> TargetCheck:
    """The target policy: a restore touches only what it was told to.

    Refused always: the templates, ``postgres`` and the ops database (the audit trail
    must outlive any restore). Refused without ``overwrite``: a database that holds
    tables. What the check returns says whether the overwrite is break-glass (the
    target counts as production); the caller asks for that approval.
    """
    if target.dbname in RESERVED_DATABASES:
        raise TargetRefused(
            f"refusing to restore into {target.location}: {target.dbname!r} is never a "
            "restore target (templates and the maintenance database stay as they are)"
        )
    identity = _server_identity(target, "the restore target")
    ops = ConnTarget.parse(settings.ops_dsn.get_secret_value(), allow_password=True)
    ops_identity = _server_identity(ops, "the ops database", maintenance=False)
    if identity == ops_identity and target.dbname == ops.dbname:
        raise TargetRefused(
            f"refusing to restore into {target.location}: it is the ops database, which "
            "holds the audit trail"
        )
    tables = user_tables(target)
    if tables and not overwrite:
        raise TargetRefused(
            f"refusing to restore into {target.location}: it holds {tables} table(s). "
            "Restore into a new or empty database, or pass --overwrite to replace it"
        )
    privileged = privileged_login(target)
    warning = restore_privilege_warning(target, privileged) if privileged else ""
    if warning:
        log.warning("%s", warning)
    return TargetCheck(
        holds_data=bool(tables),
        production=_production_reason(settings, target, identity, manifest),
        privileged=warning,
    )


def assess(settings: Settings, request: RestoreRequest) -> tuple[BackupManifest, TargetCheck]:
    """Every refusal, before anything is downloaded, created or changed; the manifest and
    what the target policy found (whether the overwrite needs break-glass approval)."""
    check_operator(request.operator or "")
    if not request.operator or not request.operator.strip():
        raise InvalidInput("--operator is required: who is restoring (it goes in the audit log)")
    if not request.justification or not request.justification.strip():
        raise InvalidInput("--justification is required: why this restore (audit log)")
    if not request.target.dbname:
        raise InvalidInput("--target-dsn must name a database (dbname=...)")
    settings.require("ops_dsn", "gpg_passphrase")
    manifest = listing.resolve(open_store(settings), request.backup_id)
    if manifest.fingerprint_method not in METHODS:
        raise InvalidInput(
            f"backup {manifest.backup_id} was fingerprinted with {manifest.fingerprint_method!r}; "
            f"this version computes {', '.join(METHODS)}, so a restore could not be verified. "
            "Restore it with the version that took it, or by hand (README: break-glass)."
        )
    return manifest, check_target(settings, request.target, manifest, overwrite=request.overwrite)


def validate(settings: Settings, request: RestoreRequest) -> BackupManifest:
    """:func:`assess` for callers that cannot pause for approval (the DR test): an
    overwrite of production is refused outright."""
    manifest, check = assess(settings, request)
    if check.break_glass:
        raise TargetRefused(
            f"refusing to overwrite {request.target.location}: {check.production}; that is "
            "break-glass (the restore-backup flow asks for the approval)"
        )
    return manifest


def fetch_verified(settings: Settings, manifest: BackupManifest, spool_dir: Path) -> Path:
    """Download the ciphertext and prove it is byte-for-byte what was stored."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    # One file per download: two restores of one backup never share (or unlink) a spool file.
    path = spool_dir / f"{manifest.backup_id}.{uuid.uuid4().hex[:12]}.pgc.gpg"
    store = open_store(settings, bucket=settings.object_bucket(manifest.object.bucket))
    t0 = time.monotonic()
    store.download_verified(
        manifest.object.key,
        path,
        size_bytes=manifest.object.size_bytes,
        sha256=manifest.object.sha256,
    )
    log.info(
        "downloaded and verified %d bytes in %.1f s",
        manifest.object.size_bytes,
        time.monotonic() - t0,
    )
    return path


def _ensure_database(target: ConnTarget) -> None:
    """Create the target database when it does not exist (an empty one loses nothing)."""
    if database_exists(target):
        return
    build.create_database(target)
    log.info("created target database %s", target.dbname)


class _Tail(threading.Thread):
    """Reads a child's stderr as it comes (a full pipe would stall the child) and keeps
    its last lines for the error message."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self._stream, self.text = stream, ""

    def run(self) -> None:
        with self._stream:
            for raw in self._stream:
                self.text = (self.text + raw.decode(errors="replace"))[-4000:]

    def last(self) -> str:
        self.join(30)
        return self.text.strip()[-1500:]


def _kill(*procs: subprocess.Popen | None) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def decrypt_and_restore(
    settings: Settings,
    manifest: BackupManifest,
    ciphertext: Path,
    target: ConnTarget,
    *,
    no_owner: bool = False,
) -> Restored:
    """gpg --decrypt | pg_restore | psql --single-transaction, committed only after gpg's
    integrity check and the plaintext hash passed (on every path, including pg_restore
    stopping before the stream's end) and every restored table's fingerprint, taken in
    the transaction, matched the manifest (VerificationFailed otherwise, rolled back).
    ``no_owner``: see :func:`restore_command`."""
    if not database_exists(target) and build.applies(settings, manifest):
        tables, seconds = build.restore_new(
            settings, manifest, ciphertext, target, no_owner=no_owner
        )
        return Restored(tables=tables, verify_seconds=round(seconds, 3))
    gpg, first = plaintext.open_archive(settings, ciphertext)
    _ensure_database(target)
    sql_read, sql_write = os.pipe()
    widen_pipe(sql_write)  # pg_restore's SQL to psql: the stream's widest hop
    results_read, results_write = os.pipe()
    restore = psql = None
    committed = False
    try:
        psql = subprocess.Popen(
            apply_command(target),
            stdin=sql_read,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=target.tool_env(),
            pass_fds=(results_write,),
        )
        results_fd = results_write
        os.close(results_write)
        results_write = -1
        restore = subprocess.Popen(
            restore_command(no_owner=no_owner),
            stdin=subprocess.PIPE,
            stdout=sql_write,
            stderr=subprocess.PIPE,
            env=child_env(),
        )
        os.close(sql_read)
        sql_read = -1
        widen_pipe(restore.stdin)
        psql_err, restore_err = _Tail(psql.stderr), _Tail(restore.stderr)
        psql_err.start()
        restore_err.start()
        digest, size = hashlib.sha256(), 0
        chunk, feeding = first, True
        while chunk:
            digest.update(chunk)
            size += len(chunk)
            if feeding:
                try:
                    restore.stdin.write(chunk)
                except BrokenPipeError:
                    feeding = False  # pg_restore stopped: the rest is still hashed
            chunk = gpg.stdout.read(READ_CHUNK)
        with contextlib.suppress(BrokenPipeError):
            restore.stdin.close()
        problem = plaintext.problem(gpg, manifest, digest.hexdigest(), size)
        if problem:
            raise DecryptionFailed(problem + "; the target was rolled back")
        restore.wait()
        if psql.poll() is not None:  # psql ended before its input did: an SQL error
            raise RestoreFailed(
                f"restore into {target.location} failed (psql exit {psql.returncode}); the "
                f"single transaction was rolled back: {psql_err.last()}"
            )
        if restore.returncode != 0:
            raise RestoreFailed(
                f"pg_restore of backup {manifest.backup_id} failed (exit {restore.returncode}); "
                f"nothing was committed to {target.location}: {restore_err.last()}"
            )
        marker = uuid.uuid4().hex
        method = manifest.fingerprint_method
        _write_all(sql_write, _verification_script(results_fd, marker, method).encode())
        with os.fdopen(results_read, "rb") as results:
            results_read = -1
            read = _read_results(results, marker, method)
        if read is None:
            psql.wait()
            raise RestoreFailed(
                f"restore into {target.location} failed while fingerprinting its tables "
                f"(psql exit {psql.returncode}); the single transaction was rolled back: "
                f"{psql_err.last()}"
            )
        restored, verify_seconds = read
        expected = {k: v for k, v in manifest.tables.items() if is_table_entry(k)}
        problems = compare(expected, restored)
        if problems:
            raise VerificationFailed(
                f"restore of {manifest.backup_id} into {target.location} differs from the "
                f"backup in {len(problems)} table(s), so it was rolled back: "
                + "; ".join(problems[:10])
            )
        # Every check passed: the end of psql's input is its COMMIT.
        os.close(sql_write)
        sql_write = -1
        committed = True
        if psql.wait() != 0:
            raise RestoreFailed(
                f"restore into {target.location} failed (psql exit {psql.returncode}); the "
                f"single transaction was rolled back: {psql_err.last()}"
            )
    finally:
        if not committed:
            _kill(psql)  # before its input ends: the transaction never commits
        _kill(restore, gpg)
        for fd in (sql_read, sql_write, results_read, results_write):
            if fd >= 0:
                os.close(fd)
    return Restored(tables=restored, verify_seconds=round(verify_seconds, 3))


def _verification_script(results_fd: int, marker: str, method: str) -> str:
    """psql commands, run after the restored script and before COMMIT, that write to the
    results pipe (psql inherited it as ``results_fd``) the server's clock, each table's
    fingerprint as a JSON array, then ``marker`` and the clock again: the results are
    whole, and the clocks say how long the fingerprints took.

    The restored script emptied the search_path, which changes the text of some values
    (a ``regclass`` reads ``public.t``, not ``t``): it is reset to the connection's own, as
    the backup's fingerprints saw it."""
    clock = "extract(epoch FROM clock_timestamp())"
    return (
        f"\\o /dev/fd/{results_fd}\n"
        "\\pset format unaligned\n"
        "\\pset tuples_only on\n"
        "RESET search_path;\n"
        f"{FINGERPRINT_SETTINGS};\n"
        f"SELECT 'started ' || {clock};\n"
        f"{session_table_queries(method)} \\gexec\n"
        f"SELECT '{marker} ' || {clock};\n"
        "\\o\n"
    )


def _write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to psql's input; a psql that already stopped is judged by what it
    wrote (its results end early), not by the broken pipe."""
    view = memoryview(data)
    with contextlib.suppress(BrokenPipeError):
        while view:
            view = view[os.write(fd, view) :]


def _read_results(results, marker: str, method: str) -> tuple[Fingerprints, float] | None:
    """The tables' fingerprints psql wrote (computed by ``method``) and the seconds they
    took, or None when psql stopped before the marker."""
    found: Fingerprints = {}
    started = None
    for raw in results:
        line = raw.decode().strip()
        if line.startswith("["):
            name, rows, total = json.loads(line)
            found[name] = table_entry(rows, total, method)
        elif line.startswith("started "):
            started = float(line.split()[1])
        elif line.startswith(marker + " ") and started is not None:
            return found, float(line.split()[1]) - started
    return None


def verify(
    manifest: BackupManifest, target: ConnTarget, restored: Restored | None = None
) -> dict[str, int]:
    """Compare every table's row count and content hash with the manifest.

    With ``restored`` (what :func:`decrypt_and_restore` proved before COMMIT) the tables
    are not read again; the large objects and sequences are read from the committed
    target either way.
    """
    with connect(target.conninfo) as conn:
        method = manifest.fingerprint_method
        if restored is None:
            actual = fingerprint_tables(conn, method=method)
        else:
            actual = {**restored.tables, **fingerprint_extras(conn, method)}
    problems = compare(manifest.tables, actual)
    if problems:
        raise VerificationFailed(
            f"restore of {manifest.backup_id} into {target.location} differs from "
            f"the backup in {len(problems)} table(s): " + "; ".join(problems[:10])
        )
    return {"tables": len(actual), "rows": sum(int(t["rows"]) for t in actual.values())}
