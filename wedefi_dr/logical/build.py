"""Restore a logical backup into a database that does not exist yet, on every CPU.

A target that holds something is replaced inside one streamed transaction
(:func:`wedefi_dr.logical.restore.decrypt_and_restore`): that keeps it untouched by
anything unverified, and it runs on one server process. A target that does not exist
needs no transaction for that, because nobody reads a database before it has its name:

1. the whole plaintext is decrypted into an anonymous memory file (``memfd``, never on
   disk) and judged there: gpg's integrity check and the manifest's sha256 and size pass
   before the server sees a byte;
2. ``pg_restore --jobs`` loads it into a new database under a name of its own
   (``<target>_restoring_<id>``), the tables' data and indexes over parallel sessions.
   It needs an archive it can seek in, each worker reading its own entries: the memory
   file is one, a pipe is not;
3. every table, the large objects and the sequences are fingerprinted and compared with
   the manifest: each table as soon as pg_restore reports its data committed, while the
   load goes on, and what is left over parallel sessions after it
   (:mod:`wedefi_dr.logical.proof`);
4. only a copy equal to the manifest is renamed to the target, in one statement. Anything
   else drops the copy, and the target still does not exist.

It is used when the plaintext fits in half the memory available (a larger archive, or
``WEDEFI_DR_RESTORE_JOBS=1``, goes the streamed way).

A process killed mid-restore leaves its copy behind, up to the size of the database. The
copy carries a mark (``COMMENT ON DATABASE``: whose copy it is, by which process, since
when, cleared in the rename's transaction), so the next restore of the same target, holding
that target's restore lock, knows it for a dead run's and drops it
(:func:`drop_leftovers`). Nothing else is ever dropped: not a database of the same shape of
name without the mark, nor a marked one that anyone is connected to.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psutil
import psycopg2
from psycopg2 import errorcodes, sql

from wedefi_dr.catalog.manifest import BackupManifest
from wedefi_dr.config import Settings
from wedefi_dr.errors import DecryptionFailed, RestoreFailed, VerificationFailed
from wedefi_dr.logical import plaintext
from wedefi_dr.logical.proof import LoadingProof, prove_the_rest
from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.postgres.fingerprint import Fingerprints, compare, is_table_entry
from wedefi_dr.postgres.tools import connect, tool
from wedefi_dr.storage.repository import READ_CHUNK

log = logging.getLogger(__name__)
HIDDEN_MARK = "_restoring_"
# PostgreSQL truncates identifiers to 63 bytes; the hidden name must stay whole.
_NAME_BYTES = 63
_SUFFIX_HEX = 8
# The key of the copy's mark in COMMENT ON DATABASE.
COPY_MARK = "wedefi_dr_unproven_copy"
# pg_restore's last lines kept for the error message (its --verbose report is long).
_REPORTED_LINES = 60


def applies(settings: Settings, manifest: BackupManifest) -> bool:
    """Whether a restore into a new database is built in parallel: more than one job, and
    the plaintext fits in half the memory this host has available now."""
    available = psutil.virtual_memory().available
    return settings.restore_jobs > 1 and manifest.plaintext.size_bytes <= available // 2


def _head(dbname: str) -> str:
    """The target's name cut so that it and the suffix fit in 63 bytes."""
    room = _NAME_BYTES - len(HIDDEN_MARK) - _SUFFIX_HEX
    return dbname.encode()[:room].decode(errors="ignore")


def hidden_name(dbname: str) -> str:
    """``<dbname>_restoring_<8 hex>``, the target's name cut to fit 63 bytes."""
    return f"{_head(dbname)}{HIDDEN_MARK}{uuid.uuid4().hex[:_SUFFIX_HEX]}"


def _is_hidden_name_of(name: str, dbname: str) -> bool:
    pattern = re.escape(_head(dbname) + HIDDEN_MARK) + f"[0-9a-f]{{{_SUFFIX_HEX}}}"
    return re.fullmatch(pattern, name) is not None


def load_command(target: ConnTarget, archive_fd: int, jobs: int, *, no_owner: bool) -> list[str]:
    """pg_restore loading the archive open as ``archive_fd`` into ``target`` over ``jobs``
    sessions, stopping at the first error. ``no_owner``: see
    :func:`wedefi_dr.logical.restore.restore_command`."""
    owner = ["--no-owner"] if no_owner else []
    return [
        tool("pg_restore"),
        f"--jobs={jobs}",
        "--exit-on-error",
        "--verbose",  # each table's data reported committed: see wedefi_dr.logical.proof
        "--no-password",
        *owner,
        *target.tool_args(),
        f"/dev/fd/{archive_fd}",
    ]


