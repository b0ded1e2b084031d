"""Cross-region sync: the primary bucket's backups copied to the DR bucket, server-side.

Every copy is made by S3 itself (``copy_object``, or the transfer manager's multipart copy
for large objects): no byte passes through the worker on the way. Each copy is verified
against the checksum this system recorded for the source (a manifest's object sha256, a
WAL object's ``object-sha256``), through the SHA-256 S3 computes for the copy; a multipart
copy, whose S3 checksum is one of parts, is read back and hashed instead. Storage class
STANDARD_IA, the source's server-side encryption kept, metadata (the WAL MACs) kept.

Idempotent and resumable: an object already in the DR copy at its size is not copied
again, so a second run copies nothing and says so, and a run killed half way is finished
by the next. The plan's ``aws s3 sync --delete`` would copy a wiped primary to the only
other copy; here a deletion propagates only for keys the backup lifecycle recorded
(:mod:`wedefi_dr.lifecycle.records`), and a source that lost more than
``sync_max_missing_share`` of what the DR copy holds, or is empty, makes the run delete
nothing, fail and raise a critical alert.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from boto3.s3.transfer import TransferConfig

from wedefi_dr.catalog import listing
from wedefi_dr.catalog.manifest import BackupManifest
from wedefi_dr.config import Settings
from wedefi_dr.errors import ChecksumMismatch, DRError, InvalidInput, SyncRefused
from wedefi_dr.lifecycle import buckets, records
from wedefi_dr.observability import notify
from wedefi_dr.physical.basebackup import BaseBackupManifest
from wedefi_dr.storage import repository
from wedefi_dr.storage.repository import READ_CHUNK
from wedefi_dr.storage.s3 import ObjectStore

log = logging.getLogger(__name__)


class SyncFailed(DRError):
    """Some objects could not be copied or verified; what was copied stays, a rerun resumes."""


@dataclass
class SyncPlan:
    """What a run would do, decided from the two listings before anything changes."""

    to_copy: list[dict[str, Any]] = field(default_factory=list)
    to_delete: dict[str, str] = field(default_factory=dict)
    missing_kept: list[str] = field(default_factory=list)
    source_objects: int = 0
    dr_objects: int = 0
    already_present: int = 0

    @property
    def missing_share(self) -> float:
        return len(self.missing_kept) / self.dr_objects if self.dr_objects else 0.0


def b64_of_hex(digest: str) -> str:
    """S3's base64 form of a hex SHA-256."""
    return base64.b64encode(bytes.fromhex(digest)).decode()


def recorded_checksums(store: ObjectStore) -> dict[str, str]:
    """Object key -> sha256 for every data object an authentic manifest describes."""
    sums: dict[str, str] = {}
    for model, kind in ((BackupManifest, "logical"), (BaseBackupManifest, "base")):
        for m in listing.list_manifests(store, kind, model):
            sums[m.object.key] = m.object.sha256
    return sums


def _listing(store: ObjectStore) -> dict[str, dict[str, Any]]:
    return {o["Key"]: o for o in store.list_keys(store.key(""))}


def plan_sync(source: ObjectStore, dr: ObjectStore) -> SyncPlan:
    """Compare the two copies: what to copy, which recorded deletions to propagate, what is
    missing from the source without a record (kept in the DR copy, and counted)."""
    src, dst = _listing(source), _listing(dr)
    purposeful = records.deleted_on_purpose(source)
    plan = SyncPlan(source_objects=len(src), dr_objects=len(dst))
    for key, obj in sorted(src.items()):
        there = dst.get(key)
        if there is not None and there["Size"] == obj["Size"]:
            plan.already_present += 1
        else:
            plan.to_copy.append({"key": key, "size": obj["Size"], "etag": obj["ETag"]})
    for key in sorted(set(dst) - set(src)):
        if key in purposeful:
            plan.to_delete[key] = purposeful[key]
        else:
            plan.missing_kept.append(key)
    return plan


