"""Near-zero RPO: WAL streamed by ``pg_receivewal`` into the archive, beside archive_command.

``archive_command`` sees a segment only once it is complete (16 MB, or ``archive_timeout``
later): a primary lost before that loses the commits of the segment it was writing. A
resident ``pg_receivewal`` on a replication slot of its own receives each commit as the
server writes it (with ``--synchronous`` it flushes and acknowledges at once, so a
primary listing it in ``synchronous_standby_names`` waits for it), and this module:

- archives each completed segment (and ``.history`` file) it wrote with ``wal-push``'s
  own rules (:meth:`wedefi_dr.physical.wal.Archive.push_bytes`): the same object the
  server's ``archive_command`` stores, so whichever comes first, the second is an
  identical re-push;
- re-uploads the segment it is still writing (``<seg>.partial``) at most once per
  ``wal_stream_interval_seconds`` when it changed, under its own key
  ``<prefix>/wal-stream/<seg>.partial``. That key is overwritten as the segment grows;
  the archive's ``wal/`` prefix is never overwritten, and a promoted server's own
  ``<seg>.partial`` there never collides with it. Each upload is gzip + gpg like every
  WAL object, with the checksums and an HMAC over its name in the stream namespace.

Recovery (``wal-fetch``) uses a streamed partial only when it is the best data there is:
the segment asked for is not archived, nothing later on its timeline is, and no later
timeline exists. It says so in the server's log, and recovery ends inside that segment.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from wedefi_dr.errors import DRError, NotAuthentic
from wedefi_dr.physical import wal
from wedefi_dr.storage import authentication

if TYPE_CHECKING:
    from wedefi_dr.config import Settings

STREAM_DIR = "wal-stream"
PARTIAL = ".partial"
APP_NAME = "wedefi-wal-stream"


class StreamFailed(DRError):
    """pg_receivewal could not be started or stopped streaming; its words follow."""


def stream_prefix(settings: Settings) -> str:
    return "/".join([settings.prefix.strip("/"), STREAM_DIR])


def stream_key(settings: Settings, segment: str) -> str:
    return f"{stream_prefix(settings)}/{segment}{PARTIAL}"


def _mac_name(segment: str) -> str:
    """The name the MAC binds: the stream namespace, so an object copied from there into
    ``wal/`` (or back) does not verify."""
    return f"{STREAM_DIR}/{segment}{PARTIAL}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_partial(archive: wal.Archive, segment: str, plain: bytes) -> None:
    """Store (overwrite) the streamed partial of ``segment``: encrypted, hashed, MAC'd."""
    settings = archive.settings
    sha = _sha256(plain)
    cipher = wal.encode(settings, plain)
    extra = {"ServerSideEncryption": settings.sse} if settings.sse else {}
    archive.client.put_object(
        Bucket=archive.bucket,
        Key=stream_key(settings, segment),
        Body=cipher,
        StorageClass=settings.storage_class,
        Metadata={
            "plain-sha256": sha,
            "plain-size": str(len(plain)),
            "object-sha256": _sha256(cipher),
            "encoding": wal.ENCODING,
            "uploaded-at": datetime.now(UTC).isoformat(),
            wal.MAC_KEY_ID: archive.keyring.current.key_id,
            wal.MAC: authentication.object_mac(
                archive.keyring.current, _mac_name(segment), sha, len(plain)
            ),
        },
        **extra,
    )


