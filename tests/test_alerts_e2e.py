"""The real alerting pipeline, end to end: backup flow → Pushgateway → Prometheus (rules)
→ Alertmanager → a PagerDuty Events API v2 receiver that checks every event's schema.

A logical backup that fails (another run holds its lock: the scheduled backup did not
happen) raises BackupFailed once and pages once; a good base backup in between does not
hide it; the next good logical backup resolves it with the same dedup key.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from wedefi_dr.config import Settings
from wedefi_dr.errors import OperationBusy
from wedefi_dr.observability import prometheus_config
from wedefi_dr.observability.status import alertmanager_alerts
from wedefi_dr.postgres import locks
from wedefi_dr.postgres.cluster import free_port

ROUTING_KEY = "R0UT1NGKEYF0RTHEL0CALRECEIVER00"
SEVERITIES = {"critical", "error", "warning", "info"}


def pagerduty_problems(event: dict[str, Any]) -> list[str]:
    """What is wrong with ``event`` by the Events API v2 schema (empty: a valid event)."""
    problems = []
    if not isinstance(event.get("routing_key"), str) or not event["routing_key"]:
        problems.append("routing_key missing")
    action = event.get("event_action")
    if action not in {"trigger", "acknowledge", "resolve"}:
        problems.append(f"event_action {action!r}")
    key = event.get("dedup_key")
    if action != "trigger" and not key:
        problems.append("dedup_key missing on a non-trigger event")
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 255):
        problems.append(f"dedup_key {key!r}")
    if action == "trigger":
        payload = event.get("payload") or {}
        for name in ("summary", "source", "severity"):
            if not isinstance(payload.get(name), str) or not payload[name]:
                problems.append(f"payload.{name} missing")
        if len(payload.get("summary", "")) > 1024:
            problems.append("payload.summary longer than 1024")
        if payload.get("severity") not in SEVERITIES:
            problems.append(f"payload.severity {payload.get('severity')!r}")
    return problems


class PagerDutyReceiver:
    """A local stand-in for events.pagerduty.com: accepts valid events (202), refuses
    invalid ones (400) and keeps both, so a test sees exactly what was paged."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.invalid: list[tuple[dict[str, Any], list[str]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                event = json.loads(body or b"{}")
                problems = pagerduty_problems(event)
                if self.path != "/v2/enqueue":
                    problems.append(f"path {self.path}")
                (
                    receiver.invalid.append((event, problems))
                    if problems
                    else receiver.events.append(event)
                )
                answer = {"status": "success" if not problems else "invalid event"}
                data = json.dumps({**answer, "dedup_key": event.get("dedup_key")}).encode()
                self.send_response(400 if problems else 202)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v2/enqueue"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> PagerDutyReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def matching(self, alertname: str, **details: str) -> list[dict[str, Any]]:
        found = []
        for e in self.events:
            got = (e.get("payload") or {}).get("custom_details") or {}
            if got.get("alertname") == alertname and all(
                got.get(k) == v for k, v in details.items()
            ):
                found.append(e)
        return found


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class Pipeline:
    """Prometheus and Alertmanager on loopback, scraping the stack's Pushgateway every
    second, evaluating every second, routing to ``receiver``; stopped by their own PIDs."""

    def __init__(self, root: Path, pushgateway_url: str, receiver: PagerDutyReceiver) -> None:
        self.root = root
        self.am_port, self.prom_port = free_port(), free_port()
        key_file = root / "routing_key"
        key_file.write_text(ROUTING_KEY)
        key_file.chmod(0o600)
        (root / "alertmanager.yml").write_text(
            prometheus_config.alertmanager_yml(
                routing_key_file=key_file,
                events_url=receiver.url,
                group_wait="1s",
                group_interval="1s",
                repeat_interval="1h",
            )
        )
        (root / "prometheus.yml").write_text(
            prometheus_config.prometheus_yml(
                pushgateway=pushgateway_url.removeprefix("http://"),
                alertmanager=f"127.0.0.1:{self.am_port}",
                scrape_interval="1s",
                evaluation_interval="1s",
            )
        )
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, argv: list[str], log: str) -> None:
        out = (self.root / log).open("ab")
        self.procs.append(
            subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        )

    def start(self) -> None:
        self._spawn(
            [
                "/usr/bin/prometheus-alertmanager",
                f"--config.file={self.root / 'alertmanager.yml'}",
                f"--storage.path={self.root / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{self.am_port}",
                "--cluster.listen-address=",
            ],
            "alertmanager.log",
        )
        self._spawn(
            [
                "/usr/bin/prometheus",
                f"--config.file={self.root / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.root / 'prom-data'}",
                f"--web.listen-address=127.0.0.1:{self.prom_port}",
                "--rules.alert.resend-delay=1s",
            ],
            "prometheus.log",
        )
        wait_for("alertmanager", lambda: _ready(f"http://127.0.0.1:{self.am_port}/-/ready"))
        wait_for("prometheus", lambda: _ready(f"http://127.0.0.1:{self.prom_port}/-/ready"))

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def prometheus_alerts(self) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.prom_port}/api/v1/alerts"
        return httpx.get(url, timeout=5).json()["data"]["alerts"]