def guard(settings: Settings, plan: SyncPlan, source: ObjectStore, dr: ObjectStore) -> None:
    """Refuse (and alert) when the source looks wiped: empty while the DR copy is not, or
    lacking more than the configured share of what the DR copy holds."""
    reason = None
    if plan.source_objects == 0 and plan.dr_objects > 0:
        reason = f"the source s3://{source.bucket}/{source.key('')} is empty"
    elif plan.missing_share > settings.sync_max_missing_share:
        reason = (
            f"the source lacks {len(plan.missing_kept)} of the {plan.dr_objects} objects the "
            f"DR copy holds ({plan.missing_share:.0%}, more than the "
            f"{settings.sync_max_missing_share:.0%} allowed) without a deletion record"
        )
    if reason is None:
        return
    message = (
        f"sync refused: {reason}; nothing was deleted or copied in s3://{dr.bucket}. "
        "A wiped or damaged primary must not reach the DR copy: find out what removed the "
        "objects before anything else"
    )
    notify.notify(
        settings,
        subject="WeDefiDaily DR copy: mass deletion refused",
        status="critical",
        details={
            "source": f"s3://{source.bucket}/{source.key('')}",
            "dr": f"s3://{dr.bucket}/{dr.key('')}",
            "dr_objects": plan.dr_objects,
            "missing_from_source": len(plan.missing_kept),
            "examples": plan.missing_kept[:5],
        },
    )
    raise SyncRefused(message)


