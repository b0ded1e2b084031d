"""PITR after the lifecycle pruned base backups and WAL, from the DR copy alone."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

from tests.test_pitr import ONE, markers, recover, source_cluster, sql1, switch_and_wait_archived
from wedefi_dr.config import get_settings
from wedefi_dr.lifecycle import expire
from wedefi_dr.lifecycle.sync import sync as core_sync
from wedefi_dr.physical import basebackup, wal
from wedefi_dr.storage.s3 import ObjectStore


def test_pitr_inside_the_window_after_pruning_from_the_dr_copy_alone(
    stack, prefect_api, env_override
):
    from flows.base_backup import base_backup

    hexid = uuid.uuid4().hex[:6]
    prefix = f"tiers-pitr-{hexid}"
    src = source_cluster(stack, f"tierssrc-{hexid}", prefix)
    recovered = stack.cluster(f"tiers-pitr-{hexid}")
    dsn = src.dsn("postgres")
    env_override(
        WEDEFI_DR_PRIMARY_DSN=dsn,
        WEDEFI_DR_PREFIX=prefix,
        WEDEFI_DR_PITR_REPLAY_TIMEOUT_SECONDS="120",
    )
    try:
        sql1(dsn, "CREATE TABLE markers (id int PRIMARY KEY, at timestamptz DEFAULT now())")
        oldest = base_backup(operator="pytest")["backup_id"]
        sql1(dsn, "INSERT INTO markers (id) VALUES (1)")
        switch_and_wait_archived(dsn)
        kept = base_backup(operator="pytest")["backup_id"]
        time.sleep(0.3)
        window_start = sql1(dsn, "SELECT clock_timestamp()")  # the PITR window opens here
        sql1(dsn, "INSERT INTO markers (id) VALUES (2)")
        time.sleep(0.3)
        target = sql1(dsn, "SELECT clock_timestamp()")
        time.sleep(0.3)
        sql1(dsn, "INSERT INTO markers (id) VALUES (3)")
        switch_and_wait_archived(dsn)

        store = ObjectStore(get_settings())
        bases = {b.backup_id: b for b in basebackup.list_base_backups(store)}
        assert bases[kept].finished_at < window_start < target
        now = datetime.now(UTC)
        env_override(WEDEFI_DR_PITR_WINDOW_DAYS=str((now - window_start).total_seconds() / 86400))
        s = get_settings()
        plan = expire.plan(s, now)
        assert set(plan["base"]["delete"]) == {oldest}
        assert set(plan["base"]["keep"]) == {kept}  # the newest before the window
        assert plan["wal"]["delete"], "WAL before the kept base backup goes"
        first_kept = bases[kept].start_wal_file
        assert all(name[8:24] < first_kept[8:24] for name in plan["wal"]["delete"])
        core_sync(s)  # the DR copy holds everything
        expire.prune(s, plan, operator="pytest", run_id=hexid)
        synced = core_sync(s)  # and loses only what the lifecycle removed
        assert synced["missing_kept"] == [] and len(synced["deleted"]) >= 2

        # The primary region is gone: every object under this prefix deleted.
        primary = ObjectStore(s)
        for obj in list(primary.list_keys(primary.key(""))):
            primary.delete(obj["Key"])
        env_override(WEDEFI_DR_SOURCE_REGION="dr")
        dr = ObjectStore(get_settings())
        assert wal.archive_prefix(get_settings()).startswith(prefix)
        assert {b.backup_id for b in basebackup.list_base_backups(dr)} == {kept}

        result = recover(
            ONE, target_kind="time", target_value=target.isoformat(), cluster=recovered.name
        )
        assert result["base_backup_id"] == kept
        assert markers(recovered.dsn()) == [1, 2]
    finally:
        for c in (src, recovered):
            c.stop()