def fetch_partial(archive: wal.Archive, segment: str, workdir: Path) -> tuple[bytes, str] | None:
    """The verified plaintext of ``segment``'s streamed partial and when it was uploaded,
    or None when there is none. A damaged or planted object raises ArchiveCorrupt."""
    from botocore.exceptions import ClientError

    settings = archive.settings
    try:
        obj = archive.client.get_object(Bucket=archive.bucket, Key=stream_key(settings, segment))
    except ClientError as exc:
        if archive._missing(exc):
            return None
        raise
    cipher = obj["Body"].read()
    meta = obj.get("Metadata", {})
    if meta.get("encoding") != wal.ENCODING or _sha256(cipher) != meta.get("object-sha256"):
        raise wal.ArchiveCorrupt(f"streamed partial {segment}: object fails its sha256")
    try:
        authentication.verify_object_mac(
            archive.keyring,
            _mac_name(segment),
            meta.get("plain-sha256", ""),
            int(meta.get("plain-size", -1)),
            meta.get(wal.MAC_KEY_ID),
            meta.get(wal.MAC),
        )
    except NotAuthentic as exc:
        raise wal.ArchiveCorrupt(f"streamed partial {segment} refused: {exc}") from exc
    plain = wal.decode(settings, cipher, workdir)
    if _sha256(plain) != meta["plain-sha256"]:
        raise wal.ArchiveCorrupt(f"streamed partial {segment}: decrypted content fails sha256")
    return plain, meta.get("uploaded-at", "?")


def later_timeline_exists(archive: wal.Archive, segment: str) -> bool:
    """True when the archive holds a history file or segment of a timeline after
    ``segment``'s (keys sort by timeline first)."""
    prefix = wal.archive_prefix(archive.settings) + "/"
    resp = archive.client.list_objects_v2(
        Bucket=archive.bucket, Prefix=prefix, StartAfter=prefix + segment[:8] + "~", MaxKeys=1
    )
    return bool(resp.get("Contents"))


def best_partial(archive: wal.Archive, segment: str, workdir: Path) -> bytes | None:
    """``wal-fetch``'s last resort for a segment the archive does not hold: the streamed
    partial, only when nothing later exists on this timeline or any later one."""
    if not wal.SEGMENT_RE.match(segment):
        return None
    if archive.later_segments(segment, limit=1) or later_timeline_exists(archive, segment):
        return None
    found = fetch_partial(archive, segment, workdir)
    if found is None:
        return None
    plain, uploaded = found
    wal._log(
        f"fetch {segment}: not archived as a complete segment; using the streamed partial "
        f"uploaded {uploaded} ({len(plain)} bytes): it is the newest WAL there is, and "
        "recovery ends inside it"
    )
    return plain


# ---- the resident uploader -----------------------------------------------------------------
@dataclass
class Uploader:
    """Watches pg_receivewal's directory: completed files to the archive, the partial to
    the stream key when it changed. One :meth:`tick` per interval."""

    settings: Settings
    directory: Path
    archive: wal.Archive = field(init=False)
    _partial_sha: dict[str, str] = field(default_factory=dict, init=False)
    uploads: int = field(default=0, init=False)
    last_error: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.archive = wal.Archive(self.settings)

    def tick(self) -> list[str]:
        """One pass; returns what it stored. Errors are kept (and retried next pass)."""
        done: list[str] = []
        try:
            entries = sorted(p.name for p in self.directory.iterdir())
        except OSError as exc:
            self.last_error = str(exc)
            return done
        for name in entries:
            path = self.directory / name
            try:
                if wal.NAME_RE.match(name) and not name.endswith(PARTIAL):
                    what = self.archive.push_bytes(name, path.read_bytes())
                    if wal.SEGMENT_RE.match(name):
                        path.unlink()  # archived; the slot restarts from the server's side
                    self._partial_sha.pop(name, None)
                    done.append(f"{name}: {what}")
                elif name.endswith(PARTIAL) and wal.SEGMENT_RE.match(name[: -len(PARTIAL)]):
                    segment = name[: -len(PARTIAL)]
                    plain = path.read_bytes()
                    sha = _sha256(plain)
                    if self._partial_sha.get(segment) != sha:
                        put_partial(self.archive, segment, plain)
                        self._partial_sha[segment] = sha
                        done.append(f"{name}: streamed partial uploaded")
            except FileNotFoundError:
                continue  # renamed from .partial to complete meanwhile: next pass
            except Exception as exc:  # the next pass retries; the loop never dies
                self.last_error = f"{name}: {type(exc).__name__}: {exc}"
                wal._log(f"wal-stream: {self.last_error}")
        self.uploads += len(done)
        return done


def _target(conninfo: str):  # noqa: ANN202 - a ConnTarget
    from wedefi_dr.postgres.conninfo import ConnTarget

    return ConnTarget.parse(conninfo, allow_password=True)