@pytest.fixture
def pipeline(settings: Settings) -> Iterator[tuple[Pipeline, PagerDutyReceiver]]:
    assert settings.pushgateway_url, "the stack starts a Pushgateway"
    root = Path(tempfile.mkdtemp(prefix="wedefi-dr-alerting-"))
    with PagerDutyReceiver() as receiver:
        p = Pipeline(root, settings.pushgateway_url, receiver)
        try:
            p.start()
            yield p, receiver
        finally:
            p.stop()
            shutil.rmtree(root, ignore_errors=True)


def test_failed_backup_pages_once_and_the_next_good_backup_resolves_it(
    pipeline, settings, prefect_api
):
    from flows.backup import logical_backup
    from flows.base_backup import base_backup
    from tasks.common import protected_database

    prom, receiver = pipeline

    def logical_pages() -> list[dict[str, Any]]:
        return receiver.matching("BackupFailed", kind="logical", database="wedefi")

    # A clean start: an earlier test of this session may have left a failed logical backup
    # on the Pushgateway; a good backup resolves it before the fault under test.
    logical_backup(operator="pytest-alerting")
    wait_for(
        "no open BackupFailed page",
        lambda: not logical_pages() or logical_pages()[-1]["event_action"] == "resolve",
    )
    before = len(logical_pages())
    # The fault: another run holds the backup's lock, so this scheduled backup cannot run.
    ops = settings.ops_dsn.get_secret_value()
    with locks.operation_lock(ops, "backup", protected_database()), pytest.raises(OperationBusy):
        logical_backup(operator="pytest-alerting")
    # A good base backup meanwhile: it must not hide the failing logical backup.
    base_backup(operator="pytest-alerting")

    wait_for("the BackupFailed page", lambda: logical_pages()[before:])
    firing = [
        a
        for a in prom.prometheus_alerts()
        if a["labels"]["alertname"] == "BackupFailed"
        and a["state"] == "firing"
        and a["labels"]["database"] == "wedefi"  # other tests' databases have their own groups
    ]
    assert [a["labels"]["kind"] for a in firing] == ["logical"], firing
    # What `wedefi-dr status` shows when Alertmanager is configured: the open page.
    open_pages = alertmanager_alerts(f"http://127.0.0.1:{prom.am_port}")
    assert {(a["name"], a["labels"].get("kind")) for a in open_pages} >= {
        ("BackupFailed", "logical")
    }

    logical_backup(operator="pytest-alerting")
    wait_for(
        "the BackupFailed resolve",
        lambda: any(e["event_action"] == "resolve" for e in logical_pages()[before:]),
    )
    pages = logical_pages()[before:]
    # One incident: a trigger, then its resolve, under one dedup key (a repeated trigger
    # with the same key is the same PagerDuty incident, not a second page).
    actions = [action for action, _ in itertools.groupby(e["event_action"] for e in pages)]
    assert actions == ["trigger", "resolve"], pages
    assert len({e["dedup_key"] for e in pages}) == 1, pages
    trigger = pages[0]
    assert trigger["routing_key"] == ROUTING_KEY
    assert trigger["payload"]["severity"] == "critical"
    assert "logical backup of wedefi failed" in trigger["payload"]["summary"]
    assert not receiver.invalid, receiver.invalid
    assert not receiver.matching("BackupFailed", kind="base")
    # Nothing from the run's error message (it may quote production rows) in any page.
    assert "already running" not in json.dumps(receiver.events)
