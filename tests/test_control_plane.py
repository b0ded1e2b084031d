"""The control plane as its users touch it: a real ``prefect server start``, real ``process``
workers on the local work pool, the deployments of ``prefect.yaml`` registered by
``prefect --no-prompt deploy --all``, runs started and retried through the API the way the
UI's Run and Retry buttons do it, and Debian's chromium looking at the UI.

One server, one set of deployments and three flow runs serve every test of this module:
a backup (Run), a DR test that fails at a late step on worker A (a real fault: a drill
setting in the run's job variables and a marker file its benchmark step reads), and the
Retry of that same flow run, finished by worker B. Both workers keep results in the
object store (moto S3) and each has its own local storage folder, so a step B does not
run again can only have come back from S3.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers import settled_task_runs
from wedefi_dr.catalog import listing
from wedefi_dr.config import Settings, host_concurrency_limit
from wedefi_dr.postgres.tools import connect
from wedefi_dr.runbook import DRTest, LogicalBackup
from wedefi_dr.storage.s3 import ObjectStore
from wedefi_dr_dev.stack import PREFECT_DB, WORK_POOL, Stack, pid_alive

OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
SCREENSHOTS = OUTPUT / "screenshots"
OPERATOR = "pytest-plane"
RESULTS_BLOCK = "wedefi-dr-results"
RESULTS_PREFIX = "prefect-results-test"
RUN_TIMEOUT = 600.0


def _wait_final(client, flow_run_id, timeout: float = RUN_TIMEOUT):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        flow_run = client.read_flow_run(flow_run_id)
        if flow_run.state and flow_run.state.is_final():
            return flow_run
        assert time.monotonic() < deadline, f"flow run {flow_run_id} still {flow_run.state}"
        time.sleep(1)


def _wait_started(client, flow_run_id, timeout: float = RUN_TIMEOUT) -> None:  # noqa: ANN001
    """Until a worker has taken the run (Pending, Running or already final)."""
    deadline = time.monotonic() + timeout
    while client.read_flow_run(flow_run_id).state.is_scheduled():
        assert time.monotonic() < deadline, f"no worker took flow run {flow_run_id}"
        time.sleep(0.5)


def _task_states(client, flow_run_id) -> dict[str, list[str]]:  # noqa: ANN001
    runs = settled_task_runs(client, flow_run_id)
    states: dict[str, list[str]] = {}
    for run in runs:
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return {name: sorted(s) for name, s in states.items()}


@pytest.fixture(scope="module")
def plane(stack: Stack, seeded, settings: Settings) -> Iterator[dict[str, Any]]:
    """The stack's Prefect server, the deployments, the S3 result block and worker A."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.result_storage import BLOCK_TYPE_SLUG, S3ResultStorage

    root = Path(tempfile.mkdtemp(prefix="wedefi-plane-"))
    root.chmod(0o755)  # the postgres OS user runs the DR clusters below it
    marker = root / "fail-benchmark-once"
    worker_env = {
        "WEDEFI_DR_DR_ENV_DIR": str(root / "envs"),
        "WEDEFI_DR_DR_REPORT_DIR": str(root / "reports"),
        "WEDEFI_DR_DR_BENCH_ITERATIONS": "3",
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": f"{BLOCK_TYPE_SLUG}/{RESULTS_BLOCK}",
    }
    try:
        stack.start_prefect_server()
        with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api_url}):
            S3ResultStorage(bucket=settings.bucket, prefix=RESULTS_PREFIX).save(
                RESULTS_BLOCK, overwrite=True
            )
            deployed = stack.deploy()
            # The every-minute monitor would compete with the runs under test on 2 cores.
            with get_client(sync_client=True) as client:
                client.pause_deployment(client.read_deployment_by_name("monitor/monitor").id)
            stack.start_worker("a", {**worker_env, "PREFECT_LOCAL_STORAGE_PATH": str(root / "a")})
            yield {
                "root": root,
                "marker": marker,
                "deployed": deployed,
                "worker_env": worker_env,
                "store": ObjectStore(settings),
            }
    finally:
        stack.stop_prefect()
        # The server's and workers' logs outlive the session's folder, for a failed run.
        (OUTPUT / "control-plane").mkdir(parents=True, exist_ok=True)
        for log in stack.root.glob("prefect-*.log"):
            shutil.copy(log, OUTPUT / "control-plane" / log.name)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def backup_run(plane: dict[str, Any]):
    """The backup deployment, run as the Run button runs it."""
    from prefect.deployments import run_deployment

    return run_deployment(
        "logical-backup/daily-logical-backup",
        parameters={"operator": OPERATOR},
        timeout=RUN_TIMEOUT,
        poll_interval=1,
    )


