"""A repository on a filesystem (a local disk or an NFS mount), as pgBackRest's posix repo.

Layout: the key ``wedefi/logical/<id>/dump.pgc.gpg`` is the file of that relative path under
``WEDEFI_DR_REPO_PATH``, a directory per prefix. Keys are checked part by part (no empty
part, ``.``, ``..``, NUL or absolute path), so no key can name a file outside the root.

Each file is one object: a fixed 4 KiB header, then the object's bytes unchanged. The
header is ``wedefi-dr-object 1`` on its first line and, on the second, JSON padded with
spaces: the body's sha256 and size, its content type and the same metadata the S3 driver
keeps as object metadata (the WAL checksums, MAC and key id, the encoding). One file
rather than a sidecar because publishing is then one act: the object and its metadata
appear together, or not at all, and there is no stale sidecar of a killed run to block a
retry or to pair with another run's object. The body stays a plain gpg message, so the
break-glass path needs no Python: ``tail -c +4097 FILE | gpg -d``.

Writes never expose a partial object: the bytes go to ``.wdr-tmp.<random>.<name>`` in the
target's own directory (mode 0640), the header is filled in once the body's hash is known,
the file is fsynced, then published with ``os.link`` (atomic, and it fails when the name
exists, which is the no-overwrite rule and the WAL archive's conditional PUT), the temp
name is unlinked and the directory fsynced. ``put_json``/``put_bytes`` publish with
``os.replace`` instead (manifests, reports and the streamed partial are rewritten by
design; S3 lets them be replaced too). Temp files are never listed; a killed run's are
removed by :meth:`PosixRepository.clean_incomplete` (the backup lifecycle) or by the next
failed upload of the same key. Every read checks the body against the header's sha256
and size and names the file when they differ.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from wedefi_dr.errors import (
    BackupFailed,
    ChecksumMismatch,
    IntegrityError,
    InvalidInput,
    PreflightFailed,
    TruncatedObject,
)
from wedefi_dr.storage.repository import READ_CHUNK, BaseRepository

if TYPE_CHECKING:
    from wedefi_dr.config import Settings

HEADER_BYTES = 4096
MAGIC = b"wedefi-dr-object 1\n"
TMP_PREFIX = ".wdr-tmp."
FILE_MODE = 0o640


def validate_root(settings: Settings) -> Path:
    """``repo_path`` as a usable repository root, or InvalidInput saying why not: absolute,
    an existing or creatable directory, writable, and not inside a PostgreSQL data
    directory (a backup kept inside what it protects dies with it, and the server or
    ``pg_basebackup`` would copy it)."""
    raw = settings.repo_path
    if raw is None or not str(raw):
        raise InvalidInput("WEDEFI_DR_REPO_TYPE=posix needs WEDEFI_DR_REPO_PATH (absolute path)")
    root = Path(raw)
    if not root.is_absolute():
        raise InvalidInput(f"WEDEFI_DR_REPO_PATH must be an absolute path, not {str(raw)!r}")
    if "\0" in str(root) or ".." in root.parts:
        raise InvalidInput(f"WEDEFI_DR_REPO_PATH {str(raw)!r} contains '..' or NUL")
    for parent in (root, *root.parents):
        if (parent / "PG_VERSION").is_file() and (parent / "global").is_dir():
            raise InvalidInput(
                f"WEDEFI_DR_REPO_PATH {root} is inside the PostgreSQL data directory {parent}: "
                "keep the repository outside every cluster"
            )
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o750)
    except OSError as exc:
        raise InvalidInput(f"WEDEFI_DR_REPO_PATH {root} cannot be created: {exc.strerror}") from exc
    if not root.is_dir():
        raise InvalidInput(f"WEDEFI_DR_REPO_PATH {root} is not a directory")
    if not os.access(root, os.W_OK | os.X_OK):
        raise InvalidInput(f"WEDEFI_DR_REPO_PATH {root} is not writable by this user")
    return root


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _header(sha256: str, size: int, content_type: str, metadata: dict[str, str]) -> bytes:
    doc = json.dumps(
        {"sha256": sha256, "size": size, "content-type": content_type, "metadata": metadata},
        sort_keys=True,
    ).encode()
    room = HEADER_BYTES - len(MAGIC) - 1
    if len(doc) > room:
        raise InvalidInput(f"object metadata of {len(doc)} bytes exceeds the header's {room}")
    return MAGIC + doc.ljust(room) + b"\n"


class VerifiedBody:
    """A stored object's body on its open file, read front to back once, checked against
    its header at EOF (the file is closed then)."""

    def __init__(self, file: IO[bytes], url: str, meta: dict[str, Any]) -> None:
        self.file, self.url, self.meta = file, url, meta

    def iter_chunks(self, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        digest, size = hashlib.sha256(), 0
        with self.file as f:
            f.seek(HEADER_BYTES)
            for chunk in iter(lambda: f.read(chunk_size), b""):
                digest.update(chunk)
                size += len(chunk)
                yield chunk
        if size != self.meta["size"]:
            raise TruncatedObject(
                f"{self.url} holds {size} bytes, its header says {self.meta['size']}: "
                "truncated or damaged at rest"
            )
        if digest.hexdigest() != self.meta["sha256"]:
            raise ChecksumMismatch(
                f"{self.url} fails its stored sha256 ({digest.hexdigest()[:12]}… is not "
                f"{self.meta['sha256'][:12]}…): corrupt at rest, refused"
            )

    def read(self) -> bytes:
        return b"".join(self.iter_chunks())


class PosixRepository(BaseRepository):
    """The repository under one directory; ``bucket`` is only the label manifests record
    (any recorded label reads this directory; the DR and Glacier buckets are refused)."""

    def __init__(self, settings: Settings, bucket: str | None = None) -> None:
        if settings.source_region != "primary":
            raise InvalidInput(
                "a posix repository has no DR or Glacier copy to read from: unset "
                "WEDEFI_DR_SOURCE_REGION"
            )
        if bucket != settings.bucket and bucket in (settings.dr_bucket, settings.glacier_bucket):
            raise InvalidInput(
                f"bucket {bucket!r} is an S3 copy (DR region or Glacier tier); a posix "
                "repository has one location only"
            )
        self.settings = settings
        self.bucket = settings.bucket
        self.root = validate_root(settings)
        st = self.root.stat()
        # Root writes (the CLI) and the server's OS user writes (archive_command) meet in one
        # tree: as root, every new file and directory goes to the repository root's owner.
        self._owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 and st.st_uid != 0 else None

    # ---- names ---------------------------------------------------------------------------
    def url(self, key: str) -> str:
        return str(self.root / key)

    def path(self, key: str) -> Path:
        """The file of ``key``; InvalidInput for a key that could leave the root."""
        parts = key.split("/")
        for part in parts:
            if part in ("", ".", "..") or "\0" in part or part.startswith(TMP_PREFIX):
                raise InvalidInput(f"key {key!r} cannot name a file in the repository")
        return self.root.joinpath(*parts)

    def _makedirs(self, directory: Path) -> None:
        """Create ``directory`` and fsync each parent whose entry list changed, so a new
        object's directory survives a crash as well as the object."""
        missing = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir(mode=0o750)
            except FileExistsError:
                continue
            if self._owner:
                os.chown(d, *self._owner)
            _fsync_dir(d.parent)

    # ---- writes --------------------------------------------------------------------------
    def _write(
        self,
        key: str,
        chunks: Iterable[bytes],
        *,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
        replace: bool,
    ) -> bool:
        """Write ``chunks`` to a temp file, fsync, publish; False when ``replace`` is off and
        the name exists (the temp file is removed, the existing object untouched)."""
        final = self.path(key)
        self._makedirs(final.parent)
        tmp = final.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}.{final.name}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            try:
                os.pwrite(fd, b"\0" * HEADER_BYTES, 0)
                digest, size = hashlib.sha256(), 0
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        n = os.pwrite(fd, view, HEADER_BYTES + size)
                        digest.update(view[:n])
                        size += n
                        view = view[n:]
                os.pwrite(fd, _header(digest.hexdigest(), size, content_type, metadata or {}), 0)
                if self._owner:
                    os.fchown(fd, *self._owner)
                os.fsync(fd)
            finally:
                os.close(fd)
            if replace:
                os.replace(tmp, final)
            else:
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    return False
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(final.parent)
        return True

    def check_writable(self) -> None:
        """Create, fsync and remove a temp file where the backups go."""
        directory = self.root / self.settings.prefix.strip("/")
        try:
            self._makedirs(directory)
            probe = directory / f"{TMP_PREFIX}{uuid.uuid4().hex}.preflight-probe"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            os.fsync(fd)
            os.close(fd)
            probe.unlink()
        except OSError as exc:
            raise PreflightFailed(f"repository {directory} is not writable: {exc}") from exc

    def upload_stream(self, key: str, stream: IO[bytes]) -> None:
        """Stream into the repository; an existing object under ``key`` is never replaced."""
        if not self._write(key, iter(lambda: stream.read(READ_CHUNK), b""), replace=False):
            raise BackupFailed(f"{self.url(key)} already exists: not overwriting it")

    def put_bytes(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
        storage_class: str | None = None,
    ) -> None:
        self._write(
            key,
            [body],
            content_type=content_type or "application/octet-stream",
            metadata=metadata,
            replace=True,
        )

    def put_new(
        self, key: str, body: bytes, *, metadata: dict[str, str], storage_class: str | None
    ) -> bool:
        """Publish by ``link()``: False when the name exists (nothing is replaced)."""
        return self._write(key, [body], metadata=metadata, replace=False)

    def delete(self, key: str) -> None:
        """Remove the object, then its directories that became empty: a backup's own
        folder, never a kind's (``<prefix>/wal``, ``<prefix>/logical``), where a concurrent
        writer may be about to create a file."""
        path = self.path(key)
        path.unlink(missing_ok=True)
        top = self.root.joinpath(*self.settings.prefix.strip("/").split("/"))
        directory = path.parent
        while directory != top and directory.parent != top and directory.is_relative_to(top):
            try:
                directory.rmdir()
            except OSError:
                break
            directory = directory.parent
        if directory.exists():
            _fsync_dir(directory)

    def delete_many(self, keys: list[str]) -> None:
        for key in keys:
            self.delete(key)

    def _temp_files(self, key_prefix: str) -> Iterator[tuple[Path, str]]:
        """Each temp file under ``key_prefix`` with the key it was being written to."""
        base, _, _ = key_prefix.rpartition("/")
        top = self.path(base) if base else self.root
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                if not name.startswith(TMP_PREFIX):
                    continue
                target = name[len(TMP_PREFIX) :].partition(".")[2]
                rel = Path(dirpath, target).relative_to(self.root).as_posix()
                if rel.startswith(key_prefix):
                    yield Path(dirpath, name), rel

    def abort_multipart_uploads(self, key_prefix: str) -> int:
        """Remove the temp files of unfinished writes under ``key_prefix``."""
        removed = 0
        for path, _ in self._temp_files(key_prefix):
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def clean_incomplete(self, older_than_seconds: float) -> int:
        """Remove temp files left by killed runs, once older than ``older_than_seconds``
        (a younger one may belong to an upload still running)."""
        cutoff = time.time() - older_than_seconds
        removed = 0
        for path, _ in self._temp_files(self.key("")):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    # ---- reads ---------------------------------------------------------------------------
    def _open(self, key: str) -> VerifiedBody | None:
        """The object's body on an open file (so header and body are of one inode, even if
        ``put_json`` replaces the name meanwhile), or None when there is no such object."""
        path = self.path(key)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.EISDIR):
                return None
            raise
        try:
            header = f.read(HEADER_BYTES)
            if len(header) < HEADER_BYTES or not header.startswith(MAGIC):
                raise IntegrityError(f"{path} has no wedefi-dr object header: damaged or planted")
            try:
                meta = json.loads(header[len(MAGIC) :])
            except ValueError as exc:
                raise IntegrityError(f"{path} has a damaged object header: {exc}") from exc
        except BaseException:
            f.close()
            raise
        return VerifiedBody(f, str(path), meta)

    def head(self, key: str) -> dict[str, Any] | None:
        body = self._open(key)
        if body is None:
            return None
        with body.file:
            st = os.fstat(body.file.fileno())
        return {
            "ContentLength": st.st_size - HEADER_BYTES,
            "ContentType": body.meta.get("content-type"),
            "Metadata": dict(body.meta.get("metadata", {})),
            "LastModified": datetime.fromtimestamp(st.st_mtime, UTC),
        }

    def get_body(self, key: str) -> VerifiedBody:
        body = self._open(key)
        if body is None:
            raise FileNotFoundError(errno.ENOENT, "no such object in the repository", self.url(key))
        return body

    def get(self, key: str) -> tuple[bytes, dict[str, str]] | None:
        body = self._open(key)
        if body is None:
            return None
        return body.read(), dict(body.meta.get("metadata", {}))

    def list_keys(
        self, prefix: str, *, start_after: str | None = None, max_keys: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Published objects whose key starts with ``prefix``, in key order (as S3 lists);
        temp files are never listed."""
        base, _, _ = prefix.rpartition("/")
        top = self.path(base) if base else self.root
        found = []
        for dirpath, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if not d.startswith(TMP_PREFIX)]
            for name in files:
                if name.startswith(TMP_PREFIX):
                    continue
                path = Path(dirpath, name)
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix) and (start_after is None or key > start_after):
                    found.append((key, path))
        found.sort()
        for n, (key, path) in enumerate(found):
            if max_keys is not None and n >= max_keys:
                return
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # deleted meanwhile
            yield {
                "Key": key,
                "Size": st.st_size - HEADER_BYTES,
                "LastModified": datetime.fromtimestamp(st.st_mtime, UTC),
            }
