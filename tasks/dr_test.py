"""The monthly DR test's steps as Prefect tasks.

Every step persists its result and is cached per flow run, task and inputs
(``INPUTS + TASK_SOURCE + RUN_ID``): when a run fails at a late step and is retried as the
same flow run (the UI's Retry, ``prefect flow-run retry``), the completed steps return their stored
results and the restore is not done again. Inputs and results are plain data (DSNs,
names, dicts), never connections, so the cache keys hash and the results pickle
(DESIGN.md pitfalls). Findings (a failed expectation, a smoke query without rows) are
results, not exceptions: the run goes on to report, notify and tear down. Exceptions are
errors of the machinery, which a retry may fix.
"""

from __future__ import annotations

import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, RUN_ID, TASK_SOURCE

from wedefi_dr.catalog import listing
from wedefi_dr.catalog.manifest import BackupManifest
from wedefi_dr.config import Settings, get_settings
from wedefi_dr.drtest import environments
from wedefi_dr.drtest import report as drreport
from wedefi_dr.errors import DRError, InvalidInput, UnknownBackup
from wedefi_dr.logical import restore
from wedefi_dr.observability import audit, drtest_metrics, metrics, notify
from wedefi_dr.postgres.tools import connect
from wedefi_dr.storage.s3 import ObjectStore

# TASK_SOURCE is not optional: a key of INPUTS + RUN_ID alone is the same for two tasks
# given the same inputs in one run (smoke tests and benchmark both take the environment),
# and the second would silently return the first one's cached result.
PER_RUN = INPUTS + TASK_SOURCE + RUN_ID
DAMAGE_KINDS = ("delete_wallets", "orphan_balance", "remove_price_day")


class DrillFault(DRError):
    """A fault injected on purpose (settings dr_drill_fault_*), to rehearse a retry."""


def drill_fault(step: str) -> None:
    """Fail ``step`` once: while the marker file exists, and remove it on the way."""
    s = get_settings()
    marker = s.dr_drill_fault_marker
    if s.dr_drill_fault_step == step and marker and Path(marker).exists():
        Path(marker).unlink()
        raise DrillFault(f"drill: injected fault in step {step!r} (happens once)")


def _timed(result: dict[str, Any], started: float) -> dict[str, Any]:
    finished = time.time()
    return {**result, "started": started, "finished": finished, "seconds": finished - started}


def report_dir(settings: Settings, run_name: str) -> Path:
    base = settings.dr_report_dir or Path(tempfile.gettempdir()) / "wedefi-dr-reports"
    return Path(base) / run_name


def env_dir(settings: Settings) -> Path:
    return Path(settings.dr_env_dir or Path(tempfile.gettempdir()) / "wedefi-dr-envs")


def provider_for(settings: Settings, kind: str, target_dsn: str | None):
    return environments.make_provider(
        kind,
        base_dir=env_dir(settings),
        app_role=settings.dr_app_role,
        target_dsn=target_dsn,
        docker_image=settings.dr_docker_image,
        fast=settings.dr_env_fast,
    )


@task(name="select the backup", persist_result=True, cache_policy=PER_RUN)
def select_backup(backup_id: str, random_within_days: int | None, seed: str) -> dict[str, Any]:
    """``latest``, a given id, or a random backup of the last N days (so older backups get
    tested too); the choice is seeded by the flow run, so a retry picks the same one."""
    store = ObjectStore(get_settings())
    if random_within_days is None:
        return listing.resolve(store, backup_id).model_dump(mode="json")
    since = datetime.now(UTC) - timedelta(days=random_within_days)
    candidates = [m for m in listing.list_backups(store) if m.finished_at >= since]
    if not candidates:
        raise UnknownBackup(f"no backup finished in the last {random_within_days} day(s)")
    return random.Random(seed).choice(candidates).model_dump(mode="json")


@task(
    name="audit: DR test started",
    retries=3,
    retry_delay_seconds=2,
    persist_result=True,
    cache_policy=PER_RUN,
)
def audit_dr_test_started(
    audit_id: str, backup_id: str, target: str, operator: str, justification: str
) -> str:
    return audit.recovery_started(
        get_settings().ops_dsn.get_secret_value(),
        recovery_type=drtest_metrics.AUDIT_KIND,
        backup_id=backup_id,
        target=target,
        operator=operator,
        justification=justification,
        audit_id=audit_id,
    )


