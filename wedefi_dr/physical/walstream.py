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

import hashlib
import io
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from wedefi_dr.physical import wal

if TYPE_CHECKING:
    from wedefi_dr.config import Settings

STREAM_DIR = "wal-stream"
PARTIAL = ".partial"


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
    """Store (overwrite) the streamed partial of ``segment``: encrypted, hashed, MAC'd.

    Encoded like an archived segment (zstd, gpg under the WAL key): a partial is uploaded
    up to once a second, and gzip plus a stretched passphrase each time would cost the
    database host a fifth of a core while it streams."""
    settings = archive.settings
    sealed = archive.seal(segment, io.BytesIO(plain), len(plain))
    archive.store.put_bytes(
        stream_key(settings, segment),
        sealed.cipher,
        storage_class=settings.storage_class,
        metadata={
            **archive.object_metadata(
                _mac_name(segment), sealed.plain_sha, sealed.plain_size, sealed.cipher
            ),
            "uploaded-at": datetime.now(UTC).isoformat(),
        },
    )


def fetch_partial(archive: wal.Archive, segment: str, workdir: Path) -> tuple[bytes, str] | None:
    """The verified plaintext of ``segment``'s streamed partial and when it was uploaded,
    or None when there is none. A damaged or planted object raises ArchiveCorrupt."""
    settings = archive.settings
    found = archive.store.get(stream_key(settings, segment))
    if found is None:
        return None
    cipher, meta = found
    plain = archive.open_verified(_mac_name(segment), cipher, meta, workdir)
    return plain, meta.get("uploaded-at", "?")


def later_timeline_exists(archive: wal.Archive, segment: str) -> bool:
    """True when the archive holds a history file or segment of a timeline after
    ``segment``'s (keys sort by timeline first)."""
    prefix = wal.archive_prefix(archive.settings) + "/"
    later = archive.store.list_keys(prefix, start_after=prefix + segment[:8] + "~", max_keys=1)
    return next(later, None) is not None


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