@pytest.fixture(scope="module")
def retried_dr_test(plane: dict[str, Any], stack: Stack, backup_run) -> dict[str, Any]:
    """A DR test run that fails at its benchmark on worker A; worker A goes away; the run
    is retried (Retry button: the same run set to AwaitingRetry) and worker B finishes it."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import AwaitingRetry

    backup_id = _plane_backup(plane["store"]).backup_id
    plane["marker"].touch()
    fault = {
        "WEDEFI_DR_DR_DRILL_FAULT_STEP": "benchmark",
        "WEDEFI_DR_DR_DRILL_FAULT_MARKER": str(plane["marker"]),
    }
    submitted = run_deployment(
        "dr-test/monthly-dr-test",
        parameters={"backup_id": backup_id, "operator": OPERATOR},
        job_variables={"env": fault},
        timeout=0,
    )
    with get_client(sync_client=True) as client:
        _wait_started(client, submitted.id)
        # B starts while A works (its start-up overlaps the run), so it is polling by the
        # time A is gone; A alone was there when the run was taken.
        stack.start_worker(
            "b", {**plane["worker_env"], "PREFECT_LOCAL_STORAGE_PATH": str(plane["root"] / "b")}
        )
        failed = _wait_final(client, submitted.id)
        first = _task_states(client, submitted.id)
        kept = sorted((plane["root"] / "envs").iterdir())
        assert stack.stop_worker("a")
        client.set_flow_run_state(submitted.id, AwaitingRetry(message="retry from the test"))
        final = _wait_final(client, submitted.id)
        return {
            "id": submitted.id,
            "failed": failed,
            "first_attempt": first,
            "kept": kept,
            "final": final,
            "states": _task_states(client, submitted.id),
        }


def _plane_backup(store: ObjectStore):
    (manifest,) = [m for m in listing.list_backups(store) if m.operator == OPERATOR]
    return manifest


def test_deploy_registers_every_flow_with_schedules_and_a_host_limit(
    plane: dict[str, Any], stack: Stack
) -> None:
    from prefect.client.orchestration import get_client

    assert sorted(plane["deployed"]) == [
        "archive-tier/weekly-archive-tier",
        "backup-retention/weekly-backup-retention",
        "base-backup/daily-base-backup",
        "dr-test/monthly-dr-test",
        "failover/failover",
        "fleet-backup/fleet-backup",
        "logical-backup/daily-logical-backup",
        "monitor/monitor",
        "point-in-time-recovery/point-in-time-recovery",
        "rejoin/rejoin",
        "restore-backup/restore-backup",
        "retention/weekly-retention",
        "standby/standby",
        "sync/daily-sync",
    ]
    with get_client(sync_client=True) as client:
        by_name = {d.name: d for d in client.read_deployments()}
        crons = {name: sorted(s.schedule.cron for s in d.schedules) for name, d in by_name.items()}
        assert crons == {
            "daily-logical-backup": ["0 2 * * *"],
            "daily-base-backup": ["0 3 * * *"],
            "weekly-retention": ["0 1 * * 0"],
            "monthly-dr-test": ["0 3 1 * *", "0 3 15 * *"],
            "restore-backup": [],
            "point-in-time-recovery": [],
            "monitor": ["* * * * *"],
            "fleet-backup": [],
            "standby": [],
            "failover": [],
            "rejoin": [],
            "daily-sync": ["0 4 * * *"],
            "weekly-archive-tier": ["0 5 * * 0"],
            "weekly-backup-retention": ["0 1 * * 0"],
        }
        assert all(d.work_pool_name == WORK_POOL for d in by_name.values())
        # The Run form: every parameter described, defaults from the flow and the yaml.
        dr = by_name["monthly-dr-test"]
        props = dr.parameter_openapi_schema["properties"]
        assert all(p.get("description") for p in props.values()), props
        assert dr.parameters["backup_id"] == "latest"
        assert "dr-test" in dr.tags and "scheduled" in dr.tags
        limit = client.read_global_concurrency_limit_by_name(
            host_concurrency_limit(f"127.0.0.1:{stack.primary.port}")
        )
        assert limit.limit == 1 and limit.active
    # The server keeps its state in PostgreSQL on the ops cluster, where a slot taken while
    # it records task states waits for a row lock instead of failing "database is locked".
    with connect(stack.ops.admin_dsn(PREFECT_DB)) as conn, conn.cursor() as cur:
        cur.execute('SELECT "limit" FROM concurrency_limit_v2 WHERE name = %s', (limit.name,))
        assert cur.fetchall() == [(1,)]
    # The server runs no flow: none of the stack's secrets is in its environment (or its
    # children's), which any process of its user could read.
    server = psutil.Process(stack.state["prefect_server_pid"])
    secrets = {k: v for k, v in stack.env().items() if "PASSPHRASE" in k or "SECRET" in k}
    assert len(secrets) >= 3 and all(secrets.values())
    for process in (server, *server.children(recursive=True)):
        environ = process.environ()
        assert "PREFECT_API_DATABASE_CONNECTION_URL" in environ  # readable: the check can fail
        shown = "\n".join(environ.values())
        assert [k for k, v in secrets.items() if v in shown] == []


def test_run_button_backup_completes_on_the_worker(
    plane: dict[str, Any], backup_run, stack: Stack
) -> None:
    from prefect.client.orchestration import get_client

    assert backup_run.state.is_completed(), backup_run.state
    with get_client(sync_client=True) as client:
        states = _task_states(client, backup_run.id)
        limit = client.read_global_concurrency_limit_by_name(stack.host_limit_name())
    for step in LogicalBackup:
        assert states[step] == ["Completed"], (step, states)
    assert limit.active_slots == 0  # the dump's slot was given back
    assert f"submitting flow run '{backup_run.id}'" in stack.worker_log("a").read_text()
    manifest = _plane_backup(plane["store"])
    assert manifest.object.size_bytes > 0


def test_retry_button_skips_completed_dr_test_steps(retried_dr_test: dict[str, Any]) -> None:
    run = retried_dr_test
    assert run["failed"].state.is_failed(), run["failed"].state
    assert "DrillFault" in (run["failed"].state.message or ""), run["failed"].state.message
    assert run["first_attempt"][DRTest.BENCHMARK] == ["Failed"]
    assert len(run["kept"]) == 1  # the errored run kept its restored copy for the Retry
    assert run["final"].state.is_completed(), run["final"].state
    assert run["final"].run_count == 2
    states = run["states"]
    # Done once, on the first attempt; on the Retry their results came back from storage.
    done = (DRTest.SELECT_BACKUP, DRTest.PROVISION, DRTest.RESTORE, DRTest.VALIDATE, DRTest.SMOKE)
    for step in done:
        assert states[step] == ["Cached", "Completed"], (step, states)
    assert states[DRTest.BENCHMARK] == ["Completed", "Failed"], states
    assert states[DRTest.TEARDOWN] == ["Completed"], states
    assert not run["kept"][0].exists()


def test_a_run_failed_on_worker_a_is_finished_by_worker_b_from_s3(
    plane: dict[str, Any], retried_dr_test: dict[str, Any], stack: Stack
) -> None:
    run_id = str(retried_dr_test["id"])
    submitted = f"submitting flow run '{run_id}'"
    assert stack.worker_log("a").read_text().count(submitted) == 1
    assert stack.worker_log("b").read_text().count(submitted) == 1
    # B never saw A's disk: its own local result folder holds nothing of this run's.
    b_local = plane["root"] / "b"
    assert not b_local.exists() or not any(p.is_file() for p in b_local.rglob("*"))
    store: ObjectStore = plane["store"]
    keys = [
        o["Key"]
        for page in store.client.get_paginator("list_objects_v2").paginate(
            Bucket=store.bucket, Prefix=f"{RESULTS_PREFIX}/"
        )
        for o in page.get("Contents", [])
    ]
    cached = sum(states.count("Cached") for states in retried_dr_test["states"].values())
    assert cached >= 5 and len(keys) >= cached, (cached, keys)


# A flow process that dies mid-run: it sleeps inside its flow, printing its run id first.
_UNRESPONSIVE_RUN = """
import sys, time
from prefect import flow, tags
from prefect.context import FlowRunContext

