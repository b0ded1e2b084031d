"""Persisted step results in the object store, so that any worker can retry any run.

A Retry skips a completed step only when the retrying process can read that step's
persisted result. With the default (a folder on the worker's disk) only the worker that
ran the step can; with this block every worker reads the results from S3, through the
project's one AWS client factory, so a run that failed on one machine is finished by
another without doing the restore again.

Used as Prefect's default result storage: save a block once
(``S3ResultStorage(bucket=...).save("wedefi-dr-results")``) and start the workers with
``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=wedefi-dr-s3-results/wedefi-dr-results``. The
tasks package imports this module, so a flow-run process knows the block type before
Prefect loads it.
"""

from __future__ import annotations

import asyncio

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import WritableFileSystem
from pydantic import Field

from wedefi_dr.config import get_settings
from wedefi_dr.storage.clients import aws_client

BLOCK_TYPE_SLUG = "wedefi-dr-s3-results"


class S3ResultStorage(WritableFileSystem):
    """Step results as objects ``<prefix>/<key>`` of ``bucket`` (server-side encrypted);
    endpoint, region and credentials come from the worker's settings, never the block."""

    _block_type_name = "WeDefi DR S3 results"
    _block_type_slug = BLOCK_TYPE_SLUG
    _description = "Persisted task results in the WeDefi DR object store (any worker reads them)."

    bucket: str = Field(description="The bucket the results are written to.")
    prefix: str = Field(default="prefect-results", description="Key prefix of the results.")

    def object_key(self, path: str) -> str:
        return f"{self.prefix.strip('/')}/{path.lstrip('/')}"

    def _read(self, path: str) -> bytes:
        client = aws_client(get_settings(), "s3")
        return client.get_object(Bucket=self.bucket, Key=self.object_key(path))["Body"].read()

    def _write(self, path: str, content: bytes) -> str:
        settings = get_settings()
        aws_client(settings, "s3").put_object(
            Bucket=self.bucket,
            Key=self.object_key(path),
            Body=content,
            ServerSideEncryption=settings.sse,
        )
        return path

    # Prefect calls these as its own file systems' (``_sync=True`` from sync code, awaited
    # from async code): the same dispatch as its LocalFileSystem.
    async def aread_path(self, path: str) -> bytes:
        return await asyncio.to_thread(self._read, path)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        return self._read(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await asyncio.to_thread(self._write, path, content)

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:
        return self._write(path, content)
