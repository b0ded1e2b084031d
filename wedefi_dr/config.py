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

from pydantic import Field, SecretStr
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
    # gzip level for WAL segments and base backups before gpg (a mostly idle segment is
    # zeros after archive_timeout; level 1 gets nearly all of that at low CPU cost).
    wal_compress_level: int = Field(default=1, ge=0, le=9)
    # Segments fetched ahead, in parallel, by wal-fetch (replay is otherwise bound by one
    # download at a time).
    wal_prefetch: int = Field(default=8, ge=0, le=64)
    # Other .ready segments wal-push archives in the same call, in parallel (keeps up with
    # write bursts; PostgreSQL runs one archive_command at a time).
    wal_push_parallel: int = Field(default=4, ge=1, le=32)
    wal_segment_bytes: int = 16 * 1024 * 1024
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
    # Where local DR clusters and reports go (default: under the system temp dir).
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