@flow(name="unresponsive-drill")
def unresponsive_drill() -> None:
    print(FlowRunContext.get().flow_run.id, flush=True)
    time.sleep(600)

with tags(sys.argv[1]):
    unresponsive_drill()
"""
DRILL_HEARTBEAT_SECONDS = 30  # Prefect's minimum


def _wait_heartbeat(client, run_id: str, timeout: float = 60.0) -> None:  # noqa: ANN001
    """Until the server holds a heartbeat of the run: killed before its first one was sent,
    the run would never have been watched."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    def heartbeats() -> list:
        wanted = EventFilter(  # its time window ends when it is made: made anew each time
            event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
        )
        return client.read_events(wanted, limit=1).events

    deadline = time.monotonic() + timeout
    while not heartbeats():
        assert time.monotonic() < deadline, f"no heartbeat of flow run {run_id} reached the server"
        time.sleep(0.5)


def test_a_run_whose_process_died_is_marked_crashed_by_the_server(
    plane: dict[str, Any], stack: Stack
) -> None:
    """A run started from a terminal whose process is killed (-9: no hook, no final state)
    stays Running for ever unless its missing heartbeats say it is gone. The shipped
    automation's trigger and action, with three heartbeats of 30 s instead of 180 s and
    scoped to this run's tag, mark it Crashed."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    from wedefi_dr_dev.stack import automation_specs

    shipped = automation_specs()["unresponsive-runs"]
    assert shipped["trigger"]["within"] == 3 * 180  # three of Prefect's default heartbeats
    tag = f"drill-{uuid.uuid4().hex[:8]}"
    drill = AutomationCore.model_validate(
        {
            **shipped,
            "name": f"unresponsive-runs-{tag}",
            "trigger": {
                **shipped["trigger"],
                "within": 3 * DRILL_HEARTBEAT_SECONDS,
                "match_related": {
                    "prefect.resource.role": "tag",
                    "prefect.resource.id": f"prefect.tag.{tag}",
                },
            },
        }
    )
    env = {
        **stack.env(),
        "PREFECT_API_URL": stack.prefect_api_url,
        "PREFECT_HOME": str(plane["root"] / "drill-home"),
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(DRILL_HEARTBEAT_SECONDS),
        "PATH": os.environ["PATH"],
    }
    with get_client(sync_client=True) as client:
        automation_id = client.create_automation(drill)
        victim = subprocess.Popen(
            [sys.executable, "-c", _UNRESPONSIVE_RUN, tag],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert victim.stdout is not None
            run_id = victim.stdout.readline().strip()
            assert run_id, "the drill flow never started"
            _wait_heartbeat(client, run_id)
            victim.kill()
            victim.wait(10)
            killed = time.monotonic()
            assert client.read_flow_run(run_id).state.is_running()
            state = _wait_final(client, run_id, timeout=3 * DRILL_HEARTBEAT_SECONDS + 60).state
            waited = time.monotonic() - killed
        finally:
            if victim.poll() is None:
                victim.kill()
            client.delete_automation(automation_id)
        assert state.is_crashed(), state
        assert "No heartbeat" in (state.message or ""), state.message
        # Not before three heartbeats were missed: the run's last one came as it started.
        assert waited > 2 * DRILL_HEARTBEAT_SECONDS, waited
        # The deployed one is on the server, as the yaml says.
        deployed = client.read_automations_by_name("unresponsive-runs")
        assert [a.trigger.within.total_seconds() for a in deployed] == [540.0]
        assert deployed[0].enabled


def test_the_ui_in_a_real_browser(
    plane: dict[str, Any],
    backup_run,
    retried_dr_test: dict[str, Any],
    stack: Stack,
) -> None:
    """Debian's chromium, headless, through Debian's chromedriver (nothing downloads)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1000")
    with get_client(sync_client=True) as client:
        reports = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dr-test-report"]))
        )
        scheduled = {
            name.split("/")[1]: client.read_deployment_by_name(name).id
            for name in ("dr-test/monthly-dr-test", "retention/weekly-retention")
        }
    # The first attempt reported its failure; the Retry's report is the one that passed.
    (artifact,) = [a for a in reports if "PASSED" in a.data]
    # The report's HTML as the artifact names it (its local copy beside the S3 object).
    report_html = next(
        word.rstrip(")")
        for word in artifact.data.split()
        if word.startswith("/") and word.rstrip(")").endswith("report.html")
    )
    shots: list[Path] = []
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    wait = WebDriverWait(driver, 60)

    def body_has(*texts: str) -> bool:
        body = driver.find_element(By.TAG_NAME, "body").text
        return all(t in body for t in texts)

    def shot(name: str) -> None:
        path = SCREENSHOTS / f"{name}.png"
        driver.save_screenshot(str(path))
        shots.append(path)

    try:
        driver.get(f"{stack.prefect_ui_url}/deployments")
        wait.until(lambda _: body_has("daily-logical-backup", "At 02:00 AM every day"))
        shot("deployments")
        # The list pages at ten: each of the others is checked on its own page.
        for name, when in (("monthly-dr-test", "03:00 AM"), ("weekly-retention", "01:00 AM")):
            driver.get(f"{stack.prefect_ui_url}/deployments/deployment/{scheduled[name]}")
            wait.until(lambda _, n=name, w=when: body_has(n, w))

        driver.get(f"{stack.prefect_ui_url}/runs/flow-run/{backup_run.id}")
        wait.until(lambda _: body_has("Completed", "Task Runs"))
        # The tab as a user clicks it: the innermost element that reads "Task Runs".
        assert driver.execute_script(
            "const tabs = [...document.querySelectorAll('body *')]"
            ".filter(e => e.textContent.trim() === 'Task Runs');"
            "if (!tabs.length) return false; tabs[tabs.length - 1].click(); return true;"
        )
        wait.until(lambda _: body_has(*list(LogicalBackup)))
        shot("backup-run-steps")

        driver.get(f"{stack.prefect_ui_url}/artifacts/artifact/{artifact.id}")
        wait.until(lambda _: body_has("RTO", "PASSED"))
        shot("dr-report-artifact")

        driver.get(Path(report_html).as_uri())
        chart = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "svg[aria-label=timeline]"))
        assert chart.size["width"] > 300 and "RTO objective" in chart.text, chart.text
        assert body_has(DRTest.RESTORE, DRTest.VALIDATE)
        shot("dr-report-rto-chart")
    finally:
        driver.quit()
    for path in shots:
        assert path.stat().st_size > 10_000, path
        print(f"screenshot: {path}")


def test_status_shows_the_control_plane_and_stopping_it_ends_every_pid(
    plane: dict[str, Any], retried_dr_test: dict[str, Any], stack: Stack
) -> None:
    """Last in this module: what ``stack down`` does to the control plane (by PID)."""
    status = stack.status()
    assert (
        status["prefect server"].startswith("running")
        and stack.prefect_ui_url in (status["prefect server"])
    )
    assert status["prefect worker b"].startswith("running"), status
    pids = [stack.state["prefect_server_pid"], stack.state["prefect_worker_b_pid"]]
    assert sorted(stack.stop_prefect()) == ["prefect server", "prefect worker b"]
    assert not any(pid_alive(pid) for pid in pids)
    # (a stack without a control plane of its own lists it only while something runs)
    assert stack.status().get("prefect server", "stopped") == "stopped"
    assert not stack.prefect_ready()