def _hash_object(store: ObjectStore, key: str) -> str:
    digest = hashlib.sha256()
    body = store.client.get_object(Bucket=store.bucket, Key=key)["Body"]
    for chunk in body.iter_chunks(chunk_size=READ_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


class Copier:
    """Server-side copies of one source bucket into the DR bucket, each verified."""

    def __init__(self, settings: Settings, source: ObjectStore, dr: ObjectStore) -> None:
        self.settings, self.source, self.dr = settings, source, dr
        self.threshold = settings.sync_multipart_threshold_bytes
        self.transfer = TransferConfig(
            multipart_threshold=self.threshold,
            multipart_chunksize=max(settings.multipart_chunk_bytes, 8 * 1024 * 1024),
            max_concurrency=2,
        )
        self.recorded = recorded_checksums(source)

    def copy(self, item: dict[str, Any]) -> dict[str, Any]:
        key = item["key"]
        head = self.source.client.head_object(Bucket=self.source.bucket, Key=key)
        expected = self.recorded.get(key) or head.get("Metadata", {}).get("object-sha256")
        extra: dict[str, Any] = {"StorageClass": self.settings.dr_storage_class}
        sse = head.get("ServerSideEncryption") or self.settings.sse
        if sse:
            extra["ServerSideEncryption"] = sse
        source = {"Bucket": self.source.bucket, "Key": key}
        if head["ContentLength"] < self.threshold:
            response = self.dr.client.copy_object(
                Bucket=self.dr.bucket,
                Key=key,
                CopySource=source,
                MetadataDirective="COPY",
                ChecksumAlgorithm="SHA256",
                **extra,
            )
            result = response["CopyObjectResult"]
            if expected:
                ok, how = result.get("ChecksumSHA256") == b64_of_hex(expected), "sha256"
            else:
                ok, how = result.get("ETag") == head["ETag"], "etag"
            method = "copy_object"
        else:
            self.dr.client.copy(
                source,
                self.dr.bucket,
                key,
                ExtraArgs={
                    **extra,
                    "Metadata": head.get("Metadata", {}),
                    "ContentType": head.get("ContentType", "binary/octet-stream"),
                },
                Config=self.transfer,
            )
            expected = expected or _hash_object(self.source, key)
            ok, how = _hash_object(self.dr, key) == expected, "sha256 read back"
            method = "multipart copy"
        if not ok:
            # Hide the bad copy behind a delete marker, so the next run copies it again.
            self.dr.client.delete_object(Bucket=self.dr.bucket, Key=key)
            raise ChecksumMismatch(
                f"copy of {key} to s3://{self.dr.bucket} does not match the source's "
                f"recorded checksum ({how}); it was hidden and is copied again next run"
            )
        return {"key": key, "bytes": head["ContentLength"], "method": method, "verified": how}


def check_regions(settings: Settings) -> None:
    repository.require_s3(settings, "the DR-region sync")
    if settings.source_region != "primary":
        raise InvalidInput(
            f"WEDEFI_DR_SOURCE_REGION={settings.source_region}: the sync copies the primary "
            "bucket to the DR bucket; unset it to sync"
        )
    if settings.bucket == settings.dr_bucket:
        raise InvalidInput("the primary and DR buckets are the same bucket: nothing to sync")


def sync(settings: Settings, *, dry_run: bool = False) -> dict[str, Any]:
    """One run: plan, guard, copy (bounded parallelism), propagate recorded deletions."""
    check_regions(settings)
    t0 = time.monotonic()
    source = ObjectStore(settings)
    dr = ObjectStore(settings, bucket=settings.dr_bucket)
    buckets.for_locked_bucket(dr.client)
    lock_days = buckets.object_lock_days(dr.client, dr.bucket)
    if lock_days is None:
        log.warning("s3://%s has no COMPLIANCE object lock: its copies can be deleted", dr.bucket)
    plan = plan_sync(source, dr)
    guard(settings, plan, source, dr)
    summary: dict[str, Any] = {
        "source": f"s3://{source.bucket}/{source.key('')}",
        "dr": f"s3://{dr.bucket}/{dr.key('')}",
        "dr_object_lock_days": lock_days,
        "dry_run": dry_run,
        "source_objects": plan.source_objects,
        "dr_objects_before": plan.dr_objects,
        "already_present": plan.already_present,
        "to_copy": [i["key"] for i in plan.to_copy],
        "to_delete": plan.to_delete,
        "missing_kept": plan.missing_kept,
        "copied": [],
        "deleted": [],
        "bytes_copied": 0,
    }
    if dry_run:
        summary["seconds"] = time.monotonic() - t0
        return summary
    copier = Copier(settings, source, dr)
    failures: list[str] = []
    with ThreadPoolExecutor(max_workers=settings.sync_concurrency) as pool:
        futures = {pool.submit(copier.copy, item): item["key"] for item in plan.to_copy}
        for future, key in futures.items():
            try:
                done = future.result()
            except Exception as exc:  # noqa: BLE001 - every failure is named below
                failures.append(f"{key}: {exc}")
                continue
            summary["copied"].append(done)
            summary["bytes_copied"] += done["bytes"]
    for key in plan.to_delete:
        dr.client.delete_object(Bucket=dr.bucket, Key=key)  # a marker; locked versions stay
        summary["deleted"].append(key)
    summary["seconds"] = time.monotonic() - t0
    if failures:
        raise SyncFailed(
            f"{len(failures)} of {len(plan.to_copy)} copies failed (the rest are in the DR "
            "copy; a rerun resumes): " + "; ".join(failures[:5])
        )
    return summary


def describe(summary: dict[str, Any]) -> list[str]:
    """A few lines for the operator: what was copied, or that nothing needed copying."""
    lines = [f"sync {summary['source']} -> {summary['dr']}"]
    if summary["dry_run"]:
        lines.append(
            f"dry run: would copy {len(summary['to_copy'])}, delete "
            f"{len(summary['to_delete'])} (recorded by the lifecycle)"
        )
    elif not summary["copied"] and not summary["deleted"]:
        lines.append(
            f"nothing to copy: all {summary['already_present']} objects already in the DR copy"
        )
    else:
        lines.append(
            f"copied {len(summary['copied'])} objects ({summary['bytes_copied']:,} bytes, each "
            f"verified), {summary['already_present']} already there, deleted "
            f"{len(summary['deleted'])} the lifecycle removed"
        )
    if summary["missing_kept"]:
        lines.append(
            f"kept in the DR copy although missing from the source: {len(summary['missing_kept'])}"
        )
    lock = summary["dr_object_lock_days"]
    lines.append(f"object lock: COMPLIANCE {lock} days" if lock else "object lock: NONE")
    return lines
