"""The Glacier tier: the week's newest full backup copied as GLACIER (or DEEP_ARCHIVE), and
the restore request a read from that tier needs first.

The data object goes to the archive class; its manifest stays in STANDARD beside it, so the
tier's catalog can be listed (and ``latest`` found) without a restore request. An archived
object cannot be read until S3 has restored a temporary copy: :func:`thaw` asks for one,
says how long the tier takes, and either waits for it or returns, so that the same call
later (or ``--wait``) resumes where it left off.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from botocore.exceptions import ClientError

from wedefi_dr.catalog import listing
from wedefi_dr.config import Settings
from wedefi_dr.errors import ChecksumMismatch, InvalidInput
from wedefi_dr.lifecycle.sync import b64_of_hex
from wedefi_dr.storage import repository
from wedefi_dr.storage.s3 import ObjectStore

log = logging.getLogger(__name__)
ARCHIVE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")
# AWS's published retrieval times (hours), by storage class and tier.
RETRIEVAL_HOURS = {
    ("GLACIER", "Expedited"): "0.02-0.08",
    ("GLACIER", "Standard"): "3-5",
    ("GLACIER", "Bulk"): "5-12",
    ("DEEP_ARCHIVE", "Standard"): "up to 12",
    ("DEEP_ARCHIVE", "Bulk"): "up to 48",
}


def archive_backup(settings: Settings, backup_id: str = "latest") -> dict[str, Any]:
    """Copy one logical backup (data object as the archive class, manifest as STANDARD) to
    the Glacier bucket, server-side, verified against the manifest; a no-op when there."""
    repository.require_s3(settings, "the archive tier (Glacier)")
    if settings.source_region != "primary":
        raise InvalidInput("the archive tier copies from the primary bucket: unset SOURCE_REGION")
    source = ObjectStore(settings)
    manifest = listing.resolve(source, backup_id)
    tier = ObjectStore(settings, bucket=settings.glacier_bucket)
    data_key, manifest_key = manifest.object.key, listing.manifest_key(source, manifest.backup_id)
    result = {
        "backup_id": manifest.backup_id,
        "bucket": tier.bucket,
        "storage_class": settings.glacier_storage_class,
        "copied": False,
    }
    present = tier.head(data_key)
    same_size = present is not None and present["ContentLength"] == manifest.object.size_bytes
    if same_size and tier.head(manifest_key) is not None:
        return result
    extra: dict[str, Any] = {"ServerSideEncryption": settings.sse} if settings.sse else {}
    response = tier.client.copy_object(
        Bucket=tier.bucket,
        Key=data_key,
        CopySource={"Bucket": source.bucket, "Key": data_key},
        StorageClass=settings.glacier_storage_class,
        MetadataDirective="COPY",
        ChecksumAlgorithm="SHA256",
        **extra,
    )
    if response["CopyObjectResult"].get("ChecksumSHA256") != b64_of_hex(manifest.object.sha256):
        raise ChecksumMismatch(
            f"the Glacier copy of {data_key} does not match its manifest's sha256"
        )
    tier.client.copy_object(
        Bucket=tier.bucket,
        Key=manifest_key,
        CopySource={"Bucket": source.bucket, "Key": manifest_key},
        StorageClass="STANDARD",
        MetadataDirective="COPY",
        **extra,
    )
    result["copied"] = True
    return result


def restore_state(head: dict[str, Any]) -> str:
    """``readable`` (not archived, or restored), ``in progress``, or ``archived``."""
    if head.get("StorageClass") not in ARCHIVE_CLASSES:
        return "readable"
    restore = head.get("Restore")
    if not restore:
        return "archived"
    return "in progress" if 'ongoing-request="true"' in restore else "readable"


def thaw(
    settings: Settings,
    backup_id: str,
    *,
    wait: bool = False,
    poll_seconds: float = 60.0,
    timeout_seconds: float = 48 * 3600,
    say: Any = log.info,
) -> dict[str, Any]:
    """Make the Glacier copy of ``backup_id`` readable: request the restore when none is
    under way, say how long it takes, then wait (``wait``) or return its state."""
    repository.require_s3(settings, "the archive tier (Glacier)")
    tier = ObjectStore(settings, bucket=settings.glacier_bucket)
    manifest = listing.resolve(tier, backup_id)
    key = manifest.object.key
    head = tier.head(key)
    if head is None:
        raise InvalidInput(f"backup {manifest.backup_id} has no data object in s3://{tier.bucket}")
    state = restore_state(head)
    storage_class = head.get("StorageClass", "STANDARD")
    hours = RETRIEVAL_HOURS.get((storage_class, settings.glacier_restore_tier), "several")
    if state == "archived":
        try:
            tier.client.restore_object(
                Bucket=tier.bucket,
                Key=key,
                RestoreRequest={
                    "Days": settings.glacier_restore_days,
                    "GlacierJobParameters": {"Tier": settings.glacier_restore_tier},
                },
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "RestoreAlreadyInProgress":
                raise
        say(
            f"restore requested for s3://{tier.bucket}/{key} ({storage_class}, tier "
            f"{settings.glacier_restore_tier}): S3 takes {hours} hours; the copy stays "
            f"readable for {settings.glacier_restore_days} days"
        )
    deadline = time.monotonic() + timeout_seconds
    while True:
        state = restore_state(tier.head(key) or {})
        if state == "readable" or not wait or time.monotonic() > deadline:
            break
        time.sleep(poll_seconds)
    return {
        "backup_id": manifest.backup_id,
        "key": key,
        "state": state,
        "storage_class": storage_class,
        "expected_hours": hours,
    }
