"""The one streaming pipeline of every backup: producer → sha256 → gpg → sha256 → upload.

A backup is a producer process (``pg_dump``, ``pg_basebackup``) whose stdout is hashed as
plaintext, optionally transformed (the base backup parses its tar and gzips it), encrypted
by ``gpg --symmetric``, hashed again as ciphertext and sent to a multipart upload. One
pass, constant memory, no plaintext on disk.

The upload learns of a failure upstream only through the stream it reads, so every
producer (the process, the pump thread, gpg, any work running alongside) is checked when
the ciphertext reaches EOF, before EOF is reported: a failed producer raises there, the
transfer manager aborts the multipart upload, and nothing is left at the key. On any
failure every process still running is killed and the error is a :class:`BackupFailed`
naming the part that failed, with its stderr.

The upload runs in a thread of its own while the calling thread only waits for it, so an
interruption of the caller (the task's timeout, a KeyboardInterrupt) lands in this
module, not inside boto3's transfer manager, whose shutdown would wait for a stream that
never ends: the producer and gpg are killed first, which ends the stream, and the upload
then aborts as after any other failure. No orphan pg_dump keeps a snapshot open.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

from wedefi_dr.errors import BackupFailed
from wedefi_dr.storage import encryption
from wedefi_dr.storage.repository import READ_CHUNK, HashingReader, Repository

log = logging.getLogger(__name__)
PROGRESS_EVERY = 64 * 1024 * 1024
STDERR_TAIL = 800
# How long an interrupted run waits for its upload to abort once the stream was killed.
ABORT_WAIT_SECONDS = 60
# The kernel buffer of each pipe between the stream's processes (64 KiB by default; at most
# /proc/sys/fs/pipe-max-size, 1 MiB by default, for an unprivileged user).
PIPE_BYTES = 1024 * 1024

Transform = Callable[[IO[bytes], IO[bytes]], None]


def copy_stream(source: IO[bytes], sink: IO[bytes]) -> None:
    """The default transform: the producer's bytes go to gpg unchanged."""
    while chunk := source.read(READ_CHUNK):
        sink.write(chunk)


def widen_pipe(stream: IO[bytes] | int | None) -> None:
    """Give the pipe under ``stream`` (a file object or a descriptor) a buffer of
    :data:`PIPE_BYTES`, best effort.

    With 64 KiB a stage blocks, and must be woken and scheduled again, every 64 KiB: on a
    loaded host that wait for a CPU, repeated at each of the stream's hops, costs more wall
    time than the copying. A megabyte lets each stage run on while the next one waits for
    its turn. A kernel that refuses (an older one, a lowered limit) keeps the default,
    which is only slower.
    """
    if stream is None:
        return
    with contextlib.suppress(OSError, ValueError):
        fd = stream if isinstance(stream, int) else stream.fileno()
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def progress_logger(what: str) -> Callable[[int], None]:
    """Logs ``what: N MB (R MB/s)`` every 64 MB: a long step reports its progress."""
    state = {"next": PROGRESS_EVERY, "t0": time.monotonic()}

    def report(done: int) -> None:
        if done >= state["next"]:
            elapsed = max(time.monotonic() - state["t0"], 1e-6)
            log.info("%s: %.0f MB (%.1f MB/s)", what, done / 1e6, done / 1e6 / elapsed)
            state["next"] += PROGRESS_EVERY

    return report


class _PlaintextReader:
    """The producer's stdout, hashed and counted as the transform reads it."""

    def __init__(self, raw: IO[bytes], progress: Callable[[int], None]) -> None:
        self.raw, self.progress = raw, progress
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n if n and n > 0 else READ_CHUNK)
        if data:
            self.sha256.update(data)
            self.size += len(data)
            self.progress(self.size)
        return data


