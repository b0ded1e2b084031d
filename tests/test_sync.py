"""Cross-region sync against moto over HTTP: server-side verified copies, a no-op rerun,
recorded deletions only, the mass-deletion guard with its alert, and object lock."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from botocore.exceptions import ClientError

from tests.helpers import sns_inbox
from wedefi_dr.catalog import listing
from wedefi_dr.config import Settings, get_settings
from wedefi_dr.errors import SyncRefused
from wedefi_dr.lifecycle import buckets, records
from wedefi_dr.lifecycle.sync import sync as core_sync
from wedefi_dr.physical import wal
from wedefi_dr.storage.s3 import ObjectStore

BIG = 6 * 1024 * 1024  # above the test's multipart threshold: one object copied in parts


def make_pair(settings: Settings, source_keys: list[str]) -> tuple[str, str]:
    """A fresh primary/DR bucket pair (the DR one object-locked), the primary holding a
    server-side copy of ``source_keys`` from the stack's primary bucket."""
    tag = uuid.uuid4().hex[:8]
    src, dr = f"tiers-src-{tag}", f"tiers-dr-{tag}"
    client = ObjectStore(settings).client
    buckets.ensure_plain_bucket(client, src, settings.aws_region)
    buckets.ensure_dr_bucket(client, dr, settings.aws_region, settings.dr_object_lock_days)
    for key in source_keys:
        client.copy_object(
            Bucket=src,
            Key=key,
            CopySource={"Bucket": settings.bucket, "Key": key},
            MetadataDirective="COPY",
            ServerSideEncryption="AES256",
        )
    return src, dr


@pytest.fixture
def pair(settings: Settings, good_backup: str, env_override) -> Iterator[dict]:
    store = ObjectStore(settings)
    keys = [listing.data_key(store, good_backup), listing.manifest_key(store, good_backup)]
    segments = [
        o["Key"]
        for o in store.list_keys(wal.archive_prefix(settings) + "/")
        if wal.SEGMENT_RE.match(o["Key"].rsplit("/", 1)[-1][:24])
    ][:3]
    assert segments, "the stack's primary archives WAL from the start"
    src, dr = make_pair(settings, keys + segments)
    env_override(
        WEDEFI_DR_BUCKET=src,
        WEDEFI_DR_DR_BUCKET=dr,
        WEDEFI_DR_SYNC_MULTIPART_THRESHOLD_BYTES=str(5 * 1024 * 1024),
    )
    big = store.key("reports", "big.bin")
    store.client.put_object(
        Bucket=src, Key=big, Body=os.urandom(BIG), ServerSideEncryption="AES256"
    )
    s = get_settings()
    yield {
        "settings": s,
        "src": ObjectStore(s),
        "dr": ObjectStore(s, bucket=dr),
        "backup": good_backup,
        "data_key": keys[0],
        "segments": segments,
        "big": big,
    }


def dr_keys(dr: ObjectStore) -> set[str]:
    return {o["Key"] for o in dr.list_keys(dr.key(""))}


def test_sync_copies_exactly_the_missing_objects_verified_and_a_rerun_is_a_no_op(pair):
    from flows.sync import sync

    src, dr = pair["src"], pair["dr"]
    first = sync(operator="pytest")
    source_keys = {o["Key"] for o in src.list_keys(src.key(""))}
    assert dr_keys(dr) == source_keys
    assert len(first["copied"]) == len(source_keys)
    methods = {c["key"]: (c["method"], c["verified"]) for c in first["copied"]}
    assert methods[pair["data_key"]] == ("copy_object", "sha256")  # the manifest's sha256
    assert methods[pair["segments"][0]] == ("copy_object", "sha256")  # the WAL metadata's
    assert methods[pair["big"]] == ("multipart copy", "sha256 read back")

    head = dr.client.head_object(Bucket=dr.bucket, Key=pair["segments"][0])
    src_head = src.client.head_object(Bucket=src.bucket, Key=pair["segments"][0])
    assert head["StorageClass"] == "STANDARD_IA"
    assert head["ServerSideEncryption"] == "AES256"
    assert head["Metadata"] == src_head["Metadata"]  # the WAL MAC travels with the copy
    assert head["ObjectLockMode"] == "COMPLIANCE"
    big = dr.client.head_object(Bucket=dr.bucket, Key=pair["big"])
    assert big["StorageClass"] == "STANDARD_IA" and big["ServerSideEncryption"] == "AES256"

    second = sync(operator="pytest")
    assert second["copied"] == [] and second["deleted"] == []
    assert second["already_present"] == len(source_keys)

    # Resumable: an object the DR copy lacks (a run killed before it) is the only one copied.
    dr.client.delete_object(Bucket=dr.bucket, Key=pair["segments"][1])
    third = sync(operator="pytest")
    assert [c["key"] for c in third["copied"]] == [pair["segments"][1]]


