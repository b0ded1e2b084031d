"""Runbook: the monthly DR test (the plan's restore → smoke → benchmark → report → notify).

A *finding* (an expectation fails, a smoke query is empty) fails the DR test: the run
still reports, notifies, publishes the metric and tears the environment down, then ends
Failed. An *error* (a step raised: a lost connection, a full disk, a drill fault) also
reports and notifies, but keeps the DR environment, because its restored copy is what a
Retry of this flow run continues from: completed steps are cached per run, so the retry
starts at the failed step and tears down at the end. ``keep_environment`` keeps it always
(for investigation; remove it with ``wedefi-dr dr-test teardown``).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from tasks import dr_test as steps
from tasks.common import (
    attempt_scoped_uuid,
    audit_recovery_finished,
    audit_recovery_started,
    failure_reported,
    run_created_at,
    run_lock,
    run_scoped_uuid,
    scrub,
)
from wedefi_dr.config import get_settings
from wedefi_dr.drtest.record import DRTestFailed, StepRecord
from wedefi_dr.drtest.report import report_dir
from wedefi_dr.drtest.request import check_request
from wedefi_dr.observability.drtest_metrics import AUDIT_KIND
from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.runbook import DRTest

__all__ = ["DRTestFailed", "dr_test"]


def run_name_for_this_run() -> str:
    """``dr-<created>-<id>``: the same on every retry of this flow run (a Retry moves the
    scheduled start time, not the creation time), so the cached steps line up."""
    return f"dr-{run_created_at():%Y%m%dT%H%M%SZ}-{run_scoped_uuid('dr-test')[:6]}"


def dr_target_location(target_dsn: str | None) -> str | None:
    """The DSN provider's database as ``host:port/dbname``: one DR test per database."""
    return target_dsn and ConnTarget.parse(target_dsn, allow_password=False).location


@flow(name="dr-test", log_prints=True)
def dr_test(
    backup_id: str = "latest",
    random_within_days: int | None = None,
    provider: str = "local",
    target_dsn: str | None = None,
    operator: str = "scheduler",
    justification: str = "monthly DR test",
    keep_environment: bool = False,
    drill_damage: list[str] | None = None,
) -> dict[str, Any]:
    """Prove that a backup restores into a working database within the RTO.

    ``provider``: ``local`` (fresh cluster), ``dsn`` (``target_dsn``, no password) or
    ``docker``. ``drill_damage`` (drills only) damages the restored copy before validation:
    ``delete_wallets``, ``orphan_balance``, ``remove_price_day``.

    Args:
        backup_id: The backup to test: an id, or ``latest``.
        random_within_days: Instead, a random backup that finished in the last N days.
        provider: Where to restore: ``local`` (fresh cluster), ``dsn`` or ``docker``.
        target_dsn: With provider ``dsn``: the database to restore into (no password).
        operator: Who runs the test, recorded in the audit row and the report.
        justification: Why, recorded in the audit row.
        keep_environment: Keep the restored DR environment afterwards, for investigation.
        drill_damage: Drills only: damage to do to the restored copy before validation.
    """
    settings = get_settings()
    damage = check_request(
        settings,
        backup_id=backup_id,
        random_within_days=random_within_days,
        provider=provider,
        target_dsn=target_dsn,
        operator=operator,
        justification=justification,
        drill_damage=drill_damage,
    )
    run_name = run_name_for_this_run()
    manifest = steps.select_backup(backup_id, random_within_days, run_name)
    audit_id = audit_recovery_started(
        audit_id=attempt_scoped_uuid("dr-test-audit"),
        recovery_type=AUDIT_KIND,
        backup_id=manifest["backup_id"],
        target=f"{provider}:{run_name}",
        operator=operator,
        justification=justification,
    )
    rec = StepRecord(fail_when_slower=settings.dr_bench_fail_when_slower, scrub=scrub)
    with (
        failure_reported(
            f"WeDefiDaily DR test {run_name}",
            {"run": run_name, "backup_id": manifest["backup_id"]},
            close_audit=lambda error: audit_recovery_finished(audit_id, "failed", error=error),
        ),
        run_lock("dr-test", f"{provider}:{dr_target_location(target_dsn) or run_name}"),
    ):
        # 1. provision → 2. restore → (drill) → 3. validate → 4. smoke → 5. benchmark
        env = rec.run(DRTest.PROVISION, steps.provision_environment, provider, target_dsn, run_name)
        environment = env and env["environment"]
        rec.run(
            DRTest.RESTORE, steps.restore_backup, manifest, environment, operator, justification
        )
        if damage:
            rec.run(DRTest.DRILL_DAMAGE, steps.damage_restored_copy, environment, manifest, damage)
        docs = str(report_dir(settings, run_name) / "data_docs")
        rec.run(DRTest.VALIDATE, steps.validate_copy, environment, manifest, docs)
        rec.run(DRTest.SMOKE, steps.smoke_tests, environment)
        rec.run(DRTest.BENCHMARK, steps.benchmark, environment)
        # 6. report
        where = env["description"] if env else f"{provider} DR environment"
        report = steps.write_report(
            run_name, manifest, where, operator, rec.timeline(), rec.findings(), rec.success
        )
    keep = env is not None and (keep_environment or rec.error is not None)
    details = rec.details(
        run_name=run_name,
        backup_id=manifest["backup_id"],
        report=report,
        rto_objective_seconds=settings.dr_rto_objective_seconds,
        environment_kept=keep,
    )
    verdict = "PASSED" if rec.success else "FAILED"
    # 7. notify → audit → 8. metrics → 9. teardown
    notice = "success" if rec.success else "failure"
    steps.notify_result(f"WeDefiDaily DR test {run_name} {verdict}", notice, details)
    audit_recovery_finished(audit_id, "success" if rec.success else "failed", rec.audit_error())
    database = steps.manifest_database(manifest)
    steps.publish_metrics(database, rec.success, rec.elapsed(), report["rto_seconds"])
    if keep:
        why = "asked to" if keep_environment else f"{rec.errored} errored; Retry this run"
        get_run_logger().warning("DR environment kept (%s): %s", why, env["description"])
    elif env:
        steps.teardown_environment(provider, target_dsn, environment)
    print(f"DR test {run_name} {verdict}: report {report['s3_html'] or report['html']}")
    if not rec.success:
        raise DRTestFailed(
            f"DR test {run_name} of backup {manifest['backup_id']} failed: {rec.summary()}. "
            f"Report: {report['html']}"
        )
    return {
        **details,
        "success": True,
        "report_html": report["html"],
        "steps": rec.timeline(),
        "validation_seconds": rec.validation_split(),
    }
