"""The monthly DR test's steps as Prefect tasks: each one core call plus serialisation.

Every step persists its result and is cached per flow run, task and inputs
(``INPUTS + TASK_SOURCE + RUN_ID``): when a run fails at a late step and is retried as the
same flow run (the UI's Retry, ``prefect flow-run retry``), the completed steps return their
stored results and the restore is not done again. Inputs and results are plain data (DSNs,
names, dicts), never connections, so the cache keys hash and the results pickle
(DESIGN.md pitfalls). Findings (a failed expectation, a smoke query without rows) are
results, not exceptions: the run goes on to report, notify and tear down. Exceptions are
errors of the machinery, which a retry may fix. Each step's result carries its own
timing (``timed()``), so a cached result keeps the time of the run that did the work.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, RUN_ID, TASK_SOURCE

from tasks import timeouts
from tasks.common import host_slot, protected_database, retry_transient
from wedefi_dr.catalog import listing
from wedefi_dr.catalog.manifest import BackupManifest
from wedefi_dr.config import get_settings
from wedefi_dr.drtest import drill
from wedefi_dr.drtest import report as drreport
from wedefi_dr.drtest.environments import DREnvironment, env_dir, provider_from_settings
from wedefi_dr.drtest.restore import restore_into
from wedefi_dr.errors import UnknownBackup
from wedefi_dr.observability import drtest_metrics, metrics, notify
from wedefi_dr.postgres.primary import primary_dsn
from wedefi_dr.runbook import DRTest, timed
from wedefi_dr.storage.repository import open_store

__all__ = ["env_dir"]  # the CLI's ``dr-test teardown`` finds kept environments through it

# TASK_SOURCE is not optional: a key of INPUTS + RUN_ID alone is the same for two tasks
# given the same inputs in one run (smoke tests and benchmark both take the environment),
# and the second would silently return the first one's cached result.
PER_RUN = INPUTS + TASK_SOURCE + RUN_ID


@task(
    name=DRTest.SELECT_BACKUP,
    persist_result=True,
    cache_policy=PER_RUN,
    timeout_seconds=timeouts.SHORT,
)
def select_backup(backup_id: str, random_within_days: int | None, seed: str) -> dict[str, Any]:
    """``latest``, a given id, or a random backup of the last N days (so older backups get
    tested too); the choice is seeded by the flow run, so a retry picks the same one."""
    store = open_store(get_settings())
    if random_within_days is None:
        return listing.resolve(store, backup_id).model_dump(mode="json")
    since = datetime.now(UTC) - timedelta(days=random_within_days)
    candidates = [m for m in listing.list_backups(store) if m.finished_at >= since]
    if not candidates:
        raise UnknownBackup(f"no backup finished in the last {random_within_days} day(s)")
    return random.Random(seed).choice(candidates).model_dump(mode="json")


@task(
    name=DRTest.PROVISION,
    persist_result=True,
    cache_policy=PER_RUN,
    timeout_seconds=timeouts.MEDIUM,
)
def provision_environment(provider: str, target_dsn: str | None, name: str) -> dict[str, Any]:
    with timed() as t:
        env = provider_from_settings(get_settings(), provider, target_dsn).provision(name)
    return {"environment": env.to_dict(), "description": env.describe(), **t}


@task(
    name=DRTest.RESTORE, persist_result=True, cache_policy=PER_RUN, timeout_seconds=timeouts.RESTORE
)
def restore_backup(
    manifest: dict[str, Any], environment: dict[str, Any], operator: str, justification: str
) -> dict[str, Any]:
    """The verified restore plus ANALYZE and the app's grants: what a copy needs before it
    could take traffic, so it counts toward the RTO."""
    env = DREnvironment.from_dict(environment)
    with timed() as t:
        counts = restore_into(get_settings(), manifest["backup_id"], env, operator, justification)
    return {"status": "passed", **counts, **t}


@task(
    name=DRTest.DRILL_DAMAGE,
    persist_result=True,
    cache_policy=PER_RUN,
    timeout_seconds=timeouts.SHORT,
)
def damage_restored_copy(
    environment: dict[str, Any], manifest: dict[str, Any], damage: list[str]
) -> dict[str, Any]:
    """For drills only: change the restored copy the way a bad restore would."""
    with timed() as t:
        done = drill.damage_copy(DREnvironment.from_dict(environment).admin_dsn, manifest, damage)
    return {"damage": done, **t}


@task(
    name=DRTest.VALIDATE, persist_result=True, cache_policy=PER_RUN, timeout_seconds=timeouts.CHECKS
)
def validate_copy(
    environment: dict[str, Any], manifest: dict[str, Any], docs_dir: str
) -> dict[str, Any]:
    from wedefi_dr.drtest import integrity  # GX: seconds to import, kept out of the flow's

    drill.fault_once(get_settings(), "validate")
    env = DREnvironment.from_dict(environment)
    with timed() as t:
        result = integrity.validate_copy(
            env.owner.conninfo, manifest, Path(docs_dir), amcheck_dsn=env.admin_dsn
        )
    return {**result, **t}


@task(name=DRTest.SMOKE, persist_result=True, cache_policy=PER_RUN, timeout_seconds=timeouts.CHECKS)
def smoke_tests(environment: dict[str, Any]) -> dict[str, Any]:
    from wedefi_dr.drtest.smoke import run_smoke_tests

    drill.fault_once(get_settings(), "smoke")
    env = DREnvironment.from_dict(environment)
    with timed() as t:
        result = run_smoke_tests(env.app_dsn, env.admin_dsn, env.app_role)
    return {**result, **t}


@task(
    name=DRTest.BENCHMARK,
    persist_result=True,
    cache_policy=PER_RUN,
    timeout_seconds=timeouts.CHECKS,
)
def benchmark(environment: dict[str, Any]) -> dict[str, Any]:
    from wedefi_dr.drtest.querybench import run_benchmark

    settings = get_settings()
    drill.fault_once(settings, "benchmark")
    env = DREnvironment.from_dict(environment)
    # The benchmark's load is on the primary: it waits for the host like a backup does.
    with host_slot(protected_database()), timed() as t:
        result = run_benchmark(
            primary_dsn(settings),
            env.owner.conninfo,  # the copy's content runs as its unprivileged owner
            iterations=settings.dr_bench_iterations,
            max_ratio=settings.dr_bench_max_ratio,
        )
    return {**result, **t}


@task(name=DRTest.REPORT, persist_result=True, cache_policy=PER_RUN, timeout_seconds=timeouts.SHORT)
def write_report(
    run_name: str,
    manifest: dict[str, Any],
    environment: str,
    operator: str,
    steps: list[dict[str, Any]],
    findings: dict[str, dict[str, Any] | None],
    success: bool,
) -> dict[str, Any]:
    """``findings``: the validation's, smoke tests' and benchmark's results by step key."""
    settings = get_settings()
    drill.fault_once(settings, "report")
    context = drreport.build_context(
        run_name=run_name,
        manifest=manifest,
        environment=environment,
        operator=operator,
        steps=steps,
        validation=findings["validate"],
        smoke=findings["smoke"],
        benchmark=findings["benchmark"],
        rto_objective_seconds=settings.dr_rto_objective_seconds,
        success=success,
    )
    written = drreport.write_report(
        context,
        drreport.report_dir(settings, run_name),
        open_store(settings, bucket=settings.object_bucket(manifest["object"]["bucket"])),
    )
    create_markdown_artifact(
        key="dr-test-report", markdown=written["markdown"], description=f"DR test {run_name}"
    )
    return {**written, "rto_seconds": context["rto_seconds"], "rto_met": context["rto_met"]}


@task(
    name=DRTest.NOTIFY,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
    persist_result=True,
    cache_policy=PER_RUN,
    timeout_seconds=timeouts.SHORT,
)
def notify_result(subject: str, status: str, details: dict[str, Any]) -> str | None:
    return notify.notify(get_settings(), subject=subject, status=status, details=details)


@task(
    name=DRTest.METRICS,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
    timeout_seconds=timeouts.SHORT,
)
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
    return metrics.publish(settings, "dr_test", registry, {"database": database})


@task(
    name=DRTest.TEARDOWN, persist_result=True, cache_policy=PER_RUN, timeout_seconds=timeouts.MEDIUM
)
def teardown_environment(
    provider: str, target_dsn: str | None, environment: dict[str, Any]
) -> dict[str, Any]:
    env = DREnvironment.from_dict(environment)
    with timed() as t:
        provider_from_settings(get_settings(), provider, target_dsn).teardown(env)
    return {"status": "passed", "removed": env.describe(), **t}


def manifest_database(manifest: dict[str, Any]) -> str:
    return BackupManifest(**manifest).source.dbname
