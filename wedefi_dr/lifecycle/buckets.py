"""The DR bucket's protections: versioning, COMPLIANCE object lock, lifecycle rules.

Object lock can only be switched on when a bucket is created, so the DR bucket is created
with it; every version written there is then retained for ``dr_object_lock_days`` by
COMPLIANCE mode, which no credential can lift or shorten, not even the account's root. A
deletion there only adds a delete marker; the locked version stays readable by version id
until its date, when the noncurrent-version rule removes it.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from botocore.exceptions import ClientError

ABORT_INCOMPLETE_DAYS = 1
# base64 MD5 of an empty body: what a server-side copy sends (its request has no body).
EMPTY_BODY_MD5 = base64.b64encode(hashlib.md5(b"").digest()).decode()


def _copy_integrity_header(params: dict[str, Any], **_: Any) -> None:
    params["headers"].setdefault("Content-MD5", EMPTY_BODY_MD5)


def for_locked_bucket(client: Any) -> Any:
    """``client``, sending an integrity header (Content-MD5) on server-side copies.

    A write into a bucket with default object-lock retention must carry Content-MD5 or a
    checksum header; boto3 adds one to uploads but not to ``copy_object``, whose request
    body is empty, so the empty body's MD5 is sent (correct for that body)."""
    client.meta.events.register("before-call.s3.CopyObject", _copy_integrity_header)
    return client


def create_bucket(client: Any, bucket: str, region: str, *, object_lock: bool = False) -> bool:
    """Create ``bucket`` (with object lock when asked); False when it already exists."""
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    if object_lock:
        kwargs["ObjectLockEnabledForBucket"] = True
    try:
        client.create_bucket(**kwargs)
    except ClientError as exc:
        if exc.response["Error"]["Code"] in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
            return False
        raise
    return True


def abort_incomplete_uploads_rule() -> dict[str, Any]:
    """Parts of a killed run's multipart upload are removed by S3 itself, so the backup
    path never needs a delete permission for cleanup."""
    return {
        "ID": "abort-incomplete-multipart-uploads",
        "Status": "Enabled",
        "Filter": {"Prefix": ""},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": ABORT_INCOMPLETE_DAYS},
    }


def protect_dr_bucket(client: Any, bucket: str, lock_days: int) -> None:
    """Default COMPLIANCE retention of ``lock_days`` and the lifecycle rules."""
    client.put_object_lock_configuration(
        Bucket=bucket,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": lock_days}},
        },
    )
    client.put_bucket_lifecycle_configuration(
        Bucket=bucket,
        LifecycleConfiguration={
            "Rules": [
                abort_incomplete_uploads_rule(),
                {
                    "ID": "expire-deleted-versions",
                    "Status": "Enabled",
                    "Filter": {"Prefix": ""},
                    "NoncurrentVersionExpiration": {"NoncurrentDays": lock_days},
                },
            ]
        },
    )


def ensure_dr_bucket(client: Any, bucket: str, region: str, lock_days: int) -> None:
    """The DR bucket as the sync expects it: created with object lock, protected."""
    if create_bucket(client, bucket, region, object_lock=True):
        protect_dr_bucket(client, bucket, lock_days)


def ensure_plain_bucket(client: Any, bucket: str, region: str) -> None:
    """A primary or Glacier bucket: killed multipart uploads expire by rule."""
    if create_bucket(client, bucket, region):
        client.put_bucket_lifecycle_configuration(
            Bucket=bucket, LifecycleConfiguration={"Rules": [abort_incomplete_uploads_rule()]}
        )


def object_lock_days(client: Any, bucket: str) -> int | None:
    """The bucket's default COMPLIANCE retention in days, None without object lock."""
    try:
        config = client.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"]
    except ClientError as exc:
        if exc.response["Error"]["Code"] in {
            "ObjectLockConfigurationNotFoundError",
            "NoSuchBucket",
            "InvalidRequest",
        }:
            return None
        raise
    retention = config.get("Rule", {}).get("DefaultRetention", {})
    if config.get("ObjectLockEnabled") != "Enabled" or retention.get("Mode") != "COMPLIANCE":
        return None
    return int(retention.get("Days") or 0) or None