@task(name="audit: DR test finished", retries=3, retry_delay_seconds=2)
def audit_dr_test_finished(audit_id: str, status: str, error: str | None = None) -> None:
    audit.recovery_finished(
        get_settings().ops_dsn.get_secret_value(), audit_id, status=status, error=error
    )


@task(name="1. provision the DR environment", persist_result=True, cache_policy=PER_RUN)
def provision_environment(provider: str, target_dsn: str | None, name: str) -> dict[str, Any]:
    started = time.time()
    settings = get_settings()
    env = provider_for(settings, provider, target_dsn).provision(name)
    return _timed({"environment": env.to_dict(), "description": env.describe()}, started)


@task(name="2. restore the backup", persist_result=True, cache_policy=PER_RUN)
def restore_backup(
    manifest: dict[str, Any], environment: dict[str, Any], operator: str, justification: str
) -> dict[str, Any]:
    """The skeleton's restore (verified download, gpg | pg_restore --clean --if-exists
    --single-transaction, exact row counts and hashes), then ANALYZE and the app's grants:
    what a copy needs before it could take traffic, so it counts toward the RTO."""
    started = time.time()
    settings = get_settings()
    env = environments.DREnvironment.from_dict(environment)
    target = env.admin
    request = restore.RestoreRequest(manifest["backup_id"], target, operator, justification)
    m = restore.validate(settings, request)
    spool = Path(settings.spool_dir or tempfile.gettempdir())
    ciphertext = restore.fetch_verified(settings, m, spool)
    try:
        restore.decrypt_and_restore(settings, m, ciphertext, target)
    finally:
        ciphertext.unlink(missing_ok=True)
    counts = restore.verify(m, target)
    with connect(env.admin_dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("ANALYZE")
    environments.grant_read_only(env.admin_dsn, env.app_role)
    return _timed({"status": "passed", **counts}, started)


@task(name="drill: damage the restored copy", persist_result=True, cache_policy=PER_RUN)
def damage_restored_copy(
    environment: dict[str, Any], manifest: dict[str, Any], damage: list[str]
) -> dict[str, Any]:
    """For drills only: change the restored copy the way a bad restore would, so the
    suites can show they catch it. Never touches anything but the DR environment."""
    env = environments.DREnvironment.from_dict(environment)
    done = []
    with connect(env.admin_dsn) as conn, conn.cursor() as cur:
        if "delete_wallets" in damage:
            cur.execute(
                'DELETE FROM "Wallet" WHERE "id" IN '
                '(SELECT "id" FROM "Wallet" ORDER BY "id" LIMIT 3)'
            )
            done.append(f"deleted {cur.rowcount} wallets (their balances cascade)")
        if "orphan_balance" in damage:
            # Triggers (and so foreign keys) off for this transaction, as a broken load would.
            cur.execute("SET LOCAL session_replication_role = replica")
            cur.execute(
                """UPDATE "TokenBalance" SET "walletId" = 'wallet-that-does-not-exist'
                   WHERE "id" = (SELECT "id" FROM "TokenBalance" ORDER BY "id" LIMIT 1)"""
            )
            done.append(f"orphaned {cur.rowcount} balance")
        if "remove_price_day" in damage:
            as_of = datetime.fromisoformat(manifest["integrity_facts"]["as_of"])
            cur.execute(
                """DELETE FROM "PriceSnapshot" WHERE "recordedAt" >= %s AND "recordedAt" < %s""",
                (as_of - timedelta(days=3), as_of - timedelta(days=2)),
            )
            done.append(f"removed the price day 3 days before the backup ({cur.rowcount} rows)")
    return {"damage": done}


@task(name="3. validate: GX suites and amcheck", persist_result=True, cache_policy=PER_RUN)
def validate_copy(
    environment: dict[str, Any], manifest: dict[str, Any], docs_dir: str
) -> dict[str, Any]:
    """The three suites with the manifest's facts as thresholds, then ``bt_index_check``.
    Returns plain dicts (a GX CheckpointResult does not pickle)."""
    from wedefi_dr.drtest import integrity

    drill_fault("validate")
    started = time.time()
    env = environments.DREnvironment.from_dict(environment)
    try:
        facts = integrity.require_facts(manifest)
    except integrity.MissingIntegrityFacts as exc:
        result = {"success": False, "suites": {}, "reason": str(exc)}
    else:
        result = integrity.validate_suites(env.admin_dsn, facts, Path(docs_dir))
    result["amcheck"] = integrity.amcheck(env.admin_dsn)
    result["success"] = bool(result["success"] and result["amcheck"]["success"])
    return _timed(result, started)


@task(name="4. smoke tests as the application role", persist_result=True, cache_policy=PER_RUN)
def smoke_tests(environment: dict[str, Any]) -> dict[str, Any]:
    from wedefi_dr.drtest.smoke import run_smoke_tests

    drill_fault("smoke")
    started = time.time()
    env = environments.DREnvironment.from_dict(environment)
    return _timed(run_smoke_tests(env.app_dsn, env.admin_dsn, env.app_role), started)


@task(name="5. benchmark: primary vs DR copy", persist_result=True, cache_policy=PER_RUN)
def benchmark(environment: dict[str, Any]) -> dict[str, Any]:
    from wedefi_dr.drtest.querybench import run_benchmark

    drill_fault("benchmark")
    started = time.time()
    settings = get_settings()
    env = environments.DREnvironment.from_dict(environment)
    result = run_benchmark(
        settings.primary_dsn.get_secret_value(),
        env.admin_dsn,
        iterations=settings.dr_bench_iterations,
        max_ratio=settings.dr_bench_max_ratio,
    )
    return _timed(result, started)


@task(name="6. report", persist_result=True, cache_policy=PER_RUN)
def write_report(
    run_name: str,
    manifest: dict[str, Any],
    environment: str,
    operator: str,
    steps: list[dict[str, Any]],
    validation: dict[str, Any] | None,
    smoke: dict[str, Any] | None,
    bench: dict[str, Any] | None,
    success: bool,
) -> dict[str, Any]:
    drill_fault("report")
    settings = get_settings()
    context = drreport.build_context(
        run_name=run_name,
        manifest=manifest,
        environment=environment,
        operator=operator,
        steps=steps,
        validation=validation,
        smoke=smoke,
        benchmark=bench,
        rto_objective_seconds=settings.dr_rto_objective_seconds,
        success=success,
    )
    written = drreport.write_report(
        context,
        report_dir(settings, run_name),
        ObjectStore(settings, bucket=manifest["object"]["bucket"]),
    )
    create_markdown_artifact(
        key="dr-test-report", markdown=written["markdown"], description=f"DR test {run_name}"
    )
    return {**written, "rto_seconds": context["rto_seconds"], "rto_met": context["rto_met"]}


@task(name="7. notify", retries=2, retry_delay_seconds=2, persist_result=True, cache_policy=PER_RUN)
def notify_result(subject: str, status: str, details: dict[str, Any]) -> str | None:
    return notify.notify(get_settings(), subject=subject, status=status, details=details)


@task(name="8. metrics", retries=2, retry_delay_seconds=2)
def publish_metrics(
    database: str, success: bool, duration_seconds: float, rto_seconds: float | None
) -> list[str]:
    settings = get_settings()
    rate, _ = drtest_metrics.success_rate(settings.ops_dsn.get_secret_value())
    registry = drtest_metrics.dr_test_registry(
        database=database,
        success=success,
        rate=rate,
        duration_seconds=duration_seconds,
        rto_seconds=rto_seconds,
        rto_objective_seconds=settings.dr_rto_objective_seconds,
    )
    return metrics.publish(settings, "dr_test", registry)


@task(name="9. teardown of the DR environment", persist_result=True, cache_policy=PER_RUN)
def teardown_environment(
    provider: str, target_dsn: str | None, environment: dict[str, Any]
) -> dict:
    started = time.time()
    env = environments.DREnvironment.from_dict(environment)
    provider_for(get_settings(), provider, target_dsn).teardown(env)
    return _timed({"status": "passed", "removed": env.describe()}, started)


def check_damage(damage: list[str] | None) -> list[str]:
    unknown = sorted(set(damage or []) - set(DAMAGE_KINDS))
    if unknown:
        raise InvalidInput(f"unknown drill damage {unknown}: choose from {DAMAGE_KINDS}")
    return list(damage or [])


def manifest_database(manifest: dict[str, Any]) -> str:
    return BackupManifest(**manifest).source.dbname