def decrypt_into_memory(settings: Settings, manifest: BackupManifest, ciphertext: Path) -> int:
    """A memory file holding the whole plaintext, every check of
    :func:`plaintext.problem` passed (DecryptionFailed otherwise, the file closed)."""
    gpg, chunk = plaintext.open_archive(settings, ciphertext)
    fd = os.memfd_create("wedefi-dr-archive", 0)
    try:
        digest, size = hashlib.sha256(), 0
        while chunk:
            digest.update(chunk)
            size += len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            chunk = gpg.stdout.read(READ_CHUNK)
        problem = plaintext.problem(gpg, manifest, digest.hexdigest(), size)
        if problem:
            raise DecryptionFailed(problem + "; nothing was restored")
    except BaseException:
        os.close(fd)
        if gpg.poll() is None:
            gpg.kill()
            gpg.wait()
        raise
    return fd


def _on_server(target: ConnTarget, statement: sql.Composed) -> None:
    """One statement on the target's server, from its maintenance database, outside any
    transaction (CREATE, DROP and RENAME of a database need that)."""
    maintenance = target.with_dbname("postgres").conninfo
    with connect(maintenance, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(statement)


def create_database(target: ConnTarget) -> None:
    """Create the target's database, empty (from template1, as CREATE DATABASE does)."""
    _on_server(target, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target.dbname)))


def mark_unproven(hidden: ConnTarget, target: ConnTarget) -> None:
    """Write on the copy whose unproven copy it is, by which process and since when: what
    :func:`drop_leftovers` requires before it drops anything, and what an engineer reading
    ``\\l+`` sees."""
    mark = {
        COPY_MARK: {
            "of": target.location,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    }
    statement = sql.SQL("COMMENT ON DATABASE {} IS {}")
    _on_server(
        hidden, statement.format(sql.Identifier(hidden.dbname), sql.Literal(json.dumps(mark)))
    )


def _mark_of(comment: str | None) -> dict[str, object] | None:
    try:
        mark = json.loads(comment or "")[COPY_MARK]
    except (ValueError, KeyError, TypeError):
        return None
    return mark if isinstance(mark, dict) else None


def drop_leftovers(target: ConnTarget) -> list[str]:
    """Drop the copies of ``target`` that killed restores left: databases named as
    :func:`hidden_name` names them and marked by :func:`mark_unproven` as copies of this
    target. Call it only holding the restore lock of ``target``: then no live restore of it
    exists, so every such copy is a dead run's. A copy that anyone is connected to (a
    pg_restore that outlived its parent), or that this login may not drop (another owner's),
    is left with a warning, and the restore goes on. Returns the dropped names."""
    maintenance = target.with_dbname("postgres").conninfo
    with connect(maintenance, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
            "WHERE strpos(datname, %s) > 0 ORDER BY datname",
            (HIDDEN_MARK,),
        )
        found = cur.fetchall()
        dropped = []
        for name, comment in found:
            mark = _mark_of(comment)
            if not _is_hidden_name_of(name, target.dbname) or mark is None:
                continue
            if mark.get("of") != target.location:
                continue
            try:
                cur.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
            except psycopg2.Error as exc:
                why = (
                    "someone is connected to it (pg_stat_activity)"
                    if exc.pgcode == errorcodes.OBJECT_IN_USE
                    else f"the drop failed: {str(exc).strip()}"
                )
                log.warning(
                    "left %s, the unproven copy of %s begun by pid %s on %s at %s: %s",
                    name,
                    target.dbname,
                    mark.get("pid"),
                    mark.get("host"),
                    mark.get("since"),
                    why,
                )
                continue
            log.warning(
                "dropped %s, the unproven copy of %s left by a restore killed mid-way "
                "(pid %s on %s, begun %s)",
                name,
                target.dbname,
                mark.get("pid"),
                mark.get("host"),
                mark.get("since"),
            )
            dropped.append(name)
    return dropped


def _drop(target: ConnTarget) -> None:
    """Drop the hidden copy; a failure here is logged, the restore's own error stands."""
    name = sql.Identifier(target.dbname)
    try:
        _on_server(target, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
    except Exception as exc:  # noqa: BLE001 - the caller's error is the one to raise
        log.error("could not drop the unproven copy %s (drop it by hand): %s", target.dbname, exc)


def _load(
    hidden: ConnTarget, archive_fd: int, jobs: int, proof: LoadingProof, *, no_owner: bool
) -> None:
    """Run pg_restore, every line it reports fed to ``proof`` as it comes; RestoreFailed
    with pg_restore's own error when it fails."""
    proc = subprocess.Popen(
        load_command(hidden, archive_fd, jobs, no_owner=no_owner),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=hidden.tool_env(),
        pass_fds=(archive_fd,),
    )
    tail: collections.deque[str] = collections.deque(maxlen=_REPORTED_LINES)
    try:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            tail.append(line)
            proof.feed(line)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        lines = list(tail)
        first_error = next((i for i, ln in enumerate(lines) if "error:" in ln), len(lines) - 10)
        said = "\n".join(lines[max(first_error, 0) :]).strip()
        raise RestoreFailed(
            f"pg_restore into the new database {hidden.location} failed (exit "
            f"{proc.returncode}); it was dropped: {said[-1500:]}"
        )


def _unmark_and_rename(hidden: ConnTarget, target: ConnTarget) -> None:
    """Clear the copy's mark and give it the target's name in one transaction (both are
    transactional in PostgreSQL): a process killed at any moment leaves either a marked
    copy, which the next restore drops, or the proven target, never an unmarked copy."""
    names = sql.Identifier(hidden.dbname), sql.Identifier(target.dbname)
    maintenance = target.with_dbname("postgres").conninfo
    try:
        with connect(maintenance) as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("COMMENT ON DATABASE {} IS NULL").format(names[0]))
            cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(*names))
    except psycopg2.Error as exc:
        if exc.pgcode != errorcodes.DUPLICATE_DATABASE:
            raise
        raise RestoreFailed(
            f"{target.location} was created by someone else during the restore; it was "
            "left as it is and the restored copy dropped. Restore again, into a new "
            "database or with --overwrite"
        ) from exc


