"""The retention runbook's steps as Prefect tasks.

Tasks take the policy path, the run's ``as_of`` moment and table names (never
connections or plans), so their inputs hash and their results persist; each re-binds the
policy to the live schema, which costs a few catalog queries and means a step retried
after a schema change is checked again.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import INPUTS, NO_CACHE, RUN_ID, TASK_SOURCE

from tasks import timeouts
from tasks.common import retry_transient, scrub
from wedefi_dr.config import get_settings
from wedefi_dr.observability import audit, metrics
from wedefi_dr.postgres.primary import primary_dsn
from wedefi_dr.retention import batches, guard
from wedefi_dr.retention import policy as retention
from wedefi_dr.runbook import Retention
from wedefi_dr.storage.repository import open_store

PROGRESS_EVERY_SECONDS = 5.0


def _primary() -> str:
    return primary_dsn(get_settings())


@task(
    name=Retention.FIX_MOMENT,
    persist_result=True,
    cache_policy=INPUTS + TASK_SOURCE + RUN_ID,
    timeout_seconds=timeouts.SHORT,
)
def fix_moment(as_of: datetime | None) -> datetime:
    """``as_of``, or now, in the schema's frame; a future ``as_of`` is refused here, before
    anything reads the database. Cached per flow run: a Retry of the run reuses the first
    attempt's moment, so its cutoffs (and its dry-run counts) stay put."""
    return guard.check_moment(as_of)


@task(name=Retention.VALIDATE_POLICY, cache_policy=NO_CACHE, timeout_seconds=timeouts.SHORT)
def validate_policy(policy_path: str, as_of: datetime) -> list[dict[str, Any]]:
    """Every table, column and foreign-key consequence checked; refuses before any change."""
    plans = retention.plans_for(_primary(), policy_path, as_of)
    logger = get_run_logger()
    for p in plans:
        extra = f", cascades to {', '.join(p.cascaded_tables)}" if p.cascaded_tables else ""
        logger.info(
            "%s: %s rows with %s before %s%s",
            p.table,
            p.rule.action,
            p.rule.timestamp,
            p.cutoff,
            extra,
        )
    return [
        {"table": p.table, "action": p.rule.action, "cutoff": p.cutoff, "target": p.rule.target()}
        for p in plans
    ]


@task(name=Retention.PREVIEW, cache_policy=NO_CACHE, timeout_seconds=timeouts.CHECKS)
def preview(policy_path: str, as_of: datetime, artifact_key: str | None) -> list[dict[str, Any]]:
    """Counts per table (and per cascade), in policy order; published as a table artifact."""
    rows = [p.as_dict() for p in batches.dry_run(_primary(), policy_path, as_of)]
    if artifact_key:
        create_table_artifact(
            key=artifact_key,
            table=[
                {
                    "table": r["table"],
                    "action": r["action"],
                    "older than (UTC)": r["cutoff"].isoformat(sep=" ", timespec="seconds"),
                    "rows": r["rows"],
                    "by cascade": ", ".join(f"{t}: {n}" for t, n in r["cascaded"].items()) or "-",
                    "into": r["target"] or "-",
                }
                for r in rows
            ],
            description=f"retention preview as of {as_of:%Y-%m-%d %H:%M:%S} UTC "
            "(rows that would be deleted, archived or summarized)",
        )
    return rows


@task(name=Retention.GUARD, cache_policy=NO_CACHE, timeout_seconds=timeouts.CHECKS)
def guard_run(
    policy_path: str, as_of: datetime, preview: list[dict[str, Any]], allow_mass_deletion: bool
) -> dict[str, Any]:
    """Before the first batch: no mass deletion unless the request allows it, and nothing
    removed without a recent verified backup. Not cached: a Retry checks again."""
    logger = get_run_logger()
    settings = get_settings()
    dsn = _primary()
    items = [batches.TablePreview(**row) for row in preview]
    removals = guard.removals(items)
    if not any(removals.values()):
        return {"mass_deletion": [], "backup": None}
    plans = retention.plans_for(dsn, policy_path, as_of)
    problems = guard.mass_deletions(plans, items, guard.table_sizes(dsn, removals))
    if not allow_mass_deletion:
        guard.refuse_mass_deletion(problems)
    for problem in problems:
        logger.warning("mass deletion allowed by the request: %s", problem)
    backup = guard.recent_backup(
        open_store(settings),
        retention.database_of(dsn),
        settings.retention_requires_backup_within_hours,
    )
    logger.info(
        "verified backup %s finished %.1f h ago: what this run removes can be restored",
        backup.backup_id,
        backup.age_hours,
    )
    return {"mass_deletion": problems, "backup": backup.backup_id}


