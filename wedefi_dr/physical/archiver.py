"""The resident WAL archiver: one process per cluster, uploading every ``.ready`` file.

A process per segment (``wal-push``) pays interpreter start, imports, key derivation and
a fresh S3 connection for each 16 MB, and PostgreSQL waits for it one segment at a time,
so a write burst builds a backlog. As pgBackRest's asynchronous ``archive-push`` does,
this process stays up beside the server: a warm boto3 client, the MAC key derived once,
and ``wal_archiver_parallel`` uploads at a time of every file the server has marked
``.ready`` in ``pg_wal/archive_status`` (and every file a hand-off asks for), oldest first.
Each segment is sealed and stored by :class:`wedefi_dr.physical.wal.Archive`: the same
encoding (zstd + gpg under the WAL key, opened once at start), checksums, MAC and
conditional PUT as ``wal-push``, so ``wal-fetch`` and PITR read its objects unchanged, and
identical re-pushes and conflicts behave alike.

Its records live in ``pg_wal/.wedefi-archiver`` (mode 700, the server's OS user):

- ``done/<name>``: the plaintext sha256 and the record of the file read
  (``walscript.file_record``: boot, inode, size, times, the same before and after the
  read), written once the object is durable (S3 PUT returned, or the identical object was
  there already); the hand-off (``archiver_handoff.py``, the ``archive_command``) exits 0
  only when its file has that record;
- ``failed/<name>``: ``<exit code> <message>`` (3: different content archived under the
  name, never retried on its own; 2: any other error, retried with a growing pause);
- ``want/<name>``: a hand-off is waiting for this file: served first, retried at once;
- ``lock`` (held exclusively while it runs: one archiver per ``pg_wal``), ``archiver.log``.

It exits after ``wal_archiver_idle_seconds`` without work, when the server whose
``postmaster.pid`` it saw at start is gone, or on SIGTERM; the next hand-off starts it
again. Secrets are read from the env file and removed from the environment once the S3
client and settings exist, so no gpg child inherits them.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from wedefi_dr.physical import archiver_handoff, wal, walscript

if TYPE_CHECKING:
    from wedefi_dr.config import Settings

SPOOL = ".wedefi-archiver"
# The server waits from .ready to the upload's end; a scan (two listings) costs ~50 µs, so at
# 5 ms it is 1 % of a core while the archiver runs, and the wait before it starts 2.5 ms on average.
SCAN_SECONDS = 0.005
LOCK_WAIT_SECONDS = 3.0
MAX_BACKOFF_SECONDS = 30.0
SECRET_ENV = (
    "WEDEFI_DR_GPG_PASSPHRASE",
    "WEDEFI_DR_GPG_PREVIOUS_PASSPHRASES",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


def _log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} wedefi-dr archiver[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(text)
    tmp.replace(path)


def _postmaster_pid(pg_wal: Path) -> int | None:
    try:
        return int((pg_wal.parent / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Archiver:
    """The archiver of one ``pg_wal`` directory (see the module docstring)."""

    settings: Settings
    pg_wal: Path
    archive: wal.Archive = field(init=False)
    inflight: dict[str, Future] = field(default_factory=dict)
    pushed: dict[str, str] = field(default_factory=dict)
    retry_at: dict[str, float] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.spool = self.pg_wal / SPOOL
        for sub in ("done", "failed", "want"):
            (self.spool / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.archive = wal.Archive(self.settings)
        self.pool = ThreadPoolExecutor(
            max_workers=self.settings.wal_archiver_parallel, thread_name_prefix="push"
        )
        self.lock = threading.Lock()

    # ---- one segment ---------------------------------------------------------------------
    def _push(self, name: str) -> None:
        """Store ``name`` and record the outcome; runs in a pool thread."""
        try:
            with open(self.pg_wal / name, "rb") as f:
                st = os.fstat(f.fileno())
                before = walscript.file_record(st)
                earlier = self.pushed.get(name)
                if earlier and earlier == hashlib.file_digest(f, "sha256").hexdigest():
                    sealed, sha = None, earlier
                else:
                    f.seek(0)
                    sealed = self.archive.seal(name, f, st.st_size)
                    sha = sealed.plain_sha
                record = self._unchanged(name, f, before)
            what = self.archive.store_sealed(sealed) if sealed else "durable earlier (identical)"
            _write(self.spool / "done" / name, archiver_handoff.done_record(sha, record))
            with self.lock:
                self.pushed[name] = sha
                self.failures.pop(name, None)
                self.retry_at.pop(name, None)
            (self.spool / "want" / name).unlink(missing_ok=True)
            (self.spool / "failed" / name).unlink(missing_ok=True)
            _log(f"{name}: {what}")
        except wal.ArchiveConflict as exc:
            self._failed(name, wal.EXIT_REFUSED, str(exc), retry=False)
        except Exception as exc:
            self._failed(name, 2, f"{type(exc).__name__}: {exc}", retry=True)

    @staticmethod
    def _unchanged(name: str, f: BinaryIO, before: str) -> str:
        """The record of the file just read, which must be the one it had before: the server
        wrote the file whole before marking it ``.ready``, so a change means another writer,
        and the push is retried (nothing of it stored: this runs before the upload)."""
        after = walscript.file_record(os.fstat(f.fileno()))
        if after != before:
            raise OSError(f"{name} changed while it was read")
        return after

    def _failed(self, name: str, code: int, message: str, *, retry: bool) -> None:
        (self.spool / "want" / name).unlink(missing_ok=True)
        _write(self.spool / "failed" / name, f"{code} {message}")
        with self.lock:
            count = self.failures[name] = self.failures.get(name, 0) + 1
            pause = min(MAX_BACKOFF_SECONDS, 2.0 ** (count - 1))
            self.retry_at[name] = time.monotonic() + pause if retry else float("inf")
        then = f"retry in {pause:.0f} s" if retry else "not retried"
        _log(f"{name} FAILED ({then}): {message}")

    # ---- the loop ------------------------------------------------------------------------
    def _candidates(self) -> tuple[list[str], set[str]]:
        """``.ready`` files and hand-off requests, oldest first; and the requested ones."""
        try:
            status = (self.pg_wal / "archive_status").iterdir()
            ready = {p.name.removesuffix(".ready") for p in status if p.name.endswith(".ready")}
        except OSError:
            ready = set()
        try:
            wanted = {p.name for p in (self.spool / "want").iterdir()}
        except OSError:
            wanted = set()
        names = {n for n in ready | wanted if wal.NAME_RE.match(n)}
        return sorted(names), {n for n in wanted if wal.NAME_RE.match(n)}

    def _tidy(self, ready: set[str]) -> None:
        """Forget segments the server no longer has (recycled after archiving)."""
        with self.lock:
            for name in [n for n in self.pushed if n not in ready]:
                if not (self.pg_wal / name).exists():
                    self.pushed.pop(name, None)
                    (self.spool / "done" / name).unlink(missing_ok=True)

    def scan_once(self) -> int:
        """Start uploads for what needs one; returns how many are running."""
        names, wanted = self._candidates()
        now = time.monotonic()
        for name in [n for n, f in self.inflight.items() if f.done()]:
            del self.inflight[name]
        for name in names:
            if name in self.inflight:
                continue
            if name in wanted:  # a hand-off waits: now, whatever the pause after a failure
                self.inflight[name] = self.pool.submit(self._push, name)
                continue
            if name in self.pushed or self.retry_at.get(name, 0.0) > now:
                continue
            self.inflight[name] = self.pool.submit(self._push, name)
        return len(self.inflight)

    def warm_up(self) -> None:
        """Open (or create) the WAL key before the first segment, so no segment waits for
        the one expensive gpg S2K of the backup passphrase; a failure is retried by the
        first push, which reports it."""
        try:
            self.archive.wal_keys.for_key(self.archive.keyring.current, create=True)
        except Exception as exc:
            _log(f"WAL key not ready yet: {type(exc).__name__}: {exc}")

    def serve(self) -> None:
        """Scan until idle, the server gone, or a stop signal."""
        postmaster = _postmaster_pid(self.pg_wal)
        idle_since = time.monotonic()
        last_tidy = 0.0
        _log(
            f"archiving {self.pg_wal} to "
            f"{self.archive.store.url(wal.archive_prefix(self.settings))}/ "
            f"({self.settings.wal_archiver_parallel} uploads at a time)"
        )
        self.warm_up()
        while not self.stop.is_set():
            busy = self.scan_once()
            now = time.monotonic()
            if busy:
                idle_since = now
            elif now - idle_since > self.settings.wal_archiver_idle_seconds:
                _log("idle: exiting (the next archive_command starts an archiver again)")
                break
            if now - last_tidy > 5.0:
                last_tidy = now
                self._tidy(set(self._candidates()[0]))
                if postmaster is not None and not _alive(postmaster) and not busy:
                    _log(f"the server (pid {postmaster}) is gone: exiting")
                    break
            self.stop.wait(SCAN_SECONDS)
        self.pool.shutdown(wait=True)


def take_lock(spool: Path) -> int | None:
    """The exclusive lock that makes this the one archiver of its ``pg_wal``, or None."""
    spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(spool / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + LOCK_WAIT_SECONDS  # a hand-off may hold it shared briefly
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            if time.monotonic() > deadline:
                os.close(fd)
                return None
            time.sleep(0.05)


def _settings() -> Settings:
    from wedefi_dr.config import Settings

    settings = Settings()
    settings.require("gpg_passphrase", "bucket")
    return settings


def main(argv: list[str] | None = None) -> int:
    """``python -I -m wedefi_dr.physical.archiver --env-file FILE PG_WAL``."""
    parser = argparse.ArgumentParser(prog="wedefi-dr-archiver", description=__doc__.split("\n")[0])
    parser.add_argument("pg_wal")
    parser.add_argument("--env-file", required=True)
    args = parser.parse_args(argv)
    pg_wal = Path(args.pg_wal).resolve()
    lock = take_lock(pg_wal / SPOOL)
    if lock is None:
        _log(f"another archiver serves {pg_wal}: exiting")
        return 0
    try:
        wal.load_env_file(args.env_file)
        archiver = Archiver(_settings(), pg_wal)
    except Exception as exc:
        _log(f"cannot start: {type(exc).__name__}: {exc}")
        return 2
    for key in SECRET_ENV:
        os.environ.pop(key, None)
    (pg_wal / SPOOL / "archiver.pid").write_text(str(os.getpid()))
    signal.signal(signal.SIGTERM, lambda *_: archiver.stop.set())
    signal.signal(signal.SIGINT, lambda *_: archiver.stop.set())
    try:
        archiver.serve()
    finally:
        (pg_wal / SPOOL / "archiver.pid").unlink(missing_ok=True)
        os.close(lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
