"""S3 through boto3: uploads through the transfer manager, streaming single-GET downloads.

Uploads use boto3's transfer manager (multipart, parallel parts, abort on failure) on a
non-seekable stream, so memory is bounded by chunk size x queue depth, never by the
backup size. Downloads use one streaming GET: against the local moto server the
transfer manager's parallel ranged GETs ran at 17 MB/s where one stream ran at 284 MB/s
(DESIGN.md pitfalls), and a restore reads sequentially anyway.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from wedefi_dr.config import Settings
from wedefi_dr.errors import (
    ArchivedObjectNotRestored,
    BackupFailed,
    ChecksumMismatch,
    PreflightFailed,
    SpoolFull,
    TruncatedObject,
)
from wedefi_dr.storage.clients import aws_client

log = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024


class HashingReader:
    """A file-like wrapper that hashes and counts what passes through ``read``.

    ``read(n)`` returns exactly ``n`` bytes until EOF (pipes return short reads, and the
    transfer manager would otherwise make parts smaller than S3's 5 MiB minimum).
    ``on_eof`` runs before EOF is reported, so a producer that failed can raise there and
    the transfer manager aborts the multipart upload instead of completing it.
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


class ObjectStore:
    """One bucket of the object store, addressed by keys under the settings' prefix."""

    def __init__(self, settings: Settings, bucket: str | None = None) -> None:
        self.settings = settings
        self.bucket = bucket or settings.bucket
        self.client = aws_client(
            settings, "s3", max_pool_connections=max(10, settings.upload_concurrency + 2)
        )
        self.transfer_config = TransferConfig(
            multipart_threshold=settings.multipart_chunk_bytes,
            multipart_chunksize=settings.multipart_chunk_bytes,
            max_concurrency=settings.upload_concurrency,
            use_threads=True,
        )

    def key(self, *parts: str) -> str:
        return "/".join([self.settings.prefix.strip("/"), *parts])

    # ---- writes --------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Start and abort a multipart upload of a probe key: a bucket that cannot take a
        write fails preflight. Nothing is stored and nothing deleted, so the backup role
        needs no delete permission (deployments/iam/backup_operator.json)."""
        probe = self.key(".preflight-probe")
        try:
            upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=probe)
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=probe, UploadId=upload["UploadId"]
            )
        except ClientError as exc:
            raise PreflightFailed(
                f"bucket {self.bucket!r} is not writable: {exc.response['Error']['Code']}"
            ) from exc

    def upload_stream(self, key: str, stream: IO[bytes]) -> None:
        """Multipart upload of a non-seekable stream with SSE and the storage class."""
        extra: dict[str, Any] = {"StorageClass": self.settings.storage_class}
        if self.settings.sse:
            extra["ServerSideEncryption"] = self.settings.sse
        self.client.upload_fileobj(
            stream, self.bucket, key, ExtraArgs=extra, Config=self.transfer_config
        )

    def upload_all_or_nothing(self, key: str, reader: HashingReader) -> None:
        """Upload ``reader`` to ``key``: complete and the right size, or nothing at all.

        A key that already holds an object is refused before anything is sent: it may be
        an earlier attempt's object that a manifest already points at, and a failure of
        this attempt must never take that backup with it. So on a failure (a producer's
        error raised at EOF, the network, a short object) the multipart upload is aborted
        and only an object this attempt completed is removed; nothing half-written is left
        for a manifest to point at, and no orphaned parts are billed.
        """
        if self.head(key) is not None:
            raise BackupFailed(
                f"s3://{self.bucket}/{key} already holds an object: not overwriting it "
                "(it may be a backup a manifest points at); this run writes nothing"
            )
        completed = False
        try:
            self.upload_stream(key, reader)
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
                "upload of %s failed: %d multipart upload(s) aborted, nothing kept", key, aborted
            )
            raise

    def put_json(self, key: str, document: dict[str, Any]) -> None:
        extra: dict[str, Any] = {}
        if self.settings.sse:
            extra["ServerSideEncryption"] = self.settings.sse
        self.client.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=json.dumps(document, indent=2, sort_keys=True).encode(),
            ContentType="application/json",
            **extra,
        )

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def abort_multipart_uploads(self, key_prefix: str) -> int:
        """Abort every unfinished multipart upload under ``key_prefix``; returns how many."""
        aborted = 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=key_prefix):
            for upload in page.get("Uploads", []):
                try:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                except ClientError as exc:
                    # The transfer manager aborting the same upload at the same moment.
                    if exc.response["Error"]["Code"] != "NoSuchUpload":
                        raise
                aborted += 1
        return aborted

    # ---- reads ---------------------------------------------------------------------------
    def head(self, key: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response["Error"]["Code"] in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise

    def get_json(self, key: str) -> dict[str, Any] | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response["Error"]["Code"] in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise
        return json.loads(body)

    def get_body(self, key: str) -> Any:
        """The object's streaming body; an archived object not yet restored is named as
        such (S3's InvalidObjectState), with what to do about it."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "InvalidObjectState":
                raise
            raise ArchivedObjectNotRestored(
                f"s3://{self.bucket}/{key} is in the archive tier and not restored yet: run "
                "'wedefi-dr archive-tier thaw ID' (add --wait to wait for it), then try again"
            ) from exc

    def list_keys(self, prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            yield from page.get("Contents", [])

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
                    f"s3://{self.bucket}/{key} is {size} bytes, the manifest says {size_bytes}: "
                    "the stored object is truncated or replaced"
                )
            if digest.hexdigest() != sha256:
                raise ChecksumMismatch(
                    f"s3://{self.bucket}/{key} sha256 {digest.hexdigest()} does not match the "
                    f"manifest's {sha256}: the stored object is corrupt"
                )
        except OSError as exc:
            dest.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise SpoolFull(
                    f"no space left in the spool {dest.parent} for s3://{self.bucket}/{key} "
                    f"({size_bytes} bytes, {size} written): free space there or point "
                    "WEDEFI_DR_SPOOL_DIR at a larger disk"
                ) from exc
            raise
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
