"""The monthly DR test on the real stack: pass, damage caught, retry of the same flow run.

Every run restores a real backup into a fresh local cluster, validates it with the real
GX suites, runs smoke queries as the application role, benchmarks against the session's
primary (read-only), writes the report to moto S3 and publishes to moto SNS (read back
through an SQS subscription). Nothing here writes to the primary ``wedefi`` database:
damage is done to restored copies only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.dr_test import DRTestFailed, dr_test
from tests.helpers import fingerprint, settled_task_runs
from tests.helpers import sns_inbox as helpers_sns_inbox
from wedefi_dr.catalog import listing
from wedefi_dr.catalog.manifest import new_backup_id
from wedefi_dr.config import Settings
from wedefi_dr.errors import InvalidInput


@pytest.fixture(scope="module")
def dr_dirs() -> Iterator[dict[str, Path]]:
    # Not pytest's tmp_path (mode 700): the postgres OS user must reach the DR clusters.
    root = Path(tempfile.mkdtemp(prefix="wedefi-drtest-"))
    root.chmod(0o755)
    yield {"envs": root / "envs", "reports": root / "reports", "root": root}
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def dr_settings(env_override, dr_dirs, settings: Settings) -> Settings:
    # The benchmark's ratios on a busy 2-core host are noise: flag, never fail, here.
    env_override(
        WEDEFI_DR_DR_ENV_DIR=str(dr_dirs["envs"]),
        WEDEFI_DR_DR_REPORT_DIR=str(dr_dirs["reports"]),
        WEDEFI_DR_DR_BENCH_ITERATIONS="3",
    )
    from wedefi_dr.config import get_settings

    return get_settings()


@pytest.fixture(scope="module")
def sns_inbox(settings: Settings):
    """The DR test's notifications, by run name."""
    drain = helpers_sns_inbox(settings, "wedefi-dr-test-inbox")
    return lambda run: [body for body in drain() if body.get("run") == run]


def _metrics(settings: Settings) -> str:
    return (Path(settings.metrics_dir) / "wedefi_dr_dr_test.prom").read_text()


def _run_name(report_html: str) -> str:
    return Path(report_html).parent.name


def test_dr_test_passes_every_step_and_reports_its_rto(
    good_backup, dr_settings: Settings, dr_dirs, store, sns_inbox
):
    result = dr_test(backup_id=good_backup, operator="pytest")

    assert result["success"] is True
    statuses = {s["key"]: s["status"] for s in result["steps"]}
    assert statuses == {
        "provision": "passed",
        "restore": "passed",
        "validate": "passed",
        "smoke": "passed",
        "benchmark": statuses["benchmark"],  # passed or flagged: timing noise, not asserted
    }
    assert statuses["benchmark"] in {"passed", "flagged"}
    run = _run_name(result["report_html"])
    restore = next(s for s in result["steps"] if s["key"] == "restore")
    validate = next(s for s in result["steps"] if s["key"] == "validate")
    assert result["rto_seconds"] == pytest.approx(validate["finished"] - restore["started"], 1e-3)

    html = Path(result["report_html"]).read_text()
    assert "PASSED" in html and "RTO objective" in html and "<svg" in html
    assert "portfolio_integrity" in html and "latest price per token" in html
    # Data Docs built for the three validations, kept with the report, here and in S3.
    docs = Path(result["report_html"]).parent / "data_docs"
    assert (docs / "index.html").exists()
    assert len(list((docs / "validations").rglob("*.html"))) == 3
    prefix = f"{store.key('logical', good_backup, 'dr-tests', run)}/"
    keys = {o["Key"][len(prefix) :] for o in store.list_keys(prefix)}
    assert {"report.html", "report.md", "data_docs/index.html"} <= keys
    # No secret anywhere in what was written.
    secrets = [dr_settings.gpg_passphrase.get_secret_value(), os.environ["AWS_SECRET_ACCESS_KEY"]]
    secrets += [
        line.rsplit(":", 1)[1] for line in Path(os.environ["PGPASSFILE"]).read_text().split()
    ]
    for path in Path(result["report_html"]).parent.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert not any(s in text for s in secrets), path

    (message,) = sns_inbox(run)
    assert message["status"] == "success" and message["backup_id"] == good_backup
    assert message["rto_seconds"] == result["rto_seconds"]
    prom = _metrics(dr_settings)
    assert 'recovery_test_last_success{database="wedefi"} 1.0' in prom
    assert f'rto_seconds{{database="wedefi"}} {result["rto_seconds"]}' in prom
    assert "dr_test_duration_seconds" in prom and "recovery_test_success_rate" in prom
    # Torn down after a pass: the cluster's folder is gone.
    assert not (dr_dirs["envs"] / run).exists()


