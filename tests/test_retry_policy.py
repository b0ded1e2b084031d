"""Retries heal what may heal: a failure another attempt cannot change fails at once.

The product's own tasks run in a real flow against the session's Prefect API, and the
task run's ``run_count`` is read back from that API: 1 for a refusal (the audit trail's,
a preflight naming a missing database), every attempt for a push to a gateway that is down.
"""

from __future__ import annotations

import importlib
import pkgutil
import uuid

import psycopg2
import pytest
from prefect import Task, flow
from prefect.client.orchestration import get_client

import tasks
from tasks import backup as backup_steps
from tasks import common
from wedefi_dr.config import get_settings
from wedefi_dr.errors import InvalidInput, PreflightFailed, ServerUnreachable
from wedefi_dr.observability.audit import AuditRefused
from wedefi_dr.postgres.cluster import free_port
from wedefi_dr.postgres.conninfo import with_dbname


@flow
def _attempts(step: str) -> tuple[str, str]:
    """Runs one product task whose failure is the point; returns its task run id and the
    name of the exception it ended with."""
    if step == "finish-unknown-audit-row":
        state = common.audit_recovery_finished(str(uuid.uuid4()), "success", return_state=True)
    elif step == "preflight":
        state = backup_steps.preflight(return_state=True)
    else:
        state = common.publish_backup_metrics("logical", "wedefi", 1.0, 1, return_state=True)
    try:
        state.result()
        error = "none"
    except Exception as exc:  # noqa: BLE001 - the failure is what the test reads
        error = type(exc).__name__
    return str(state.state_details.task_run_id), error


def _run_count(task_run_id: str) -> int:
    with get_client(sync_client=True) as client:
        return client.read_task_run(uuid.UUID(task_run_id)).run_count


def test_a_refusal_by_the_audit_trail_is_tried_once(prefect_api) -> None:
    run_id, error = _attempts("finish-unknown-audit-row")
    assert error == AuditRefused.__name__
    assert _run_count(run_id) == 1


def test_a_preflight_naming_a_missing_database_is_tried_once(prefect_api, env_override) -> None:
    dsn = get_settings().primary_dsn.get_secret_value()
    env_override(WEDEFI_DR_PRIMARY_DSN=with_dbname(dsn, f"missing_{uuid.uuid4().hex[:8]}"))
    run_id, error = _attempts("preflight")
    assert error == PreflightFailed.__name__
    assert _run_count(run_id) == 1


def test_a_push_to_a_gateway_that_is_down_is_retried(prefect_api, env_override) -> None:
    env_override(WEDEFI_DR_PUSHGATEWAY_URL=f"http://127.0.0.1:{free_port()}")
    run_id, error = _attempts("push")
    assert error != "none"
    assert _run_count(run_id) == 1 + common.publish_backup_metrics.retries


def _caused_by(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("exc", "heals"),
    [
        (InvalidInput("bad"), False),
        (AuditRefused("audit trail refused: not yours"), False),
        (ServerUnreachable('cannot connect to db: FATAL: database "gone" does not exist'), False),
        (ServerUnreachable("cannot connect to db: password authentication failed"), False),
        (ServerUnreachable("cannot connect to db: Connection refused"), True),
        (PreflightFailed("gpg cannot encrypt with cipher 'AES257'"), False),
        (
            _caused_by(
                PreflightFailed("cannot connect to the primary: Connection refused"),
                psycopg2.OperationalError("Connection refused"),
            ),
            True,
        ),
        (TimeoutError("step timed out"), True),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_what_heals(exc: BaseException, heals: bool) -> None:
    assert common.can_heal(exc) is heals


def test_every_task_has_a_timeout_and_retries_only_what_heals() -> None:
    """Nothing hangs silently, and no step retries with its own rule: each task of the
    ``tasks`` package has a timeout, and each with retries uses :func:`retry_transient`."""
    found = {}
    for module in pkgutil.iter_modules(tasks.__path__):
        for attr, value in vars(importlib.import_module(f"tasks.{module.name}")).items():
            if isinstance(value, Task) and value.fn.__module__ == f"tasks.{module.name}":
                found[f"tasks.{module.name}.{attr}"] = value
    assert len(found) > 40, "the check can fail: the tasks were found"
    assert not [name for name, t in found.items() if not t.timeout_seconds]
    assert not [
        name
        for name, t in found.items()
        if t.retries and t.retry_condition_fn is not common.retry_transient
    ]