@dataclass(frozen=True)
class Producer:
    """The process whose stdout is the backup's plaintext. ``name`` is what errors say."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Streamed:
    """What passed through: the plaintext the producer wrote and the object stored."""

    plaintext_size: int
    plaintext_sha256: str
    stored_size: int
    stored_sha256: str


@dataclass
class EncryptedUpload:
    """One backup stream from ``producer`` to ``key`` in ``store``, all or nothing.

    ``transform`` reads the producer's (hashed) stdout and writes what gpg encrypts; an
    exception it raises fails the backup. ``alongside`` are named jobs run in threads
    while the stream flows (the logical backup's fingerprints in the exported snapshot);
    each must have finished without error before the upload may complete.
    """

    producer: Producer
    passphrase: str = field(repr=False)
    gpg: encryption.GpgParams
    transform: Transform = copy_stream
    alongside: Mapping[str, Callable[[], None]] = field(default_factory=dict)
    label: str = "backup"

    def run(self, store: Repository, key: str) -> Streamed:
        """Stream, encrypt and upload; raises BackupFailed with nothing left at ``key``."""
        proc = gpg = upload = None
        try:
            proc = subprocess.Popen(
                list(self.producer.argv),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=dict(self.producer.env) if self.producer.env is not None else None,
            )
            gpg = encryption.start_encrypt(self.passphrase, self.gpg)
            for pipe in (proc.stdout, gpg.stdin, gpg.stdout):
                widen_pipe(pipe)
            plaintext = _PlaintextReader(proc.stdout, progress_logger(f"{self.label} read"))
            pump = _Thread(f"{self.producer.name}-to-gpg", self._pump(plaintext, gpg.stdin))
            jobs = {name: _Thread(name, job) for name, job in self.alongside.items()}
            for thread in (pump, *jobs.values()):
                thread.start()
            reader = HashingReader(
                gpg.stdout,
                on_eof=_once(lambda: self._check(proc, pump, gpg, jobs)),
                progress=progress_logger(f"{self.label} uploaded"),
            )
            # Completes only after the reader hit EOF, i.e. after every producer passed.
            upload = _Thread("upload", lambda: store.upload_all_or_nothing(key, reader))
            upload.start()
            upload.join()  # a signal's exception (the task's timeout) interrupts this wait
            if upload.error is not None:
                raise upload.error
        except BaseException as exc:
            _kill(proc, gpg)
            if upload is not None:
                upload.join(ABORT_WAIT_SECONDS)  # the killed stream ends it: it aborts
                # A multipart upload created while the first abort listed the key's uploads
                # would outlive it: abort once more, after the upload thread has ended.
                store.abort_multipart_uploads(key)
            log.error("%s failed; nothing kept at %s", self.label, key)
            if isinstance(exc, BackupFailed | TimeoutError) or not isinstance(exc, Exception):
                raise
            raise BackupFailed(f"{self.label} failed: {type(exc).__name__}: {exc}") from exc
        return Streamed(
            plaintext_size=plaintext.size,
            plaintext_sha256=plaintext.sha256.hexdigest(),
            stored_size=reader.size,
            stored_sha256=reader.sha256.hexdigest(),
        )

    def _pump(self, plaintext: _PlaintextReader, sink: IO[bytes]) -> Callable[[], None]:
        def pump() -> None:
            try:
                self.transform(plaintext, sink)
            finally:
                sink.close()  # gpg sees EOF (or a broken pipe is recorded as the error)

        return pump

    def _check(
        self,
        proc: subprocess.Popen[bytes],
        pump: _Thread,
        gpg: subprocess.Popen[bytes],
        jobs: Mapping[str, _Thread],
    ) -> None:
        """At EOF of the ciphertext: everything upstream must have succeeded, in stream
        order, so the first cause is named (a dead producer, not the pipe it broke)."""
        pump.join()
        name = self.producer.name
        if pump.error is not None and proc.poll() is None:
            # The stream broke downstream (gpg gone) while the producer still runs: nobody
            # reads its stdout any more, so it would block on a full pipe and its stderr
            # would never end. Stop it, and name what broke first.
            _kill(proc)
            if gpg.wait() != 0:
                gerr = gpg.stderr.read().decode(errors="replace")
                raise BackupFailed(f"gpg --symmetric failed (exit {gpg.returncode}): {gerr}")
            raise BackupFailed(f"streaming {name}'s output to gpg failed: {pump.error!r}")
        err = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise BackupFailed(f"{name} failed (exit {proc.returncode}): {err[-STDERR_TAIL:]}")
        if isinstance(pump.error, BackupFailed):
            raise pump.error
        if pump.error is not None:
            raise BackupFailed(f"streaming {name}'s output to gpg failed: {pump.error!r}")
        gerr = gpg.stderr.read().decode(errors="replace")
        if gpg.wait() != 0:
            raise BackupFailed(f"gpg --symmetric failed (exit {gpg.returncode}): {gerr}")
        for job_name, job in jobs.items():
            job.join()
            if job.error is not None:
                raise BackupFailed(f"{job_name} failed: {job.error}")


class _Thread(threading.Thread):
    """A daemon thread that keeps its exception for the check at EOF."""

    def __init__(self, name: str, target: Callable[[], None]) -> None:
        super().__init__(name=name, daemon=True)
        self._job = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._job()
        except BaseException as exc:  # reported by the check at EOF
            self.error = exc


def _once(check: Callable[[], None]) -> Callable[[], None]:
    """The reader may see EOF more than once; the producers are judged once, and a failed
    judgement is raised again on every later EOF."""
    verdict: list[BaseException | None] = []

    def run() -> None:
        if not verdict:
            try:
                check()
            except BaseException as exc:
                verdict.append(exc)
                raise
            verdict.append(None)
        elif verdict[0] is not None:
            raise verdict[0]

    return run


def _kill(*procs: subprocess.Popen[bytes] | None) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