def test_damaged_copy_fails_validation_names_each_expectation_and_notifies(
    good_backup, dr_settings: Settings, dr_dirs, settings: Settings, store, sns_inbox
):
    manifest = listing.resolve(store, good_backup)
    with pytest.raises(DRTestFailed, match=r"3\. validate") as failed:
        dr_test(
            backup_id=good_backup,
            operator="pytest",
            justification="damage drill",
            drill_damage=["delete_wallets", "orphan_balance", "remove_price_day"],
        )
    report = Path(str(failed.value).rsplit("Report: ", 1)[1])
    run = report.parent.name
    html = report.read_text()
    assert "FAILED" in html
    # Each damage is named by the expectation that caught it, with the reason.
    wallets = manifest.integrity_facts["portfolio"]["wallet_count"]
    assert "wallet count equals the source&#39;s at backup time" in html
    assert f"observed {wallets - 3}" in html
    assert "no balance without its wallet or token" in html
    # Counted, never listed: the report and Data Docs hold no restored row (F22).
    assert "wallet-that-does-not-exist" not in html
    assert "price snapshots exist on each of the 7 days before the backup" in html
    assert "no token with a gap day" in html
    assert "tokens tracked and snapshots per day equal the source&#39;s" in html
    # The checks the damage did not touch still pass.
    assert 'alert_integrity</td><td class="passed"' in html

    (message,) = sns_inbox(run)
    assert message["status"] == "failure"
    assert any(
        "wallet_id" not in f and "no balance without" in f for f in message["failed_expectations"]
    )
    assert any(
        "expect_column_unique_value_count_to_be_between" in f
        for f in message["failed_expectations"]
    )
    assert 'recovery_test_last_success{database="wedefi"} 0.0' in _metrics(dr_settings)
    # Torn down after a failure too; and the primary was never touched.
    assert not (dr_dirs["envs"] / run).exists()
    assert fingerprint(settings.primary_dsn.get_secret_value()) == manifest.tables


def test_retry_of_the_same_flow_run_skips_completed_steps(
    good_backup, dr_settings: Settings, dr_dirs, env_override, prefect_api
):
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import Scheduled

    marker = dr_dirs["root"] / "fail-benchmark-once"
    marker.touch()
    env_override(
        WEDEFI_DR_DR_DRILL_FAULT_STEP="benchmark", WEDEFI_DR_DR_DRILL_FAULT_MARKER=str(marker)
    )

    state = dr_test(backup_id=good_backup, operator="pytest", return_state=True)
    assert state.is_failed() and "DrillFault" in state.message, state.message
    flow_run_id = state.state_details.flow_run_id
    assert not marker.exists()  # the fault was one-time
    kept = list(dr_dirs["envs"].iterdir())
    assert len(kept) == 1  # an errored step keeps the restored copy for the retry

    # What the UI's Retry (and `prefect flow-run retry`) does: the same flow run back to
    # Scheduled, then executed again with its own parameters.
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Scheduled(message="retry from test"), force=True)
        flow_run = client.read_flow_run(flow_run_id)
        final = run_flow(
            flow=dr_test, flow_run=flow_run, parameters=flow_run.parameters, return_type="state"
        )
        assert final.is_completed(), final.message
        task_runs = settled_task_runs(client, flow_run_id)
        flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.run_count == 2

    def states_of(name: str) -> list[str]:
        return sorted(t.state.name for t in task_runs if t.name.startswith(name))

    # The restore ran once; on the retry it was served from its persisted result.
    for step in ("1. provision", "2. restore", "3. validate", "4. smoke"):
        assert states_of(step) == ["Cached", "Completed"], step
    assert states_of("5. benchmark") == ["Completed", "Failed"]
    assert states_of("9. teardown") == ["Completed"]
    assert not kept[0].exists()


def test_backup_without_integrity_facts_fails_loudly(
    good_backup, dr_settings: Settings, dr_dirs, store
):
    """A manifest from before integrity facts: no silent pass, a clear reason instead."""
    manifest = listing.resolve(store, good_backup)
    old_id = new_backup_id()
    old = manifest.model_copy(update={"backup_id": old_id, "integrity_facts": None})
    listing.put_manifest(store, listing.manifest_key(store, old_id), old)
    try:
        with pytest.raises(DRTestFailed) as failed:
            dr_test(backup_id=old_id, operator="pytest")
        html = Path(str(failed.value).rsplit("Report: ", 1)[1]).read_text()
        assert f"backup {old_id} has no integrity_facts in its manifest" in html
    finally:
        store.delete(listing.manifest_key(store, old_id))
    assert listing.resolve(store, good_backup).backup_id == good_backup


