"""The runbooks' step names, each defined once.

The Prefect task, the DR report, the timings and the docs use these same words, so an
engineer at 3 a.m. can match a step in the Prefect UI to the runbook and to the code
without a map. A flow's steps are listed in the order the runbook runs them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum


class Shared(StrEnum):
    """Steps every runbook ends or fails with."""

    AUDIT_BACKUP_STARTED = "audit: backup started"
    AUDIT_BACKUP_FINISHED = "audit: backup finished"
    AUDIT_RECOVERY_STARTED = "audit: recovery started"
    AUDIT_RECOVERY_FINISHED = "audit: recovery finished"
    PUBLISH_BACKUP_METRICS = "publish backup metrics"
    NOTIFY = "notify"


class LogicalBackup(StrEnum):
    """Flow ``logical-backup``: the daily pg_dump."""

    PREFLIGHT = "preflight"
    DUMP_ENCRYPT_UPLOAD = "dump, encrypt and upload"
    WRITE_MANIFEST = "write manifest"


class Restore(StrEnum):
    """Flow ``restore-backup``: a verified restore of one logical backup."""

    VALIDATE_REQUEST = "validate restore request"
    APPROVAL = "break-glass approval"
    DOWNLOAD_VERIFY = "download and verify checksum"
    DECRYPT_RESTORE = "decrypt and pg_restore"
    VERIFY = "verify row counts and content hashes"


class DRTest(StrEnum):
    """Flow ``dr-test``: the monthly DR test, numbered as the report shows it."""

    SELECT_BACKUP = "select the backup"
    PROVISION = "1. provision the DR environment"
    RESTORE = "2. restore the backup"
    DRILL_DAMAGE = "drill: damage the restored copy"
    VALIDATE = "3. validate: GX suites and amcheck"
    SMOKE = "4. smoke tests as the application role"
    BENCHMARK = "5. benchmark: primary vs DR copy"
    REPORT = "6. report"
    NOTIFY = "7. notify"
    METRICS = "8. metrics"
    TEARDOWN = "9. teardown of the DR environment"


class BaseBackup(StrEnum):
    """Flow ``base-backup``: a streamed, encrypted pg_basebackup."""

    STREAM = "stream pg_basebackup to the object store"
    WRITE_MANIFEST = "write base backup manifest"


class PITR(StrEnum):
    """Flow ``point-in-time-recovery``, in runbook order."""

    CHECK_REQUEST = "check the target lies in the recoverable window"
    APPROVAL = "approval"
    STAGE_BASE_BACKUP = "stage and verify the base backup (the cluster still runs)"
    DELTA_RESTORE = "delta: rewrite what differs from the base backup in the stopped copy, verify"
    STOP_APPLICATION = "stop application services"
    STOP_AND_SWAP = "stop the cluster, keep its data aside, put the verified backup in place"
    PUSH_UNARCHIVED_WAL = "push WAL the old server had not archived"
    WRITE_RECOVERY_SETTINGS = "write recovery settings (recovery.signal, restore_command, targets)"
    START_AND_REPLAY = "start the server and wait for replay to reach the target"
    VALIDATE = "validate the recovered data"
    PROMOTE = "promote with pg_promote() and confirm pg_is_in_recovery() is false"
    CLUSTERS_FILE = "clusters file: the recovered cluster is production"
    START_APPLICATION = "start application services"
    ROLL_BACK = "roll back: the original data directory back and started as it was"


class Retention(StrEnum):
    """Flow ``retention``: data retention by classification."""

    FIX_MOMENT = "fix the moment the cutoffs count from"
    VALIDATE_POLICY = "validate policy against the live schema"
    PREVIEW = "preview: rows that would go"
    GUARD = "guard: no mass deletion, a recent verified backup"
    CREATE_TABLES = "create archive and summary tables"
    APPLY = "apply retention"
    PUBLISH_METRICS = "publish retention metrics"


class Monitor(StrEnum):
    """Flow ``monitor``: every minute, what no run reports by itself."""

    COLLECT = "collect: standbys, slots, archiver, catalog ages, audit"
    PUBLISH_METRICS = "publish monitor metrics"
    EVALUATE_ALERTS = "evaluate alerts (no Prometheus)"
    PAGE = "page and resolve alerts"


class Approvals(StrEnum):
    """The approval every runbook that can change production pauses for."""

    OPEN_REQUEST = "approval: open the request"
    DECIDE = "approval: decide from the authenticated approvals"
    EXPIRE = "approval: the wait timed out"


class Standby(StrEnum):
    """Flow ``standby``: a streaming standby of the primary, provisioned and verified."""

    CHECK_REQUEST = "check the primary and the standby's cluster"
    PROVISION = "pg_basebackup -R -X stream onto the standby with its own slot"
    VERIFY_STREAMING = "verify streaming: pg_stat_replication and pg_is_in_recovery()"


class Failover(StrEnum):
    """Flow ``failover``: promote the standby break-glass, fence the old primary."""

    CHECK_REQUEST = "check the standby streams and the old primary is described"
    APPROVAL = "break-glass approval"
    FENCE = "stop and fence the old primary"
    ARCHIVING = "configure production archiving on the standby"
    PROMOTE = "promote the standby with pg_promote() and confirm it is writable"
    CONFIRM_ARCHIVE = "confirm the new timeline reaches the archive"
    CLUSTERS_FILE = "clusters file: the new primary production, the old one fenced"
    ROLL_BACK = "roll back: unfence the old primary and start it as it was"


class Rejoin(StrEnum):
    """Flow ``rejoin``: the fenced old primary back as a standby of the new one."""

    CHECK_REQUEST = "check the old primary is fenced and stopped cleanly, the new one runs"
    KEEP_WAL = "keep the old primary's WAL: push .ready segments, copy divergent ones aside"
    REWIND = "pg_rewind onto the new primary's timeline (or a fresh pg_basebackup)"
    CONFIGURE = "configure it as a streaming standby of the new primary and unfence it"
    VERIFY_STREAMING = "start it and verify streaming: pg_stat_replication"
    CLUSTERS_FILE = "clusters file: the rejoined cluster is no longer fenced"


def step_key(step: StrEnum) -> str:
    """``download_verify`` for ``Restore.DOWNLOAD_VERIFY``: the short, stable name that
    results, scripts and the benchmarks select a step by (the value is for people)."""
    return step.name.lower()


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    """Times one runbook step: the dict it yields gets ``started``, ``finished`` (epoch
    seconds, for the report's timeline) and ``seconds`` when the block ends, raised or not.
    Plain floats, so a step's result that carries them still pickles and caches."""
    timing = {"started": time.time()}
    try:
        yield timing
    finally:
        timing["finished"] = time.time()
        timing["seconds"] = timing["finished"] - timing["started"]


class Fleet(StrEnum):
    """Flow ``fleet-backup``: the logical backup of every database in the fleet file."""

    LOAD = "load the fleet file"
    HOST_LIMITS = "set the per-host concurrency limits"
    BACK_UP = "back up one database (preflight, dump, encrypt, upload, manifest)"


class Sync(StrEnum):
    """Flow ``sync``: the daily copy of the primary bucket to the DR region."""

    COPY = "copy new backups to the DR region (server-side, verified)"


class BackupRetention(StrEnum):
    """Flow ``backup-retention``: the weekly backup lifecycle."""

    SELECT = "select what goes: GFS, the PITR window, WAL the kept base backups need"
    PRUNE = "delete what the lifecycle selected, audited and recorded for the sync"
    PRUNE_RECORDS = "prune the product's own records (run history, reports, spool)"


class ArchiveTier(StrEnum):
    """Flow ``archive-tier``: the weekly copy of the newest full backup to Glacier."""

    ARCHIVE = "copy the week's newest full backup to the Glacier tier"
