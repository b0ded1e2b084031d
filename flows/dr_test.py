"""Runbook: the monthly DR test (the plan's restore → smoke → benchmark → report → notify).

1. provision the DR environment → 2. restore the backup → 3. validate (GX suites, amcheck)
→ 4. smoke tests as the app role → 5. benchmark primary vs DR → 6. report → 7. notify →
8. metrics → 9. teardown.

A *finding* (an expectation fails, a smoke query is empty) fails the DR test: the run
still reports, notifies, publishes the metric and tears the environment down, then ends
Failed. An *error* (a step raised: a lost connection, a full disk, a drill fault) also
reports and notifies, but keeps the DR environment, because its restored copy is what a
Retry of this flow run continues from: completed steps are cached per run, so the retry
starts at the failed step and tears down at the end. ``keep_environment`` keeps it always
(for investigation; remove it with ``wedefi-dr dr-test teardown``).
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from tasks import dr_test as steps
from tasks.common import attempt_scoped_uuid, run_created_at, run_scoped_uuid, scrub
from wedefi_dr.config import get_settings
from wedefi_dr.errors import InvalidInput
from wedefi_dr.postgres.conninfo import refuse_password_in_dsn


class DRTestFailed(Exception):
    """The DR test ran and found the backup (or its copy) not fit for a failover."""


def run_name_for_this_run() -> str:
    """``dr-<created>-<id>``: the same on every retry of this flow run (a Retry moves the
    scheduled start time, not the creation time), so the cached steps line up."""
    stamp = f"{run_created_at():%Y%m%dT%H%M%SZ}"
    return f"dr-{stamp}-{run_scoped_uuid('dr-test')[:6]}"


def _step(key: str, name: str, result: dict[str, Any] | None, status: str, reason: str = ""):
    result = result or {}
    return {
        "key": key,
        "name": name,
        "status": status,
        "reason": reason,
        "started": result.get("started"),
        "finished": result.get("finished"),
        "seconds": result.get("seconds"),
    }


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
    """
    logger = get_run_logger()
    settings = get_settings()
    # Bad input: refused before anything is created.
    if target_dsn:
        refuse_password_in_dsn(target_dsn)
    damage = steps.check_damage(drill_damage)
    steps.provider_for(settings, provider, target_dsn)
    if not operator.strip() or not justification.strip():
        raise ValueError("operator and justification are required (recovery audit log)")

    if random_within_days is not None and (random_within_days < 1 or backup_id != "latest"):
        raise InvalidInput(
            "--random-within-days takes a positive number of days, without a backup id"
        )
    run_name = run_name_for_this_run()
    attempt = flow_run.run_count or 1
    report_dir = steps.report_dir(settings, run_name)
    manifest = steps.select_backup(backup_id, random_within_days, run_name)
    resolved = manifest["backup_id"]
    logger.info(
        "DR test %s (attempt %d): backup %s, provider %s", run_name, attempt, resolved, provider
    )
    audit_id = steps.audit_dr_test_started(
        attempt_scoped_uuid("dr-test-audit"),
        resolved,
        f"{provider}:{run_name}",
        operator,
        justification,
    )

    record: list[dict[str, Any]] = []
    env_result = restored = validation = smoke = bench = None
    error: str | None = None
    failed_key: str | None = None

    def attempt_step(key: str, name: str, call):
        nonlocal error, failed_key
        started = time.time()
        try:
            return call()
        except Exception as exc:
            error = scrub(f"{type(exc).__name__}: {exc}")
            failed_key = key
            finished = time.time()
            record.append(
                _step(
                    key,
                    name,
                    {"started": started, "finished": finished, "seconds": finished - started},
                    "failed",
                    error,
                )
            )
            return None

    env_result = attempt_step(
        "provision",
        "1. provision the DR environment",
        lambda: steps.provision_environment(provider, target_dsn, run_name),
    )
    if env_result:
        record.append(
            _step(
                "provision",
                "1. provision the DR environment",
                env_result,
                "passed",
                env_result["description"],
            )
        )
        environment = env_result["environment"]
        restored = attempt_step(
            "restore",
            "2. restore the backup",
            lambda: steps.restore_backup(manifest, environment, operator, justification),
        )
    if restored:
        record.append(
            _step(
                "restore",
                "2. restore the backup",
                restored,
                "passed",
                f"{restored['tables']} tables, {restored['rows']:,} rows identical to the manifest",
            )
        )
        drilled = not damage or attempt_step(
            "damage",
            "drill: damage the restored copy",
            lambda: steps.damage_restored_copy(environment, manifest, damage),
        )
        if drilled:
            validation = attempt_step(
                "validate",
                "3. validate (GX suites, amcheck)",
                lambda: steps.validate_copy(environment, manifest, str(report_dir / "data_docs")),
            )
    if validation:
        failed = [
            f"{s}: {c['check']}"
            for s, suite in validation["suites"].items()
            for c in suite["checks"]
            if not c["success"]
        ]
        if validation.get("reason"):
            failed.insert(0, validation["reason"])
        if validation["amcheck"]["failures"]:
            failed.append(f"amcheck: {len(validation['amcheck']['failures'])} index(es) corrupt")
        record.append(
            _step(
                "validate",
                "3. validate (GX suites, amcheck)",
                validation,
                "passed" if validation["success"] else "failed",
                "; ".join(failed),
            )
        )
        smoke = attempt_step(
            "smoke",
            "4. smoke tests as the application role",
            lambda: steps.smoke_tests(environment),
        )
    if smoke:
        bad = [
            f"{q['query']}: {'; '.join(q['problems'])}"
            for q in smoke["queries"]
            if not q["success"]
        ]
        record.append(
            _step(
                "smoke",
                "4. smoke tests as the application role",
                smoke,
                "passed" if smoke["success"] else "failed",
                "; ".join(bad),
            )
        )
        bench = attempt_step(
            "benchmark", "5. benchmark: primary vs DR copy", lambda: steps.benchmark(environment)
        )
    bench_failed = False
    if bench:
        slow = bench["flagged"]
        bench_failed = bool(slow) and settings.dr_bench_fail_when_slower
        record.append(
            _step(
                "benchmark",
                "5. benchmark: primary vs DR copy",
                bench,
                "failed" if bench_failed else ("flagged" if slow else "passed"),
                f"slower than {bench['max_ratio']}x on the DR copy: {', '.join(slow)}"
                if slow
                else "",
            )
        )

    success = bool(
        error is None
        and validation
        and validation["success"]
        and smoke
        and smoke["success"]
        and bench
        and not bench_failed
    )
    keep = keep_environment or (error is not None and env_result is not None)
    record.sort(key=lambda s: s["started"] or 0)
    environment_text = env_result["description"] if env_result else f"{provider} DR environment"
    report = steps.write_report(
        run_name, manifest, environment_text, operator, record, validation, smoke, bench, success
    )
    details = {
        "backup_id": resolved,
        "run": run_name,
        "rto_seconds": report["rto_seconds"],
        "rto_objective_seconds": settings.dr_rto_objective_seconds,
        "report": report["s3_html"] or report["html"],
        "failed_steps": [s["name"] for s in record if s["status"] == "failed"],
        "failed_expectations": [
            f"{f['suite']}: {f['expectation']} ({f['check']})"
            for f in steps.drreport.failed_expectations(validation)
        ],
        "error": error,
        "environment_kept": keep and env_result is not None,
    }
    verdict = "PASSED" if success else "FAILED"
    steps.notify_result(
        f"WeDefiDaily DR test {run_name} {verdict}", "success" if success else "failure", details
    )
    steps.audit_dr_test_finished(
        audit_id,
        "success" if success else "failed",
        None
        if success
        else scrub("; ".join(details["failed_steps"]) + (f" ({error})" if error else "")),
    )
    started = min((s["started"] for s in record if s["started"]), default=time.time())
    steps.publish_metrics(
        steps.manifest_database(manifest), success, time.time() - started, report["rto_seconds"]
    )
    if env_result and not keep:
        steps.teardown_environment(provider, target_dsn, env_result["environment"])
    elif env_result:
        logger.warning(
            "DR environment kept (%s): %s",
            "asked to"
            if keep_environment
            else f"step {failed_key} errored; Retry this flow run to continue from it",
            env_result["description"],
        )
    print(f"DR test {run_name} {verdict}: report {report['s3_html'] or report['html']}")
    if not success:
        raise DRTestFailed(
            f"DR test {run_name} of backup {resolved} failed: "
            + "; ".join(details["failed_steps"] or ["see the report"])
            + (f" ({error})" if error else "")
            + f". Report: {report['html']}"
        )
    validation_split = (
        {
            **{name: suite["seconds"] for name, suite in validation["suites"].items()},
            "amcheck": validation["amcheck"]["seconds"],
        }
        if validation
        else {}
    )
    return {
        **details,
        "success": success,
        "report_html": report["html"],
        "steps": record,
        "validation_seconds": validation_split,
    }
