"""The regional disaster: the primary bucket gone, a restore and a DR test from the DR copy
alone; and the Glacier tier's restore-request path."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.helpers import fingerprint
from wedefi_dr.catalog import listing
from wedefi_dr.config import get_settings
from wedefi_dr.errors import ArchivedObjectNotRestored
from wedefi_dr.lifecycle import buckets, glacier
from wedefi_dr.lifecycle.sync import sync as core_sync
from wedefi_dr.storage.s3 import ObjectStore


@pytest.fixture
def dr_only(settings, good_backup, env_override):
    """The good backup synced to a fresh DR bucket, then every object of its primary
    bucket deleted; reads come from the DR region."""
    from tests.test_sync import make_pair

    store = ObjectStore(settings)
    keys = [listing.data_key(store, good_backup), listing.manifest_key(store, good_backup)]
    src, dr = make_pair(settings, keys)
    env_override(WEDEFI_DR_BUCKET=src, WEDEFI_DR_DR_BUCKET=dr)
    core_sync(get_settings())
    primary = ObjectStore(get_settings())
    for obj in list(primary.list_keys("")):
        primary.delete(obj["Key"])
    assert list(primary.list_keys("")) == []
    env_override(WEDEFI_DR_SOURCE_REGION="dr")
    return {"dr": dr, "backup": good_backup}


def test_restore_from_the_dr_copy_alone_is_exact(dr_only, scratch_dsn, settings, prefect_api):
    from flows.restore import restore_backup

    assert get_settings().bucket == dr_only["dr"]
    result = restore_backup(
        backup_id="latest",
        target_dsn=scratch_dsn,
        operator="pytest",
        justification="regional disaster drill",
    )
    assert result["backup_id"] == dr_only["backup"]
    assert fingerprint(scratch_dsn) == fingerprint(settings.primary_dsn.get_secret_value())


def test_dr_test_from_the_dr_copy_alone_passes(dr_only, env_override, prefect_api):
    from flows.dr_test import dr_test

    root = Path(tempfile.mkdtemp(prefix="wedefi-tiers-drtest-"))
    root.chmod(0o755)
    env_override(
        WEDEFI_DR_DR_ENV_DIR=str(root / "envs"),
        WEDEFI_DR_DR_REPORT_DIR=str(root / "reports"),
        WEDEFI_DR_DR_BENCH_ITERATIONS="2",
    )
    try:
        result = dr_test(backup_id="latest", operator="pytest")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert result["success"] is True
    assert result["backup_id"] == dr_only["backup"]
    dr = ObjectStore(get_settings())
    reports = [o["Key"] for o in dr.list_keys(dr.key("logical")) if "/dr-tests/" in o["Key"]]
    assert reports, "the DR test's report is stored in the DR region"


def test_a_restore_from_the_glacier_tier_goes_through_the_restore_request(
    settings, good_backup, env_override, scratch_dsn, prefect_api
):
    from flows.archive_tier import archive_tier
    from flows.restore import restore_backup

    bucket = f"tiers-glacier-{uuid.uuid4().hex[:8]}"
    buckets.ensure_plain_bucket(ObjectStore(settings).client, bucket, settings.aws_region)
    env_override(WEDEFI_DR_GLACIER_BUCKET=bucket)
    first = archive_tier(backup_id=good_backup, operator="pytest")
    assert first["copied"] and first["storage_class"] == "GLACIER"
    assert archive_tier(backup_id=good_backup, operator="pytest")["copied"] is False
    tier = ObjectStore(get_settings(), bucket=bucket)
    data_key = listing.data_key(tier, good_backup)
    assert tier.head(data_key)["StorageClass"] == "GLACIER"

    env_override(WEDEFI_DR_SOURCE_REGION="glacier")
    with pytest.raises(ArchivedObjectNotRestored, match="archive-tier thaw"):
        restore_backup(
            backup_id=good_backup, target_dsn=scratch_dsn, operator="pytest", justification="t"
        )
    said: list[str] = []
    state = glacier.thaw(get_settings(), good_backup, wait=False, say=said.append)
    assert "restore requested" in said[0] and "3-5 hours" in said[0]
    if state["state"] != "readable":  # moto restores at once; AWS takes the hours it said
        state = glacier.thaw(get_settings(), good_backup, wait=True, poll_seconds=0.2)
    assert state["state"] == "readable"
    result = restore_backup(
        backup_id=good_backup, target_dsn=scratch_dsn, operator="pytest", justification="t"
    )
    assert result["backup_id"] == good_backup