def receivewal_argv(conninfo: str, directory: Path, slot: str, *, synchronous: bool) -> list[str]:
    """pg_receivewal's command line: the conninfo without its password (that goes in the
    child's ``PGPASSWORD``, never on a command line ``ps`` shows)."""
    from wedefi_dr.postgres.tools import tool

    return [
        tool("pg_receivewal"),
        *_target(conninfo).tool_args(),
        "-D",
        str(directory),
        "-S",
        slot,
        "--status-interval=1",
        "--no-password",
        *(["--synchronous"] if synchronous else []),
    ]


def create_slot(conninfo: str, slot: str) -> None:
    """The stream's own physical slot (the server keeps what it has not received)."""
    from wedefi_dr.postgres.tools import tool

    target = _target(conninfo)
    argv = [tool("pg_receivewal"), *target.tool_args(), "-S", slot]
    result = subprocess.run(
        [*argv, "--create-slot", "--if-not-exists", "--no-password"],
        capture_output=True,
        text=True,
        timeout=60,
        env=target.tool_env(),
    )
    if result.returncode != 0:
        raise StreamFailed(f"pg_receivewal --create-slot {slot}: {result.stderr.strip()[-500:]}")


class WalStream:
    """``pg_receivewal`` plus the uploader, until :meth:`stop` (or a signal in :func:`main`)."""

    def __init__(
        self,
        settings: Settings,
        conninfo: str,
        directory: Path,
        slot: str,
        *,
        synchronous: bool = False,
        interval: float = 1.0,
        log_path: Path | None = None,
    ) -> None:
        self.settings, self.conninfo, self.slot = settings, conninfo, slot
        self.directory = Path(directory)
        self.synchronous, self.interval = synchronous, max(0.2, float(interval))
        self.log_path = log_path
        self.uploader = Uploader(settings, self.directory)
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        create_slot(self.conninfo, self.slot)
        log = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            receivewal_argv(
                self.conninfo,
                self.directory,
                self.slot,
                synchronous=self.synchronous,
            ),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env=_target(self.conninfo).tool_env(),
        )
        time.sleep(0.3)
        if self.proc.poll() is not None:
            raise StreamFailed(
                f"pg_receivewal exited {self.proc.returncode} at start"
                + (f"; see {self.log_path}" if self.log_path else "")
            )
        self._thread = threading.Thread(target=self._loop, name="wal-stream", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.uploader.tick()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15) -> None:
        """pg_receivewal ends (SIGINT: it flushes what it has), then one last upload pass."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.uploader.tick()

    def run_forever(self) -> int:
        """The resident process: until SIGTERM/SIGINT or pg_receivewal gives up."""
        self.start()
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        while not done.wait(1.0):
            if not self.alive():
                break
        code = self.proc.returncode if self.proc and self.proc.poll() is not None else 0
        self.stop()
        return code or 0


def main(argv: list[str] | None = None) -> int:
    """``python -I -m wedefi_dr.physical.walstream --env-file F --dir D --slot S --conninfo C``
    (what the local stack starts in the background; ``wedefi-dr wal-stream`` in front)."""
    parser = argparse.ArgumentParser(
        prog="wedefi-dr-wal-stream", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--env-file", help="KEY=VALUE settings file (mode 600)")
    parser.add_argument("--dir", required=True, help="pg_receivewal's directory")
    parser.add_argument("--slot", required=True)
    parser.add_argument("--conninfo", required=True, help="password-less; PGPASSFILE has it")
    parser.add_argument("--synchronous", action="store_true")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--log", help="pg_receivewal's own output")
    args = parser.parse_args(argv)
    if args.env_file:
        wal.load_env_file(args.env_file)
    from wedefi_dr.config import Settings

    settings = Settings()
    settings.require("gpg_passphrase", "bucket")
    stream = WalStream(
        settings,
        args.conninfo,
        Path(args.dir),
        args.slot,
        synchronous=args.synchronous,
        interval=args.interval,
        log_path=Path(args.log) if args.log else None,
    )
    try:
        return stream.run_forever()
    except DRError as exc:
        print(f"wedefi-dr wal-stream: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
