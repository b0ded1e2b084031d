"""Steps shared by the flows: audit rows, metrics, notifications, summaries, run-stable ids."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from subprocess import TimeoutExpired
from typing import Any

import psycopg2
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.runtime import flow_run

from tasks import timeouts
from wedefi_dr.catalog.manifest import new_backup_id
from wedefi_dr.config import get_settings, host_concurrency_limit
from wedefi_dr.errors import (
    IntegrityError,
    InvalidInput,
    OperationBusy,
    PreflightFailed,
    SettingsMissing,
    SyncRefused,
    ToolNotFound,
)
from wedefi_dr.observability import audit, health, metrics, notify, records
from wedefi_dr.observability.audit import AuditRefused
from wedefi_dr.postgres import locks
from wedefi_dr.postgres.cluster import ClusterFenced
from wedefi_dr.postgres.primary import primary_target
from wedefi_dr.retention.batches import ArchiveConflict
from wedefi_dr.runbook import Shared

TEMPLATES = Path(__file__).parent / "templates"


# Failures another attempt cannot heal: bad input or settings, a missing tool, data that is
# damaged or not ours, a refusal by the audit trail, a lock another run holds, a fenced
# cluster, a guard that refused. Retrying them only delays the page by the retry delays.
NEVER_HEAL: tuple[type[BaseException], ...] = (
    InvalidInput,
    SettingsMissing,
    ToolNotFound,
    IntegrityError,
    AuditRefused,
    OperationBusy,
    ClusterFenced,
    SyncRefused,
    ArchiveConflict,
)
# libpq's words for a connection refused for good (the server answered): a missing database
# or role, a wrong or missing password, no pg_hba.conf entry.
_REFUSED_FOR_GOOD = re.compile(
    r'(database|role) "[^"]*" does not exist|password authentication failed'
    r"|no password supplied|no pg_hba\.conf entry"
)


def can_heal(exc: BaseException) -> bool:
    """Whether another attempt may succeed where this one failed with ``exc``.

    A preflight refusal heals only when a connection or a probe timed out or dropped
    (a server restarting); a version, a cipher name or a bucket refusal stays the same.
    """
    if isinstance(exc, NEVER_HEAL) or _REFUSED_FOR_GOOD.search(str(exc)):
        return False
    if isinstance(exc, PreflightFailed):
        return isinstance(exc.__cause__, OSError | psycopg2.OperationalError | TimeoutExpired)
    return True


def retry_transient(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's signature
    """The ``retry_condition_fn`` of every task with retries: retry what may heal (a
    dropped connection, a timeout, a throttled request), never what :func:`can_heal`
    says cannot."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the failure being judged
        return can_heal(exc)
    return True


def attempt_scoped_uuid(purpose: str) -> str:
    """A uuid for this attempt of this flow run: audit rows are final once written, so a
    retried run records its new attempt in a row of its own instead of rewriting history."""
    return run_scoped_uuid(f"{purpose}#{flow_run.run_count or 1}")


def run_created_at() -> datetime:
    """When this flow run was created. A Retry (UI or ``prefect flow-run retry``) moves the
    scheduled start time, not this, so ids built on it stay the same across retries.

    Taken from the run the engine already holds (it read or created it on starting), so a
    flow pays no client and no API round trip for it; asked of the API only where no flow
    run context is at hand."""
    context = FlowRunContext.get()
    if context is not None and context.flow_run is not None and context.flow_run.created:
        return context.flow_run.created
    run_id = flow_run.get_id()
    if not run_id:
        return datetime.now(UTC)
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).created


def backup_id_for_this_run(purpose: str) -> str:
    """``20261124T020000Z-3fa9c1``, the same on every retry of this flow run, so the audit
    row, the object keys and the cached steps all name one backup."""
    suffix = run_scoped_uuid(purpose).replace("-", "")[:6]
    return new_backup_id(run_created_at(), suffix=suffix)


def run_scoped_uuid(purpose: str) -> str:
    """A uuid fixed for this flow run, so a retried run reuses its audit row and ids."""
    run_id = flow_run.get_id() or str(uuid.uuid4())
    return str(uuid.uuid5(uuid.UUID(run_id), purpose))


def secrets_to_scrub() -> tuple[str, ...]:
    s = get_settings()
    return (
        s.gpg_passphrase.get_secret_value(),
        s.primary_dsn.get_secret_value(),
        s.ops_dsn.get_secret_value(),
    )


def scrub(message: str) -> str:
    return audit.scrub(message, secrets_to_scrub())


@task(
    name=Shared.AUDIT_BACKUP_STARTED,
    retries=3,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
    timeout_seconds=timeouts.SHORT,
)
def audit_backup_started(
    audit_id: str, backup_id: str, operator: str, backup_type: str = "logical"
) -> str:
    return audit.backup_started(
        get_settings().ops_dsn.get_secret_value(),
        audit_id=audit_id,
        backup_type=backup_type,
        backup_id=backup_id,
        operator=operator,
    )


@task(
    name=Shared.AUDIT_BACKUP_FINISHED,
    retries=3,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
    timeout_seconds=timeouts.SHORT,
)
def audit_backup_finished(
    audit_id: str,
    status: str,
    size_bytes: int | None = None,
    checksum: str | None = None,
    error: str | None = None,
) -> None:
    audit.backup_finished(
        get_settings().ops_dsn.get_secret_value(),
        audit_id,
        status=status,
        size_bytes=size_bytes,
        checksum=checksum,
        error=error,
    )


