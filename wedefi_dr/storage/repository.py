"""The backup repository: one interface, two drivers (S3 through boto3, a POSIX filesystem).

Every caller (backups, restores, the catalog, WAL push and fetch, verify, the lifecycle,
the DR report) talks to a :class:`Repository` obtained from :func:`open_store`, so the
choice of driver is made once, by ``WEDEFI_DR_REPO_TYPE``. Both drivers keep the same
contract, which is the S3 one the code was written against:

- ``head`` returns ``{"ContentLength", "Metadata", "LastModified"}`` or None, and
  ``list_keys`` yields ``{"Key", "Size", "LastModified"}`` in key order, so callers read one
  shape whatever the driver;
- objects written through ``upload_stream``/``upload_all_or_nothing``/``put_new`` never
  replace an existing object (S3: a HEAD check and ``If-None-Match``; posix: ``link()``),
  while ``put_json``/``put_bytes`` publish atomically and may replace (manifests, reports
  and the streamed WAL partial are rewritten by design);
- nothing half-written is ever listed or readable.

The DR-region copy, the Glacier tier and object lock are S3 features: :func:`require_s3`
names the refusal, :func:`dr_copy` is the DR copy when the repository has one.

This module imports only the standard library and the settings' type, because the WAL
archive command imports it once per segment; each driver is imported when first opened.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from wedefi_dr.errors import (
    BackupFailed,
    ChecksumMismatch,
    InvalidInput,
    SpoolFull,
    TruncatedObject,
)

if TYPE_CHECKING:
    from wedefi_dr.config import Settings

log = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024
REPO_TYPES = ("s3", "posix")


class HashingReader:
    """A file-like wrapper that hashes and counts what passes through ``read``.

    ``read(n)`` returns exactly ``n`` bytes until EOF (pipes return short reads, and the
    transfer manager would otherwise make parts smaller than S3's 5 MiB minimum).
    ``on_eof`` runs before EOF is reported, so a producer that failed can raise there and
    the upload is aborted instead of completed.
    """

    def __init__(
        self,
        raw: IO[bytes],
        on_eof: Callable[[], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._on_eof = on_eof
        self._progress = progress

    def read(self, n: int = -1) -> bytes:
        parts: list[bytes] = []
        want = n if n and n > 0 else None
        got = 0
        while want is None or got < want:
            chunk = self.raw.read(READ_CHUNK if want is None else min(READ_CHUNK, want - got))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        data = b"".join(parts)
        if not data and self._on_eof is not None:
            self._on_eof()
        self.sha256.update(data)
        self.size += len(data)
        if self._progress and data:
            self._progress(self.size)
        return data


class SizedReader(Protocol):
    """What ``upload_all_or_nothing`` reads: a stream that counts what it returned."""

    size: int

    def read(self, n: int = -1) -> bytes: ...


class Body(Protocol):
    """A stored object's content, read once, front to back."""

    def read(self) -> bytes: ...

    def iter_chunks(self, chunk_size: int = READ_CHUNK) -> Iterator[bytes]: ...


class Repository(Protocol):
    """Where backups, base backups, WAL and reports are kept (see the module docstring)."""

    settings: Settings
    bucket: str

    def key(self, *parts: str) -> str: ...

    def url(self, key: str) -> str: ...

    def check_writable(self) -> None: ...

    def upload_stream(self, key: str, stream: IO[bytes]) -> None: ...

    def upload_all_or_nothing(self, key: str, reader: SizedReader) -> None: ...

    def put_json(self, key: str, document: dict[str, Any]) -> None: ...

    def put_bytes(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
        storage_class: str | None = None,
    ) -> None: ...

    def put_new(
        self, key: str, body: bytes, *, metadata: dict[str, str], storage_class: str | None
    ) -> bool: ...

    def delete(self, key: str) -> None: ...

    def delete_many(self, keys: list[str]) -> None: ...

    def abort_multipart_uploads(self, key_prefix: str) -> int: ...

    def clean_incomplete(self, older_than_seconds: float) -> int: ...

    def head(self, key: str) -> dict[str, Any] | None: ...

    def get(self, key: str) -> tuple[bytes, dict[str, str]] | None: ...

    def get_json(self, key: str) -> dict[str, Any] | None: ...

    def get_body(self, key: str) -> Body: ...

    def list_keys(
        self, prefix: str, *, start_after: str | None = None, max_keys: int | None = None
    ) -> Iterator[dict[str, Any]]: ...

    def download_verified(
        self,
        key: str,
        dest: Path,
        *,
        size_bytes: int,
        sha256: str,
        progress: Callable[[int], None] | None = None,
    ) -> None: ...


def open_store(
    settings: Settings,
    bucket: str | None = None,
    *,
    connections: int | None = None,
    credentials: tuple[str, str] | None = None,
) -> Repository:
    """The configured repository. ``bucket`` names another S3 bucket (the DR or Glacier
    copy), ``connections`` sizes the S3 connection pool for parallel transfers and
    ``credentials`` replace the default chain (the lifecycle's deleting role); a posix
    repository has one location and relies on file permissions instead."""
    if settings.repo_type == "posix":
        from wedefi_dr.storage.posix import PosixRepository

        return PosixRepository(settings, bucket)
    from wedefi_dr.storage.s3 import ObjectStore

    return ObjectStore(settings, bucket, connections=connections, credentials=credentials)


def require_s3(settings: Settings, feature: str) -> None:
    """Refuse an S3-only feature (the DR sync, Glacier, object lock) on a posix repository,
    before anything is read or written."""
    if settings.repo_type != "s3":
        raise InvalidInput(
            f"{feature} needs the S3 repository; this one is posix ({settings.repo_path}), "
            "which has no DR-region copy, archive tier or object lock "
            "(set WEDEFI_DR_REPO_TYPE=s3 to use it)"
        )


def dr_copy(settings: Settings) -> Repository | None:
    """The DR region's copy, or None when the repository has none (posix)."""
    if settings.repo_type != "s3":
        return None
    return open_store(settings, bucket=settings.dr_bucket)


def regions(settings: Settings) -> tuple[str, ...]:
    """The regions this repository holds copies in (``verify`` checks each)."""
    return ("primary", "dr") if settings.repo_type == "s3" else ("primary",)


class BaseRepository:
    """What both drivers share: key naming, the all-or-nothing upload and verified download
    (each written once against the driver's own primitives)."""

    settings: Settings
    bucket: str

    def key(self, *parts: str) -> str:
        return "/".join([self.settings.prefix.strip("/"), *parts])

    def url(self, key: str) -> str:
        raise NotImplementedError

    def head(self, key: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def put_bytes(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
        storage_class: str | None = None,
    ) -> None:
        raise NotImplementedError

    def get(self, key: str) -> tuple[bytes, dict[str, str]] | None:
        raise NotImplementedError

    def put_json(self, key: str, document: dict[str, Any]) -> None:
        """A manifest or record, replaced whole (it is written last, or rewritten on purpose)."""
        body = json.dumps(document, indent=2, sort_keys=True).encode()
        self.put_bytes(key, body, content_type="application/json")

    def get_json(self, key: str) -> dict[str, Any] | None:
        found = self.get(key)
        return None if found is None else json.loads(found[0])

    def upload_stream(self, key: str, stream: IO[bytes]) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def abort_multipart_uploads(self, key_prefix: str) -> int:
        raise NotImplementedError

    def get_body(self, key: str) -> Body:
        raise NotImplementedError

    def upload_all_or_nothing(self, key: str, reader: SizedReader) -> None:
        """Upload ``reader`` to ``key``: complete and the right size, or nothing at all.

        A key that already holds an object is refused before anything is sent: it may be
        an earlier attempt's object that a manifest already points at, and a failure of
        this attempt must never take that backup with it. So on a failure (a producer's
        error raised at EOF, the network, a short object) the unfinished upload is aborted
        and only an object this attempt completed is removed; nothing half-written is left
        for a manifest to point at, and no orphaned parts are billed.
        """
        if self.head(key) is not None:
            raise BackupFailed(
                f"{self.url(key)} already holds an object: not overwriting it "
                "(it may be a backup a manifest points at); this run writes nothing"
            )
        completed = False
        try:
            self.upload_stream(key, reader)  # type: ignore[arg-type]
            completed = True
            head = self.head(key)
            if head is None or head["ContentLength"] != reader.size:
                raise BackupFailed(
                    f"uploaded object has {head and head['ContentLength']} bytes, "
                    f"sent {reader.size}"
                )
        except BaseException:
            aborted = self.abort_multipart_uploads(key)
            if completed:
                self.delete(key)
            log.error(
                "upload of %s failed: %d unfinished upload(s) aborted, nothing kept", key, aborted
            )
            raise

    def download_verified(
        self,
        key: str,
        dest: Path,
        *,
        size_bytes: int,
        sha256: str,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Stream ``key`` into ``dest`` and prove it is the object the manifest describes.

        Raises TruncatedObject when the size differs and ChecksumMismatch when the hash
        does; in both cases ``dest`` is removed, so nothing unverified is ever used.
        """
        digest = hashlib.sha256()
        size = 0
        try:
            body = self.get_body(key)
            with dest.open("wb") as out:
                for chunk in body.iter_chunks(chunk_size=READ_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                    if progress:
                        progress(size)
            if size != size_bytes:
                raise TruncatedObject(
                    f"{self.url(key)} is {size} bytes, the manifest says {size_bytes}: "
                    "the stored object is truncated or replaced"
                )
            if digest.hexdigest() != sha256:
                raise ChecksumMismatch(
                    f"{self.url(key)} sha256 {digest.hexdigest()} does not match the "
                    f"manifest's {sha256}: the stored object is corrupt"
                )
        except OSError as exc:
            dest.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise SpoolFull(
                    f"no space left in the spool {dest.parent} for {self.url(key)} "
                    f"({size_bytes} bytes, {size} written): free space there or point "
                    "WEDEFI_DR_SPOOL_DIR at a larger disk"
                ) from exc
            raise
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
