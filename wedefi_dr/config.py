"""One typed settings object for every command, task and flow.

Values come from the environment (``WEDEFI_DR_*``, what ``eval "$(wedefi-dr stack env)"``
exports for the local stack, or the worker's environment in production). Secrets are
``SecretStr`` so that printing or logging the settings object never shows them.
"""

from __future__ import annotations

import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from wedefi_dr.errors import SettingsMissing

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Where the protected database, the ops database, the object store and the keys are."""

    model_config = SettingsConfigDict(env_prefix="WEDEFI_DR_", extra="ignore")

    # The protected database (libpq DSN; the password, if any, is a secret inside it).
    primary_dsn: SecretStr = Field(default=SecretStr(""))
    # The ops database: audit tables live here, never in the protected database.
    ops_dsn: SecretStr = Field(default=SecretStr(""))

    # Databases a restore may overwrite only break-glass, besides the backup's source and
    # every database on the primary's cluster: each entry is a database name, a
    # ``host:port/dbname`` location or a server's system identifier (a JSON list in the
    # environment), e.g. the DR region's production replica.
    production_targets: list[str] = Field(default_factory=list)

    # The repository (wedefi_dr.storage.repository): ``s3`` (the buckets below) or ``posix``
    # (a directory on a local disk or NFS mount, ``repo_path``; checked when first opened).
    repo_type: Literal["s3", "posix"] = "s3"
    repo_path: Path | None = None
    # Object storage (S3 through boto3; an endpoint URL points at the local moto server).
    aws_endpoint_url: str | None = None
    aws_region: str = "us-west-2"
    bucket: str = "wedefi-backup-primary"
    dr_bucket: str = "wedefi-backup-dr-east"
    glacier_bucket: str = "wedefi-backup-glacier"
    prefix: str = "wedefi"
    storage_class: str = "STANDARD_IA"
    sse: str = "AES256"
    sns_topic_arn: str | None = None

    # Logical backup parameters (the plan: --format=custom --compress=9).
    compress_level: int = Field(default=9, ge=0, le=9)
    # Client-side encryption (the plan: AES256, S2K mode 3, SHA512; the count raised from the
    # plan's 65536, cheap to brute-force for a human passphrase, to 2**24).
    gpg_passphrase: SecretStr = Field(default=SecretStr(""))
    gpg_cipher: str = "AES256"
    gpg_s2k_digest: str = "SHA512"
    gpg_s2k_count: int = 16777216
    # gpg's own compression is off by default: a -Z9 dump is already compressed and
    # gpg's zlib runs at a fraction of the cipher's speed (DESIGN.md pitfalls).
    gpg_compress_algo: str = "none"
    # Passphrases rotated out (a JSON list): backups they encrypted still verify and
    # restore; new backups use gpg_passphrase only.
    gpg_previous_passphrases: list[SecretStr] = Field(default_factory=list)

    # Sessions a logical restore into a new database runs at once (pg_restore --jobs and
    # the tables' fingerprints); 1 restores every target in one streamed transaction.
    restore_jobs: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=64)

    # Multipart upload tuning (bytes) and local scratch space for verified downloads.
    multipart_chunk_bytes: int = 16 * 1024 * 1024
    upload_concurrency: int = 4
    spool_dir: Path | None = None

    # Observability.
    metrics_dir: Path | None = None  # node_exporter textfile collector directory
    pushgateway_url: str | None = None
    operator: str = Field(default_factory=lambda: os.environ.get("USER", "unknown"))

    # Data retention: the policy file, and a pause between batches (seconds) that
    # leaves room for autovacuum, replication and other writers on a busy primary.
    retention_policy: Path = PROJECT_ROOT / "deployments" / "retention.yaml"
    retention_batch_pause_seconds: float = Field(default=0.0, ge=0)
    # A run that removes anything needs a verified logical backup of the same database
    # that finished this recently (the daily backup plus slack): what retention removes
    # can then still be restored.
    retention_requires_backup_within_hours: float = Field(default=26.0, gt=0)

    # WAL archive, base backups, point-in-time recovery.
    # Compression level before gpg: zstd for archived WAL segments, gzip for streamed
    # partials and gzip base backups (a mostly idle segment is zeros after archive_timeout;
    # level 1 gets nearly all of that at low CPU cost).
    wal_compress_level: int = Field(default=1, ge=0, le=9)
    # Segments fetched ahead, in parallel, by wal-fetch (replay is otherwise bound by one
    # download at a time).
    wal_prefetch: int = Field(default=8, ge=0, le=64)
    # Other .ready segments wal-push archives in the same call, in parallel (keeps up with
    # write bursts; PostgreSQL runs one archive_command at a time).
    wal_push_parallel: int = Field(default=4, ge=1, le=32)
    wal_segment_bytes: int = 16 * 1024 * 1024
    # How archive_command archives: "resident" hands each segment to one archiver process
    # per cluster (warm S3 connections, parallel uploads of every .ready file) and exits 0
    # once that process reports the segment durable; "sync" runs one wal-push per segment.
    wal_archiver: Literal["resident", "sync"] = "resident"
    # The hand-off's wait for "durable" before it exits non-zero (the server retries).
    wal_archiver_wait_seconds: float = Field(default=60.0, gt=0, le=3600)
    # Uploads the archiver runs at once, and how long it stays resident without work.
    wal_archiver_parallel: int = Field(default=4, ge=1, le=32)
    wal_archiver_idle_seconds: float = Field(default=600.0, gt=0)
    # The WAL archiver's own least-privilege credential (IAM role ``wal_archiver``): what the
    # archive env file of a new or recovered primary carries, so the server never archives
    # with a worker's personal or short-lived keys. Unset: the host's own boto3 chain.
    wal_archiver_aws_access_key_id: SecretStr = Field(default=SecretStr(""))
    wal_archiver_aws_secret_access_key: SecretStr = Field(default=SecretStr(""))
    # Base backup compression before gpg: zstd or lz4 (stock tools, multi-threaded zstd),
    # or gzip (the earlier format). Restore reads whichever the manifest names.
    base_backup_compression: Literal["zstd", "lz4", "gzip"] = "zstd"
    base_backup_compress_level: int = Field(default=1, ge=1, le=19)
    # The clusters a recovery may act on (YAML/JSON: name -> data_dir, port, socket_dir,
    # os_user, start/stop commands, production; see wedefi_dr.postgres.cluster). The local
    # stack writes its own; on a real host the operator writes it.
    clusters_file: Path | None = None
    # Commands that stop/start the application around a recovery (none locally).
    app_stop_commands: list[str] = Field(default_factory=list)
    app_start_commands: list[str] = Field(default_factory=list)
    pitr_replay_timeout_seconds: int = 1800

    # Timeouts of the long tasks (seconds): a step that exceeds one fails the run (audit
    # row failed, a notification) and its child processes are killed. Set them well above
    # the longest good run: a backup or restore of the whole database, a base backup
    # stream, a retention table, the DR test's validation, smoke tests and benchmark.
    dump_timeout_seconds: int = Field(default=6 * 3600, gt=0)
    restore_timeout_seconds: int = Field(default=6 * 3600, gt=0)
    base_backup_timeout_seconds: int = Field(default=6 * 3600, gt=0)
    checks_timeout_seconds: int = Field(default=2 * 3600, gt=0)
    retention_timeout_seconds: int = Field(default=6 * 3600, gt=0)

    # The monthly DR test (restore, validate, smoke, benchmark, report).
    # Where local DR clusters and reports go (default: the product folder .wedefi-dr/dr-envs
    # of the clusters' OS user, .wedefi-dr/dr-reports of ours; both 0700).
    dr_env_dir: Path | None = None
    dr_report_dir: Path | None = None
    # fsync off in the local DR cluster: faster, but then the RTO flatters production.
    dr_env_fast: bool = False
    dr_docker_image: str = "postgres:15"
    # The read-only application role the smoke tests connect as.
    dr_app_role: str = "wedefi_app"
    dr_rto_objective_seconds: float = Field(default=900.0, gt=0)  # the plan's RTO: 15 min
    dr_bench_iterations: int = Field(default=7, ge=2, le=1000)
    # Flag a query whose DR p50 exceeds the primary's by more than this factor; with
    # dr_bench_fail_when_slower the flag fails the DR test instead of warning.
    dr_bench_max_ratio: float = Field(default=3.0, gt=0)
    dr_bench_fail_when_slower: bool = False
    # Drills: fail step <dr_drill_fault_step> once, while the marker file exists (the
    # step removes it), to rehearse a retry of the same flow run.
    dr_drill_fault_step: str | None = None
    dr_drill_fault_marker: Path | None = None

    # Monitoring and alerting (wedefi_dr.observability). Metrics go to the Pushgateway
    # when ``pushgateway_url`` is set and/or to ``metrics_dir`` as textfiles.
    # ``alerting``: "prometheus" (the rules in deployments/prometheus/ fire, Alertmanager
    # pages) or "direct" (the monitor flow evaluates the same alerts and pages itself).
    alerting: Literal["prometheus", "direct"] = "prometheus"
    alertmanager_url: str | None = None  # firing alerts for `wedefi-dr status`
    pagerduty_routing_key: SecretStr = Field(default=SecretStr(""))
    pagerduty_events_url: str = "https://events.pagerduty.com/v2/enqueue"
    # What the direct evaluation last paged, so a firing alert pages once and resolves once
    # (default: beside the spool).
    alert_state_file: Path | None = None
    # The alerts' thresholds (the rules file carries the same numbers; the RPO is
    # published, so WALArchiveStale follows this setting).
    rpo_seconds: float = Field(default=300.0, gt=0)  # the plan's RPO: 5 min
    backup_max_age_seconds: float = Field(default=86400.0, gt=0)
    replication_lag_warning_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    replication_lag_critical_bytes: int = Field(default=100 * 1024 * 1024, gt=0)
    dr_test_max_age_days: float = Field(default=35.0, gt=0)
    sync_max_lag_seconds: float = Field(default=26 * 3600.0, gt=0)  # daily sync + slack
    # An approver's own connection to the ops database (`wedefi-dr approve`): their login
    # role, a member of dr_approver; never a password inline (libpq reads it from the
    # approver's passfile), and never the flows' PGPASSFILE.
    approver_dsn: str = ""
    approver_passfile: Path | None = None
    # Tier 1: the streaming standby and near-zero RPO (wedefi_dr.physical.standby,
    # wedefi_dr.physical.walstream). The standby's and the WAL stream's replication slots;
    # where pg_receivewal writes (default: a folder under the spool); --synchronous (the
    # primary then waits for it when synchronous_standby_names lists 'wedefi-wal-stream');
    # how often the segment being written is re-uploaded at most.
    standby_slot: str = "wedefi_standby"
    wal_stream_slot: str = "wedefi_wal_stream"
    wal_stream_dir: Path | None = None
    wal_stream_synchronous: bool = False
    wal_stream_interval_seconds: float = Field(default=1.0, ge=0.2, le=60)
    # Base backups read from this cluster (a standby of the clusters file) instead of the
    # primary, as pgBackRest's backup-standby does; unset: from the primary.
    base_backup_source_cluster: str | None = None
    # Storage tiers and the backup lifecycle (wedefi_dr.lifecycle).
    # Which copy every read comes from: ``dr`` (or ``glacier``) makes the DR (or Glacier)
    # bucket the one every command reads and writes, for a regional disaster in which the
    # primary bucket is gone; sync and the lifecycle refuse to run in that mode.
    source_region: Literal["primary", "dr", "glacier"] = "primary"
    sync_concurrency: int = Field(default=4, ge=1, le=64)
    # Objects at least this large are copied in parts (upload_part_copy); smaller ones in
    # one server-side copy_object whose SHA-256 S3 computes and returns.
    sync_multipart_threshold_bytes: int = Field(default=1024**3, ge=5 * 1024 * 1024)
    # The sync deletes nothing and fails when the source lacks more than this share of
    # what the DR copy holds (or is empty): a wiped primary must never wipe the DR copy.
    sync_max_missing_share: float = Field(default=0.10, ge=0, le=1)
    dr_storage_class: str = "STANDARD_IA"
    # COMPLIANCE object-lock retention of every object version in the DR bucket.
    dr_object_lock_days: int = Field(default=7, ge=1)
    glacier_storage_class: Literal["GLACIER", "DEEP_ARCHIVE"] = "GLACIER"
    glacier_restore_days: int = Field(default=2, ge=1)
    glacier_restore_tier: Literal["Expedited", "Standard", "Bulk"] = "Standard"
    # Grandfather-father-son for logical backups, and the PITR window kept for physical ones.
    gfs_daily: int = Field(default=7, ge=0)
    gfs_weekly: int = Field(default=4, ge=0)
    gfs_monthly: int = Field(default=12, ge=0)
    gfs_min_verified: int = Field(default=3, ge=1)
    pitr_window_days: float = Field(default=7.0, gt=0)
    # Product records: run history, DR reports and Data Docs ("system logs, 90 days"),
    # spool files and kept DR environments ("temporary calculations, 7 days").
    records_log_days: float = Field(default=90.0, gt=0)
    records_temp_days: float = Field(default=7.0, gt=0)
    # The one credential that may delete backups: used only by the backup-retention flow.
    lifecycle_aws_access_key_id: SecretStr = Field(default=SecretStr(""))
    lifecycle_aws_secret_access_key: SecretStr = Field(default=SecretStr(""))
    sync_timeout_seconds: int = Field(default=6 * 3600, gt=0)
    lifecycle_timeout_seconds: int = Field(default=2 * 3600, gt=0)

    @model_validator(mode="after")
    def _read_from_region(self) -> Settings:
        """``source_region`` other than primary: that region's bucket becomes the bucket."""
        if self.source_region == "dr":
            self.bucket = self.dr_bucket
        elif self.source_region == "glacier":
            self.bucket = self.glacier_bucket
        return self

    def object_bucket(self, recorded: str) -> str:
        """Where to read an object a manifest records in bucket ``recorded``: there, unless
        reads come from another region's copy (the same key in that region's bucket)."""
        return recorded if self.source_region == "primary" else self.bucket

    @property
    def spool_path(self) -> Path:
        """Where verified downloads wait (encrypted) before use: ``spool_dir``, else the
        system's temporary folder. One default, so every step spools to the same disk."""
        return Path(self.spool_dir or tempfile.gettempdir())

    def require(self, *names: str) -> None:
        """Fail with one clear message naming every missing setting, before any side effect.

        Raises :class:`~wedefi_dr.errors.SettingsMissing` (a ``DRError``), so the CLI maps it
        to its own exit code instead of a traceback.
        """
        missing = []
        for name in names:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if not value:
                missing.append(f"WEDEFI_DR_{name.upper()}")
        if missing:
            raise SettingsMissing(missing)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests build their own ``Settings(...)`` instead."""
    return Settings()


def apply_prefect_run_defaults() -> None:
    """Defaults for every flow run (CLI, worker, bench, tests): persisted results (so a
    Retry skips finished steps), this project's log lines in the run's log (and, outside a
    run, only on the console), no analytics. Set before Prefect is imported; an operator's
    own environment wins."""
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "wedefi_dr")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def host_concurrency_limit(location: str) -> str:
    """The name of the Prefect global concurrency limit of one database host, from a
    ``host:port`` or ``host:port/dbname`` location: every step that loads a host (a dump,
    a base backup, a DR test's benchmark against the primary) takes a slot of it, so two
    heavy jobs never hit one host at once whichever deployments started them. Created with
    the deployments (``wedefi-dr stack deploy``; ``prefect gcl create NAME --limit 1`` on a
    real host); while it does not exist the steps run unlimited."""
    return "db-host:" + location.split("/", 1)[0]