@task(
    name=Shared.PUBLISH_BACKUP_METRICS,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
    timeout_seconds=timeouts.SHORT,
)
def publish_backup_metrics(
    kind: str, database: str, duration_seconds: float | None, size_bytes: int | None
) -> list[str]:
    """The metrics of one kind of backup (``logical``, ``base``) of one database, pushed as
    a group of its own (job, kind, database): a base backup never replaces the logical
    backup's series. Totals come from the audit log, so counters survive any restart."""
    settings = get_settings()
    totals = records.backup_totals(settings.ops_dsn.get_secret_value(), kind)
    registry = metrics.backup_registry(
        kind=kind,
        database=database,
        totals=totals,
        duration_seconds=duration_seconds,
        size_bytes=size_bytes,
    )
    return metrics.publish(
        settings,
        "backup",
        registry,
        {"kind": kind, "database": database},
        textfile=f"{kind}_backup",
    )


def metrics_database() -> str:
    """The protected database's name as the metrics label it (from the DSN: a backup that
    fails before reaching the server is labelled like the ones that succeed)."""
    return health.database_label(get_settings())


@task(
    name=Shared.NOTIFY,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
    timeout_seconds=timeouts.SHORT,
)
def send_notification(subject: str, status: str, details: dict) -> str | None:
    return notify.notify(get_settings(), subject=subject, status=status, details=details)


@task(
    name=Shared.AUDIT_RECOVERY_STARTED,
    retries=3,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
    timeout_seconds=timeouts.SHORT,
)
def audit_recovery_started(
    *,
    audit_id: str,
    recovery_type: str,
    backup_id: str | None,
    target: str,
    operator: str,
    justification: str,
    target_time: datetime | None = None,
) -> str:
    """Opens the row of a restore, a DR test or a PITR (``recovery_type``); idempotent by
    ``audit_id``, so a retried step does not open a second row for the same attempt."""
    return audit.recovery_started(
        get_settings().ops_dsn.get_secret_value(),
        audit_id=audit_id,
        recovery_type=recovery_type,
        backup_id=backup_id,
        target=target,
        target_time=target_time,
        operator=operator,
        justification=justification,
    )


@task(
    name=Shared.AUDIT_RECOVERY_FINISHED,
    retries=3,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
    timeout_seconds=timeouts.SHORT,
)
def audit_recovery_finished(audit_id: str, status: str, error: str | None = None) -> None:
    """Closes the row a restore, a PITR or a DR test opened (by run-stable ``audit_id``)."""
    audit.recovery_finished(
        get_settings().ops_dsn.get_secret_value(), audit_id, status=status, error=error
    )


@contextmanager
def failure_reported(
    subject: str,
    details: dict,
    close_audit: Callable[[str], object],
    also: Callable[[], object] | None = None,
) -> Iterator[None]:
    """The one failure path of every runbook: the error is scrubbed of secrets, the audit row
    is closed ``failed`` (``close_audit(error)``), ``also`` runs (metrics), a notification
    ``<subject> FAILED`` goes out, and the exception is raised again for Prefect to record."""
    try:
        yield
    except Exception as exc:
        error = scrub(f"{type(exc).__name__}: {exc}")
        try:
            close_audit(error)
        finally:
            try:
                if also is not None:
                    also()
            finally:
                send_notification(f"{subject} FAILED", "failure", {**details, "error": error})
        raise


@contextmanager
def run_lock(operation: str, target: str) -> Iterator[None]:
    """This run's lock on ``operation`` of ``target`` in the ops database, for the ``with``
    block; a second run (CLI, UI or schedule alike) gets :class:`OperationBusy` at once.

    Entered inside :func:`failure_reported`, so a refused run is on the record: its audit
    row says failed with the holder's name, and the notification goes out (a scheduled
    backup that did not run is news)."""
    settings = get_settings()
    settings.require("ops_dsn")
    with locks.operation_lock(settings.ops_dsn.get_secret_value(), operation, target):
        yield


@contextmanager
def host_slot(location: str) -> Iterator[None]:
    """One slot of the global concurrency limit of ``location``'s database host for the
    ``with`` block: a step that loads a host waits here while another heavy step (another
    deployment, the CLI, another worker) holds the host. No limit of that name on the
    server (a throwaway API, a host without one): the step runs unlimited."""
    from prefect.concurrency.sync import concurrency

    with concurrency(host_concurrency_limit(location), occupy=1):
        yield


def protected_database() -> str:
    """``host:port/dbname`` of the primary now (followed through a failover): what the
    logical backup locks, so runs before and after a failover lock the server they load."""
    return primary_target(get_settings()).location


def protected_cluster() -> str:
    """``host:port`` of the primary's cluster: what a base backup locks (one per cluster,
    whichever database its connection names)."""
    return protected_database().rsplit("/", 1)[0]


def publish_summary(key: str, template: str, description: str, **context: Any) -> None:
    """The run's markdown artifact in the Prefect UI, rendered from ``templates/<template>``
    so the page's layout lives in one file per runbook, not in f-strings in the flow."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    markdown = env.get_template(template).render(**context)
    create_markdown_artifact(key=key, markdown=markdown, description=description)