@task(
    name=Retention.CREATE_TABLES,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
    timeout_seconds=timeouts.SHORT,
)
def create_targets(policy_path: str, as_of: datetime) -> list[str]:
    dsn = _primary()
    created = batches.ensure_targets(dsn, retention.plans_for(dsn, policy_path, as_of))
    if created:
        get_run_logger().info("created %s", ", ".join(created))
    return created


def _finish_audit(
    ops: str, audit_id: str, result: batches.TableResult, status: str, error: str | None = None
) -> None:
    """The table's audit row, final with what was done (the batches done stay done)."""
    audit.retention_finished(
        ops,
        audit_id,
        status=status,
        removed=result.removed,
        archived=result.archived,
        summarized=result.summarized,
        cascaded=result.cascaded,
        batches=result.batches,
        error=error,
    )


@task(
    name=Retention.APPLY,
    task_run_name=Retention.APPLY + ": {table}",
    retries=1,
    retry_delay_seconds=30,
    # A conflict in the archive or a policy that no longer fits gives the same answer on
    # every attempt: the table fails at once instead of after the delay.
    retry_condition_fn=retry_transient,
    timeout_seconds=timeouts.RETENTION,
)
def apply_table(
    policy_path: str, as_of: datetime, table: str, expected: int, run_id: str, operator: str
) -> dict[str, Any]:
    """One table, batch by batch, with its audit row. Safe to retry: done batches stay done."""
    logger = get_run_logger()
    settings = get_settings()
    dsn = _primary()
    plan = next(p for p in retention.plans_for(dsn, policy_path, as_of) if p.table == table)
    ops = settings.ops_dsn.get_secret_value()
    audit_id = audit.retention_started(
        ops,
        run_id=run_id,
        database=retention.database_of(dsn),
        table=table,
        action=plan.rule.action,
        cutoff=plan.cutoff,
        operator=operator,
        audit_id=str(uuid.uuid4()),
    )
    result = batches.new_result(plan)
    last_logged = [0.0]

    def progress(r: batches.TableResult, final: bool = False) -> None:
        """A line per batch would flood a big table's log: the first, then every few s."""
        if not final and r.seconds - last_logged[0] < PROGRESS_EVERY_SECONDS:
            return
        last_logged[0] = r.seconds
        cascaded = sum(r.cascaded.values())
        logger.info(
            "%s: %s%d batches, %d of %d rows %s (%.0f%%)%s, %.1f s",
            table,
            "done, " if final else "",
            r.batches,
            r.removed,
            expected,
            {"delete": "deleted", "archive": "archived", "summarize": "summarized"}[r.action],
            100.0 * r.removed / expected if expected else 100.0,
            f", {cascaded} more by cascade" if cascaded else "",
            r.seconds,
        )

    try:
        batches.run_table(
            dsn,
            plan,
            result,
            pause_seconds=settings.retention_batch_pause_seconds,
            progress=progress,
        )
    except Exception as exc:
        _finish_audit(ops, audit_id, result, "failed", scrub(f"{type(exc).__name__}: {exc}"))
        raise
    progress(result, final=True)
    _finish_audit(ops, audit_id, result, "success")
    if result.removed != expected:
        logger.warning(
            "%s: %d rows removed where the preview counted %d (rows changed during the run)",
            table,
            result.removed,
            expected,
        )
    return result.as_dict()


@task(
    name=Retention.PUBLISH_METRICS,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
    timeout_seconds=timeouts.SHORT,
)
def publish_metrics(results: list[dict[str, Any]]) -> list[str]:
    settings = get_settings()
    database = retention.database_of(_primary())
    totals = audit.retention_totals(settings.ops_dsn.get_secret_value(), database)
    registry = batches.retention_registry(database=database, results=results, totals=totals)
    return metrics.publish(settings, "retention", registry)
