"""The backup lifecycle: GFS over a simulated year (pure), WAL kept for the PITR window
(pure), and one real prune against moto that the sync then propagates."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from wedefi_dr.catalog import listing
from wedefi_dr.catalog.manifest import new_backup_id
from wedefi_dr.config import get_settings
from wedefi_dr.lifecycle import gfs, records
from wedefi_dr.lifecycle.sync import sync as core_sync
from wedefi_dr.postgres.tools import connect
from wedefi_dr.storage.s3 import ObjectStore

SEG = 16 * 1024 * 1024


def year_of_dailies(verified=lambda d: True) -> list[gfs.Logical]:
    start = datetime(2026, 1, 1, 2, 0, tzinfo=UTC)
    return [
        gfs.Logical(f"{start + timedelta(days=i):%Y-%m-%d}", start + timedelta(days=i), verified(i))
        for i in range(365)
    ]


NOW = datetime(2026, 12, 31, 12, 0, tzinfo=UTC)
POLICY = {"daily": 7, "weekly": 4, "monthly": 12, "min_verified": 3}


def test_a_year_of_daily_backups_keeps_exactly_the_gfs_set():
    selection = gfs.select_logical(year_of_dailies(), NOW, **POLICY)
    expected = (
        [f"2026-12-{d}" for d in range(25, 32)]  # 7 daily
        + ["2026-12-20", "2026-12-13"]  # weeks 51, 50 (weeks 53, 52 end on kept days)
        + [
            f"2026-{m:02d}-{d}"
            for m, d in [
                (1, 31),
                (2, 28),
                (3, 31),
                (4, 30),
                (5, 31),
                (6, 30),
                (7, 31),
                (8, 31),
                (9, 30),
                (10, 31),
                (11, 30),
            ]
        ]  # monthly; December's is the 31st
    )
    assert sorted(selection.keep) == sorted(expected)
    assert len(selection.delete) == 365 - 20
    assert "monthly 2026-03" in selection.keep["2026-03-31"]
    assert "weekly 2026-W51" in selection.keep["2026-12-20"]
    assert selection.delete["2026-06-15"].startswith("outside every GFS slot")


def test_damaged_backups_fill_no_slot_and_the_newest_verified_are_always_kept():
    # Only the first three days of the year are good: every slot is empty, yet the three
    # newest verified backups stay.
    selection = gfs.select_logical(year_of_dailies(lambda i: i < 3), NOW, **POLICY)
    assert sorted(selection.keep) == ["2026-01-01", "2026-01-02", "2026-01-03"]
    assert selection.delete["2026-12-31"].startswith("not verified")


def wal(tli: int, segno: int) -> str:
    return f"{tli:08X}{segno // 256:08X}{segno % 256:08X}"


def test_wal_is_kept_from_the_oldest_kept_base_backup_on_every_timeline():
    bases = [
        gfs.Base(f"base-{d:02d}", datetime(2026, 12, d, 3, tzinfo=UTC), wal(1, d * 10))
        for d in (1, 8, 15, 22)
    ] + [gfs.Base("base-29", datetime(2026, 12, 29, 3, tzinfo=UTC), wal(2, 290))]
    names = [wal(1, n) for n in range(0, 300)] + [wal(2, n) for n in range(285, 300)]
    names += ["00000002.history", wal(1, 150) + ".00000028.backup"]
    now = datetime(2026, 12, 31, 12, tzinfo=UTC)
    base_sel, wal_sel = gfs.select_physical(
        bases, names, now, window=timedelta(days=7), segment_bytes=SEG
    )
    # Inside the window: the 29th; the newest before it: the 22nd (reaches the 24th).
    assert sorted(base_sel.keep) == ["base-22", "base-29"]
    assert sorted(base_sel.delete) == ["base-01", "base-08", "base-15"]
    first = 220
    assert sorted(wal_sel.delete) == sorted(
        [wal(1, n) for n in range(first)] + [wal(1, 150) + ".00000028.backup"]
    )
    assert "00000002.history" in wal_sel.keep
    assert all(wal(1, n) in wal_sel.keep for n in range(first, 300))  # old timeline kept
    assert all(wal(2, n) in wal_sel.keep for n in range(285, 300))


def test_no_base_backup_means_no_wal_is_deleted():
    _, wal_sel = gfs.select_physical(
        [], [wal(1, 1)], NOW, window=timedelta(days=7), segment_bytes=SEG
    )
    assert wal_sel.delete == {}


# ---- one real prune against moto --------------------------------------------------------
@pytest.fixture
def synthetic_repository(settings, good_backup, env_override):
    """Fresh primary/DR buckets holding 20 daily logical backups (small, signed manifests)
    ending now, and the DR copy in sync."""
    from tests.test_sync import make_pair

    src, dr = make_pair(settings, [])
    env_override(
        WEDEFI_DR_BUCKET=src,
        WEDEFI_DR_DR_BUCKET=dr,
        WEDEFI_DR_LIFECYCLE_AWS_ACCESS_KEY_ID="lifecycle-role",
        WEDEFI_DR_LIFECYCLE_AWS_SECRET_ACCESS_KEY="lifecycle-secret",
    )
    s = get_settings()
    store = ObjectStore(s)
    template = listing.resolve(ObjectStore(settings), good_backup)
    now = datetime.now(UTC)
    ids = []
    for i in range(20):
        t = now - timedelta(days=i, minutes=5)
        backup_id = new_backup_id(t, suffix=uuid.uuid4().hex[:6])
        body = f"backup {i}".encode()
        key = listing.data_key(store, backup_id)
        store.client.put_object(Bucket=src, Key=key, Body=body)
        m = template.model_copy(
            update={
                "backup_id": backup_id,
                "started_at": t - timedelta(minutes=1),
                "finished_at": t,
                "object": template.object.model_copy(
                    update={
                        "bucket": src,
                        "key": key,
                        "size_bytes": len(body),
                        "sha256": hashlib.sha256(body).hexdigest(),
                    }
                ),
            }
        )
        listing.write_manifest(store, m)
        ids.append(backup_id)
    core_sync(s)
    return {"settings": s, "store": store, "dr": ObjectStore(s, bucket=dr), "ids": ids}


def expire_rows(ops_dsn: str, ids: list[str]) -> set[str]:
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT backup_id FROM backup_audit_log WHERE backup_type = 'expire-logical'"
            " AND status = 'success' AND backup_id = ANY(%s)",
            (ids,),
        )
        return {r[0] for r in cur.fetchall()}


def test_dry_run_then_prune_keeps_the_gfs_set_audits_and_the_sync_propagates(
    synthetic_repository, prefect_api
):
    from flows.backup_retention import backup_retention

    repo = synthetic_repository
    s, store, ids = repo["settings"], repo["store"], repo["ids"]
    dry = backup_retention(dry_run=True, operator="pytest")
    going = set(dry["plan"]["logical"]["delete"])
    assert going and going < set(ids)
    assert {b.backup_id for b in listing.list_backups(store)} == set(ids)  # nothing changed

    done = backup_retention(dry_run=False, operator="pytest")
    assert set(done["plan"]["logical"]["delete"]) == going
    left = {b.backup_id for b in listing.list_backups(store)}
    assert left == set(ids) - going
    assert len(left) >= s.gfs_daily and ids[0] in left
    for backup_id in going:  # manifest and object both gone
        assert store.head(listing.data_key(store, backup_id)) is None
    assert expire_rows(s.ops_dsn.get_secret_value(), sorted(going)) == going
    recorded = records.deleted_on_purpose(store)
    assert {listing.manifest_key(store, b) for b in going} <= set(recorded)

    synced = core_sync(s)
    assert len(synced["deleted"]) == 2 * len(going) and synced["missing_kept"] == []
    dr_left = {b.backup_id for b in listing.list_backups(repo["dr"])}
    assert dr_left == left
