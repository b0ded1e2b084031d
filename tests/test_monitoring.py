"""The monitor: a real pg_stat_archiver from a cluster whose archive_command fails, the
monitor flow on the shared primary (no standbys: no lag series), direct alerting that
pages once and resolves once, and ``wedefi-dr status``."""

from __future__ import annotations

import json
import shutil
import time
import uuid

import httpx
from typer.testing import CliRunner

from tests.test_alerts_e2e import PagerDutyReceiver, wait_for
from wedefi_dr.config import Settings, get_settings
from wedefi_dr.observability import alerts, health, pgstats, records
from wedefi_dr.observability.catalog_ages import CatalogState
from wedefi_dr.postgres.tools import connect
from wedefi_dr_cli.app import app


def _quiet_health(server: pgstats.ServerState, now: float) -> health.Health:
    """Everything else healthy, so only the server's state can raise an alert."""
    ok = {"success": 1.0, "failure": 0.0, "last_success": now, "last_failure": 0.0}
    return health.Health(
        collected_at=now,
        database="archfail",
        rpo_seconds=300.0,
        server=server,
        catalog=CatalogState(None, None, None, None, None, None, None, None, None),
        backups={"logical": dict(ok), "base": dict(ok)},
        dr_test=records.DRTestRecord(now, 0.0, "success", now, 60.0, None),
        stale_running={},
    )


def test_failing_archive_command_raises_wal_archive_failing_then_stale(stack, settings):
    cluster = stack.cluster(f"archfail-{uuid.uuid4().hex[:6]}")
    cluster.extra_conf = {"archive_mode": "on", "archive_command": "'false'"}
    try:
        cluster.init()
        cluster.start()
        dsn = cluster.dsn()
        with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
            cur.execute("SELECT pg_switch_wal()")
        wait_for(
            "archive_command to fail",
            lambda: pgstats.server_state(dsn).archiver.failed_count > 0,
            timeout=60,
        )
        state = pgstats.server_state(dsn)
        a = state.archiver
        assert a.failing and a.last_archived_time is None and a.last_failed_wal
        assert a.ready_segments >= 1 and a.oldest_ready_time is not None
        assert state.standbys == [] and state.slots == []

        now = time.time()
        fired = {x.name for x in alerts.evaluate(_quiet_health(state, now), settings)}
        assert fired == {"WALArchiveFailing"}  # waiting less than the RPO: not stale yet
        later = a.oldest_ready_time + 301
        fired = {x.name for x in alerts.evaluate(_quiet_health(state, later), settings)}
        assert fired == {"WALArchiveFailing", "WALArchiveStale"}

        text = _exposition(health.monitor_registry(_quiet_health(state, now)))
        assert 'wal_archive_failed_total{database="archfail"}' in text
        assert 'wal_archive_last_archived_timestamp_seconds{database="archfail"} 0.0' in text
        assert "wal_archive_oldest_ready_timestamp_seconds" in text
        assert "replication_lag_bytes" not in text  # no standby: no lag series
    finally:
        cluster.stop(mode="immediate")
        shutil.rmtree(cluster.home, ignore_errors=True)


def _exposition(registry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


def test_direct_alerting_pages_once_and_resolves_once_with_the_same_key(
    prefect_api, settings: Settings, env_override, tmp_path
):
    from flows.monitor import monitor

    with PagerDutyReceiver() as receiver:
        env_override(
            WEDEFI_DR_ALERTING="direct",
            WEDEFI_DR_PAGERDUTY_ROUTING_KEY="direct-routing-key",
            WEDEFI_DR_PAGERDUTY_EVENTS_URL=receiver.url,
            WEDEFI_DR_ALERT_STATE_FILE=str(tmp_path / "alerts.json"),
            # Whatever DR tests passed earlier in the session, each is older than this.
            WEDEFI_DR_DR_TEST_MAX_AGE_DAYS="0.000001",
        )
        first = monitor()
        assert "DRTestStale" in first["firing"]
        assert len(receiver.events) == len(first["firing"]) == len(first["triggered"])
        assert {e["event_action"] for e in receiver.events} == {"trigger"}

        # The next rounds (the flow's own two steps, without the engine's overhead).
        snapshot = health.collect(get_settings())
        firing = alerts.evaluate(snapshot, get_settings())
        assert sorted(a.name for a in firing) == sorted(first["firing"])
        second = alerts.dispatch(get_settings(), firing)  # still firing: not paged again
        assert second == {"triggered": [], "resolved": []}
        assert len(receiver.events) == len(first["firing"])

        env_override(WEDEFI_DR_DR_TEST_MAX_AGE_DAYS="1000000")  # the alert stops firing
        firing = alerts.evaluate(snapshot, get_settings())
        assert "DRTestStale" not in {a.name for a in firing}
        third = alerts.dispatch(get_settings(), firing)
        stale = [e for e in receiver.events if "DRTestStale" in e["dedup_key"]]
        assert [e["event_action"] for e in stale] == ["trigger", "resolve"]
        assert third == {"triggered": [], "resolved": [stale[0]["dedup_key"]]}
        assert stale[0]["dedup_key"] == stale[1]["dedup_key"]
        assert alerts.dispatch(get_settings(), firing) == {"triggered": [], "resolved": []}
        assert not receiver.invalid, receiver.invalid

    # The monitor's group is on the Pushgateway; the shared primary has no standby.
    text = httpx.get(get_settings().pushgateway_url + "/metrics", timeout=10).text
    assert 'wal_archive_rpo_seconds{database="wedefi",instance="",job="wedefi_dr_monitor"}' in text
    assert "replication_lag_bytes{" not in text


def test_status_shows_every_kind_and_the_firing_alerts(settings: Settings):
    result = CliRunner().invoke(app, ["status", "--json"])
    assert result.exit_code in (0, 1), result.output
    record = json.loads(result.stdout)
    assert set(record["backups"]) == {"logical", "base", "wal"}
    assert record["alerts"]["source"] == "direct evaluation"
    names = {a["name"] for a in record["alerts"]["firing"]}
    assert result.exit_code == (1 if names else 0)
    assert record["archive"]["mode"] == "on" and record["archive"]["rpo_seconds"] == 300
    table = CliRunner().invoke(app, ["status"])
    assert all(word in table.stdout for word in ("logical", "base", "wal", "window", "DR test"))