def test_a_password_in_the_dr_server_dsn_is_refused_before_a_flow_run():
    """The command line refuses it before ``run_flow`` (Prefect records parameters)."""
    from wedefi_dr_cli.drtest import check_request

    with pytest.raises(InvalidInput, match="contains a password"):
        check_request("dsn", "host=x dbname=y password=not-a-real-secret", None, "latest")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"provider": "docker"}, "needs a reachable Docker engine"),
        ({"provider": "bare-metal"}, "unknown DR environment provider"),
        ({"provider": "dsn"}, "needs --target-dsn"),
        ({"drill_damage": ["drop_everything"]}, "unknown drill damage"),
    ],
)
def test_bad_input_is_refused_before_anything_is_created(
    kwargs, message, dr_settings: Settings, dr_dirs, prefect_api
):
    before = set(dr_dirs["envs"].iterdir()) if dr_dirs["envs"].exists() else set()
    state = dr_test(operator="pytest", return_state=True, **kwargs)
    assert state.is_failed()
    with pytest.raises(InvalidInput, match=message):
        state.result()
    after = set(dr_dirs["envs"].iterdir()) if dr_dirs["envs"].exists() else set()
    assert after == before


def test_backup_records_integrity_facts_from_its_snapshot(good_backup, store, seeded):
    facts = listing.resolve(store, good_backup).integrity_facts
    assert facts["portfolio"]["wallet_count"] == seeded["Wallet"]
    assert facts["portfolio"]["orphan_balances"] == 0
    # The seed prices every token every 40 minutes: all of them on each of the 7 days.
    assert [d["day_index"] for d in facts["price_days"]] == [1, 2, 3, 4, 5, 6, 7]
    assert {d["tokens_tracked"] for d in facts["price_days"]} == {seeded["Token"]}
    assert facts["alerts"]["total"] == seeded["Alert"]
    assert facts["alerts"]["last_24h_counts"]  # the seed has alerts in the last 24 hours


def test_existing_server_provider_uses_set_role_and_drops_only_its_database(
    good_backup, dr_settings: Settings, settings: Settings, scratch_dsn: str
):
    """--provider dsn: a database the DR test creates on a server it does not run."""
    from tests.helpers import database_exists
    from wedefi_dr.postgres.conninfo import dbname_of

    admin = settings.primary_dsn.get_secret_value()
    result = dr_test(
        backup_id=good_backup, provider="dsn", target_dsn=scratch_dsn, operator="pytest"
    )
    assert result["success"] is True
    smoke = next(s for s in result["steps"] if s["key"] == "smoke")
    assert smoke["status"] == "passed"
    html = Path(result["report_html"]).read_text()
    assert "Smoke tests (as wedefi_app)" in html
    # It created the database, so teardown dropped it; the source was never a target.
    assert not database_exists(admin, dbname_of(scratch_dsn))
    assert database_exists(admin, "wedefi")


def test_an_error_in_the_report_step_closes_the_audit_row_and_pages_once(
    good_backup, dr_settings: Settings, dr_dirs, settings: Settings, env_override, sns_inbox
):
    """A step outside the recorded ones (the report) raises: the run ends through the one
    failure path, so its audit row never stays 'running', and the pager hears of it once."""
    from wedefi_dr.drtest.environments import DREnvironment, LocalClusterProvider
    from wedefi_dr.postgres.tools import connect

    marker = dr_dirs["root"] / "fail-report-once"
    marker.touch()
    env_override(
        WEDEFI_DR_DR_DRILL_FAULT_STEP="report", WEDEFI_DR_DR_DRILL_FAULT_MARKER=str(marker)
    )
    before = set(dr_dirs["envs"].iterdir()) if dr_dirs["envs"].exists() else set()
    state = dr_test(backup_id=good_backup, operator="pytest-report-fault", return_state=True)
    assert state.is_failed() and "DrillFault" in state.message, state.message
    (kept,) = set(dr_dirs["envs"].iterdir()) - before  # an error keeps the copy for a Retry
    run = kept.name
    try:
        with connect(settings.ops_dsn.get_secret_value()) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT status, error_message FROM recovery_audit_log WHERE target = %s",
                (f"local:{run}",),
            )
            (status, error), *others = cur.fetchall()
        assert others == []
        assert status == "failed" and "injected fault in step 'report'" in error
        (message,) = sns_inbox(run)
        assert message["status"] == "failure" and message["backup_id"] == good_backup
        assert "DrillFault" in message["error"]
    finally:
        provider = LocalClusterProvider(dr_dirs["envs"], dr_settings.dr_app_role)
        provider.teardown(DREnvironment("local", run, "", dr_settings.dr_app_role, home=str(kept)))
