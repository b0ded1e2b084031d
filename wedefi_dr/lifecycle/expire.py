"""The backup lifecycle's run: plan what goes from the primary bucket, then delete it.

The plan (:func:`plan`) reads the catalog and the WAL listing and applies
:mod:`wedefi_dr.lifecycle.gfs`; a dry run stops there and lists every candidate with the
reason. A real run (:func:`prune`) first writes the signed deletion record the sync acts
on, then deletes with the lifecycle's own credential (the only one allowed to delete),
and audits every deleted backup and every batch of WAL in ``backup_audit_log``.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta
from typing import Any

from wedefi_dr.catalog import listing
from wedefi_dr.config import Settings
from wedefi_dr.errors import InvalidInput
from wedefi_dr.lifecycle import gfs, records
from wedefi_dr.observability import audit
from wedefi_dr.physical import basebackup, wal
from wedefi_dr.storage.repository import Repository, open_store

log = logging.getLogger(__name__)
DELETE_BATCH = 1000  # S3's DeleteObjects limit
# A write unfinished for this long belongs to a run that died (every step has a timeout).
INCOMPLETE_AFTER_SECONDS = 24 * 3600


def lifecycle_store(settings: Settings) -> Repository:
    """The primary bucket under the lifecycle's deleting credential (when configured)."""
    key_id = settings.lifecycle_aws_access_key_id.get_secret_value()
    secret = settings.lifecycle_aws_secret_access_key.get_secret_value()
    if key_id and secret:
        return open_store(settings, credentials=(key_id, secret))
    if settings.repo_type == "s3":
        log.warning(
            "WEDEFI_DR_LIFECYCLE_AWS_ACCESS_KEY_ID is not set: deleting with the default "
            "credentials (production gives the lifecycle role its own)"
        )
    return open_store(settings)


def _verified(store: Repository, m: Any) -> bool:
    head = store.head(m.object.key)
    return head is not None and head["ContentLength"] == m.object.size_bytes


def plan(settings: Settings, now: datetime) -> dict[str, Any]:
    """Every candidate, kept or going, with its reason. Changes nothing."""
    if settings.source_region != "primary":
        raise InvalidInput("the backup lifecycle works on the primary bucket: unset SOURCE_REGION")
    store = open_store(settings)
    logical = listing.list_backups(store)
    selection = gfs.select_logical(
        [gfs.Logical(m.backup_id, m.finished_at, _verified(store, m)) for m in logical],
        now,
        daily=settings.gfs_daily,
        weekly=settings.gfs_weekly,
        monthly=settings.gfs_monthly,
        min_verified=settings.gfs_min_verified,
    )
    bases = basebackup.list_base_backups(store)
    prefix = wal.archive_prefix(settings) + "/"
    wal_objects = {o["Key"][len(prefix) :]: o["Size"] for o in store.list_keys(prefix)}
    base_sel, wal_sel = gfs.select_physical(
        [gfs.Base(b.backup_id, b.finished_at, b.start_wal_file) for b in bases],
        sorted(wal_objects),
        now,
        window=timedelta(days=settings.pitr_window_days),
        segment_bytes=settings.wal_segment_bytes,
    )
    return {
        "as_of": now.isoformat(),
        "logical": {"keep": selection.keep, "delete": selection.delete},
        "base": {"keep": base_sel.keep, "delete": base_sel.delete},
        "wal": {
            "kept": len(wal_sel.keep),
            "delete": wal_sel.delete,
            "bytes": sum(wal_objects[n] for n in wal_sel.delete),
        },
    }


def _keys_under(store: Repository, prefix: str) -> dict[str, int]:
    return {o["Key"]: o["Size"] for o in store.list_keys(prefix)}


def prune(
    settings: Settings, the_plan: dict[str, Any], *, operator: str, run_id: str
) -> dict[str, Any]:
    """Delete what ``the_plan`` selected: record first (for the sync), then the manifest
    (the backup stops existing), then its objects; one audit row per backup / WAL batch."""
    store = lifecycle_store(settings)
    ops = settings.ops_dsn.get_secret_value()
    groups: list[tuple[str, str, dict[str, int], str]] = []  # type, id, keys, reason
    for kind, items in (("logical", the_plan["logical"]), ("base", the_plan["base"])):
        for backup_id, reason in items["delete"].items():
            keys = _keys_under(store, store.key(kind, backup_id) + "/")
            manifest = store.key(kind, backup_id, listing.MANIFEST_NAME)
            ordered = {manifest: keys.pop(manifest, 0), **keys}
            groups.append((f"expire-{kind}", backup_id, ordered, reason))
    names = sorted(the_plan["wal"]["delete"])
    for i in range(0, len(names), DELETE_BATCH):
        batch = names[i : i + DELETE_BATCH]
        keys = {wal.archive_key(settings, n): 0 for n in batch}
        label = f"wal {batch[0]}..{batch[-1]}" if len(batch) > 1 else f"wal {batch[0]}"
        groups.append(("expire-wal", label[:100], keys, the_plan["wal"]["delete"][batch[0]]))
    deleted: dict[str, str] = {}
    for _, backup_id, keys, reason in groups:
        deleted.update(dict.fromkeys(keys, f"{backup_id}: {reason}"))
    record = records.write_record(store, run_id, deleted, operator) if deleted else None
    done = []
    for backup_type, backup_id, keys, reason in groups:
        audit_id = audit.backup_started(
            ops,
            audit_id=str(uuid.uuid4()),
            backup_type=backup_type,
            backup_id=backup_id,
            operator=operator,
        )
        try:
            store.delete_many(list(keys))
        except Exception as exc:
            audit.backup_finished(ops, audit_id, status="failed", error=audit.scrub(str(exc)))
            raise
        audit.backup_finished(ops, audit_id, status="success", size_bytes=sum(keys.values()))
        done.append({"type": backup_type, "id": backup_id, "objects": len(keys), "why": reason})
    incomplete = store.clean_incomplete(INCOMPLETE_AFTER_SECONDS)
    return {
        "record": record,
        "deleted": done,
        "objects": len(deleted),
        "incomplete_removed": incomplete,
    }