def restore_new(
    settings: Settings,
    manifest: BackupManifest,
    ciphertext: Path,
    target: ConnTarget,
    *,
    no_owner: bool = False,
) -> tuple[Fingerprints, float]:
    """Build ``target`` (a database that does not exist) from the backup, as the module
    says; the tables' fingerprints (equal to the manifest's) and the seconds they took."""
    jobs = settings.restore_jobs
    started = time.monotonic()
    archive_fd = decrypt_into_memory(settings, manifest, ciphertext)
    decrypted = time.monotonic()
    hidden = target.with_dbname(hidden_name(target.dbname))
    try:
        create_database(hidden)
        mark_unproven(hidden, target)
        log.info("restoring into %s, renamed to %s once proven", hidden.dbname, target.dbname)
        try:
            proving = LoadingProof(hidden, manifest.fingerprint_method)
            try:
                _load(hidden, archive_fd, jobs, proving, no_owner=no_owner)
            finally:
                early = proving.finish()
            os.close(archive_fd)
            archive_fd = -1
            loaded = time.monotonic()
            found = {
                **early,
                **prove_the_rest(hidden, manifest.fingerprint_method, jobs, set(early)),
            }
            seconds = time.monotonic() - loaded
            log.info(
                "decrypted and checked %d bytes in %.2f s, loaded over %d sessions in %.2f s "
                "(%d tables fingerprinted meanwhile), the other %d fingerprinted in %.2f s",
                manifest.plaintext.size_bytes,
                decrypted - started,
                jobs,
                loaded - decrypted,
                len(early),
                sum(1 for name in found if is_table_entry(name)) - len(early),
                seconds,
            )
            problems = compare(manifest.tables, found)
            if problems:
                raise VerificationFailed(
                    f"restore of {manifest.backup_id} into {target.location} differs from "
                    f"the backup in {len(problems)} table(s), so the new database was "
                    "dropped before it took the target's name: " + "; ".join(problems[:10])
                )
            _unmark_and_rename(hidden, target)
        except BaseException:
            _drop(hidden)
            raise
    finally:
        if archive_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(archive_fd)
    tables = {name: entry for name, entry in found.items() if is_table_entry(name)}
    return tables, seconds