def test_only_recorded_deletions_propagate(pair, env_override):

    env_override(WEDEFI_DR_SYNC_MAX_MISSING_SHARE="0.5")  # one of six vanishes below

    src, dr = pair["src"], pair["dr"]
    core_sync(get_settings())
    on_purpose, vanished = pair["segments"][0], pair["segments"][1]
    records.write_record(src, "pytest-run", {on_purpose: "outside the PITR window"}, "pytest")
    src.delete(on_purpose)
    src.delete(vanished)  # gone without a record: never deleted from the DR copy
    result = core_sync(get_settings())
    assert result["deleted"] == [on_purpose]
    assert result["missing_kept"] == [vanished]
    assert vanished in dr_keys(dr) and on_purpose not in dr_keys(dr)


def test_planted_deletion_record_is_ignored(pair, env_override):
    env_override(WEDEFI_DR_SYNC_MAX_MISSING_SHARE="0.5")

    src, dr = pair["src"], pair["dr"]
    core_sync(get_settings())
    victim = pair["segments"][0]
    src.put_json(
        records.records_prefix(src) + "planted.json",
        {"run_id": "x", "deleted": {victim: "planted"}, "authentication": {"mac": "00"}},
    )
    src.delete(victim)
    result = core_sync(get_settings())
    assert result["deleted"] == [] and victim in dr_keys(dr)


def test_wiped_primary_deletes_nothing_fails_and_sends_a_critical_alert(pair):

    src, dr = pair["src"], pair["dr"]
    inbox = sns_inbox(pair["settings"], f"tiers-{uuid.uuid4().hex[:8]}")
    core_sync(get_settings())
    before = dr_keys(dr)
    keep = pair["data_key"]
    for key in before - {keep}:  # most of it gone, nothing recorded
        src.delete(key)
    with pytest.raises(SyncRefused, match="lacks .* without a deletion record"):
        core_sync(get_settings())
    for key in {keep}:
        src.delete(key)  # and now all of it
    with pytest.raises(SyncRefused, match="is empty"):
        core_sync(get_settings())
    assert dr_keys(dr) == before
    statuses = [m["status"] for m in inbox()]
    assert statuses.count("critical") == 2, statuses


def test_a_locked_backup_cannot_be_deleted_before_its_date(pair):

    core_sync(get_settings())
    dr = pair["dr"]
    key = pair["data_key"]
    head = dr.client.head_object(Bucket=dr.bucket, Key=key)
    assert head["ObjectLockMode"] == "COMPLIANCE"
    for kwargs in ({}, {"BypassGovernanceRetention": True}):
        with pytest.raises(ClientError) as refused:
            dr.client.delete_object(
                Bucket=dr.bucket, Key=key, VersionId=head["VersionId"], **kwargs
            )
        assert refused.value.response["Error"]["Code"] == "AccessDenied"
    # A plain delete only hides it: the locked version is still there, whole.
    dr.client.delete_object(Bucket=dr.bucket, Key=key)
    body = dr.client.get_object(Bucket=dr.bucket, Key=key, VersionId=head["VersionId"])
    assert body["ContentLength"] == head["ContentLength"]


def test_sync_refuses_when_reads_come_from_the_dr_region(pair, env_override):
    from wedefi_dr.errors import InvalidInput

    env_override(WEDEFI_DR_SOURCE_REGION="dr")
    with pytest.raises(InvalidInput, match="unset it to sync"):
        core_sync(get_settings())
