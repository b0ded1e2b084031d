"""Tier 1: a streaming standby, the break-glass failover with its fence, streamed WAL.

The module makes its own primary and standby (small clusters in fast mode, described in a
clusters file of their own, archiving into a prefix of their own), so the failover never
touches the session's primary. The tests run in file order: stream the standby, stream WAL
from the primary, fail over, rejoin, then back up with the setting still naming the old
primary.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import BREAK_GLASS, run_approved
from tests.test_pitr import EnvPatch, sql1
from wedefi_dr.approval import ApprovalRefused
from wedefi_dr.config import get_settings
from wedefi_dr.errors import InvalidInput
from wedefi_dr.physical import archiving, rejoin, standby, wal, walnames, walreceiver, walstream
from wedefi_dr.postgres.cluster import (
    FENCE_MARKER,
    ClusterFenced,
    ClusterHandle,
    free_port,
    read_clusters,
    write_clusters,
)
from wedefi_dr.storage.secretfiles import write_secret_file

PRIMARY, STANDBY = "sb-primary", "sb-standby"


def poll(what: str, check, timeout: float = 60.0):  # noqa: ANN001 - a predicate
    """``check()`` until it returns something truthy; a generous deadline, no timing claim."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"{what}: not seen within {timeout:.0f} s")


@pytest.fixture(scope="module")
def pair(stack, settings, prefect_api):
    root = Path(tempfile.mkdtemp(prefix="wedefi-dr-standby-"))
    root.chmod(0o755)
    env = EnvPatch()
    handles = {
        PRIMARY: ClusterHandle(
            name=PRIMARY, data_dir=root / PRIMARY / "data", port=free_port(), production=True
        ),
        STANDBY: ClusterHandle(name=STANDBY, data_dir=root / STANDBY / "data", port=free_port()),
    }
    clusters = root / "clusters.json"
    write_clusters(clusters, handles)
    # The stack's passfile names its own clusters' ports only; these two are added.
    pgpass = write_secret_file(
        root,
        "pgpass",
        "".join(
            f"{h.host}:{h.port}:*:postgres:{stack.primary.password}\n" for h in handles.values()
        )
        + stack.pgpass.read_text(),
    )
    prefix = f"standby-{uuid.uuid4().hex[:6]}"
    env.set(WEDEFI_DR_CLUSTERS_FILE=str(clusters), WEDEFI_DR_PREFIX=prefix, PGPASSFILE=str(pgpass))
    p, s = handles[PRIMARY], handles[STANDBY]
    try:
        s_env = get_settings()
        primary_env = archiving.write_wal_env(s_env, p.home / archiving.ARCHIVE_ENV_NAME)
        # Fast, but with full_page_writes on: a base backup from a standby needs it.
        quick = {"fsync": "off", "synchronous_commit": "off"}
        p.initdb(stack.primary.password, {**quick, **archiving.archiving_conf(primary_env)})
        p.start()
        # What the standby archives with once promoted: production's settings (this test's
        # prefix), written the way the stack writes its own clusters' env files.
        s.home.mkdir(parents=True)
        archiving.write_wal_env(s_env, s.home / archiving.ARCHIVE_ENV_NAME)
        sql1(p.dsn(), "CREATE TABLE acks (n int PRIMARY KEY, note text)")
        from flows.standby import provision_standby

        result = provision_standby(primary=PRIMARY, standby=STANDBY)
        yield {
            "primary": p,
            "standby": s,
            "prefix": prefix,
            "provisioned": result,
            "clusters": clusters,
        }
    finally:
        for h in (s, p):
            if h.is_running():
                h.stop("immediate")
        env.restore()
        shutil.rmtree(root, ignore_errors=True)


def test_standby_provisioned_streaming_and_lag_reported(pair, settings):
    p, s, result = pair["primary"], pair["standby"], pair["provisioned"]
    assert result["state"] == "streaming" and result["standby_in_recovery"] is True
    assert isinstance(result["lag_bytes"], int) and result["lag_bytes"] >= 0
    sql1(p.dsn(), "INSERT INTO acks VALUES (1, 'replicated')")
    poll("row on the standby", lambda: sql1(s.dsn(), "SELECT count(*) FROM acks") == 1)
    status = standby.replication_status(p, s, result["slot"])
    assert status["state"] == "streaming" and status["lag_bytes"] is not None
    # No password in the standby's configuration: it is in a passfile of the server's user.
    auto = (s.data_dir / "postgresql.auto.conf").read_text()
    assert "password" not in auto and "passfile=" in auto
    assert (s.home / standby.PASSFILE_NAME).stat().st_mode & 0o777 == 0o600


def test_base_backup_reads_from_the_standby_when_configured(pair, env_override):
    from flows.base_backup import base_backup

    p, s = pair["primary"], pair["standby"]
    env_override(WEDEFI_DR_BASE_BACKUP_SOURCE_CLUSTER=PRIMARY)
    with pytest.raises(InvalidInput, match="is not a standby"):
        standby.backup_source(get_settings())
    env_override(WEDEFI_DR_BASE_BACKUP_SOURCE_CLUSTER=STANDBY)
    assert f"port={s.port}" in standby.backup_source(get_settings())
    manifest = base_backup(operator="pytest")
    assert manifest["system_identifier"] == str(
        sql1(p.dsn(), "SELECT system_identifier FROM pg_control_system()")
    )
    assert manifest["object"]["size_bytes"] > 0


def _stream_state(stream: walreceiver.WalStream, p: ClusterHandle, segment: str) -> str:
    """What a stream that did not deliver was doing: for the failure message."""
    log = (p.home / "rw.log").read_text(errors="replace")[-1500:] if stream.log_path else ""
    return (
        f"segment {segment}; pg_receivewal alive {stream.alive()} "
        f"(exit {stream.proc.returncode if stream.proc else None}); uploads "
        f"{stream.uploader.uploads}, last error {stream.uploader.last_error}; directory "
        f"{sorted(x.name for x in stream.directory.iterdir())}; replication "
        + str(
            sql1(
                p.dsn(),
                "SELECT json_agg(json_build_array(application_name, state, sent_lsn, "
                "flush_lsn)) FROM pg_stat_replication",
            )
        )
        + f"; current {sql1(p.dsn(), 'SELECT pg_current_wal_lsn()')}; log: {log}"
    )


def test_streamed_partial_reaches_the_store_and_recovery_uses_it_only_as_a_last_resort(pair):
    p = pair["primary"]
    settings = get_settings()
    archive = wal.Archive(settings)
    stream_dir = p.home / "wal-stream"
    stream = walreceiver.WalStream(
        settings, p.dsn(), stream_dir, "wedefi_wal_stream_test", log_path=p.home / "rw.log"
    )
    stream.start()
    try:
        marker = f"acked-{uuid.uuid4().hex}"
        sql1(p.dsn(), f"INSERT INTO acks VALUES (2, '{marker}')")
        # The insert position, not pg_current_wal_lsn(): with synchronous_commit off the
        # commit may not be written yet, and the write position may still be in (or at the
        # end of) the segment before the one holding it.
        segment = sql1(p.dsn(), "SELECT pg_walfile_name(pg_current_wal_insert_lsn())")

        def partial_has_marker():
            found = walstream.fetch_partial(archive, segment, p.home)
            return found and marker.encode() in found[0]

        try:
            poll("the commit in the streamed .partial", partial_has_marker)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {_stream_state(stream, p, segment)}") from None
        stored = archive.store.head(walstream.stream_key(settings, segment))
        assert stored["Metadata"]["encoding"] == wal.ENCODING_WALKEY  # no stretching per upload
        # Whoever can write to the bucket cannot plant a partial: its MAC binds the name.
        other = walnames.next_segments(segment, 5, settings.wal_segment_bytes)[-1]
        archive.client.copy_object(
            Bucket=archive.bucket,
            Key=walstream.stream_key(settings, other),
            CopySource={"Bucket": archive.bucket, "Key": walstream.stream_key(settings, segment)},
        )
        with pytest.raises(wal.ArchiveCorrupt, match="refused"):
            walstream.fetch_partial(archive, other, p.home)
        archive.client.delete_object(
            Bucket=archive.bucket, Key=walstream.stream_key(settings, other)
        )
        assert archive.head(segment) is None  # not archived yet: the partial is the best
        dest = p.home / "restored-segment"
        assert wal.fetch(settings, segment, dest) is True
        assert marker.encode() in dest.read_bytes()
        # Once a later segment is archived, the partial is no longer the best data there is.
        sql1(p.dsn(), "SELECT pg_switch_wal()")
        later = walnames.next_segments(segment, 1, settings.wal_segment_bytes)[0]
        sql1(p.dsn(), "INSERT INTO acks VALUES (3, 'next segment')")
        poll("the next segment's partial", lambda: walstream.fetch_partial(archive, later, p.home))
        poll("the switched segment archived", lambda: archive.head(segment))
        assert walstream.best_partial(archive, later, p.home) is not None
        archive.push_bytes(
            walnames.next_segments(later, 1, settings.wal_segment_bytes)[0], b"x" * 16
        )
        assert walstream.best_partial(archive, later, p.home) is None
    finally:
        stream.stop()
        poll("slot inactive", lambda: standby.drop_slot(p, "wedefi_wal_stream_test"), 30)


def test_induced_lag_raises_replication_lag_high_once_and_resuming_resolves_it(
    pair, env_override, tmp_path
):
    """Replay paused on the standby, ~60 MB written on the primary: the monitor sees the
    lag, ReplicationLagHigh fires as a warning (above 50 MiB, below 100 MiB) and pages once;
    resumed replay resolves the page under the same dedup key."""
    from tests.test_alerts_e2e import PagerDutyReceiver
    from wedefi_dr.observability import alerts, health

    p, s = pair["primary"], pair["standby"]

    def lag() -> int:
        return sql1(
            p.dsn(),
            "SELECT coalesce(max(pg_current_wal_lsn() - replay_lsn), 0)::bigint"
            " FROM pg_stat_replication",
        )

    def lag_alerts() -> list[alerts.Alert]:
        firing = alerts.evaluate(health.collect(get_settings()), get_settings())
        return [a for a in firing if a.name == "ReplicationLagHigh"]

    with PagerDutyReceiver() as receiver:
        env_override(
            WEDEFI_DR_PRIMARY_DSN=p.dsn("postgres"),
            WEDEFI_DR_ALERTING="direct",
            WEDEFI_DR_PAGERDUTY_ROUTING_KEY="lag-routing-key",
            WEDEFI_DR_PAGERDUTY_EVENTS_URL=receiver.url,
            WEDEFI_DR_ALERT_STATE_FILE=str(tmp_path / "alerts.json"),
        )
        assert lag_alerts() == []
        sql1(s.dsn(), "SELECT pg_wal_replay_pause()")
        try:
            sql1(p.dsn(), "CREATE TABLE lag_fill (n int, pad text)")
            while lag() < 60 * 2**20:  # ~60 MB of WAL the standby receives, not replays
                sql1(
                    p.dsn(),
                    "INSERT INTO lag_fill SELECT g, repeat('x', 900)"
                    " FROM generate_series(1, 10000) g",
                )
            raised = lag_alerts()
            assert [(a.severity, a.labels["standby"]) for a in raised] == [("warning", STANDBY)]
            first = alerts.dispatch(get_settings(), raised)
            assert first["triggered"] == [raised[0].dedup_key]
            assert alerts.dispatch(get_settings(), lag_alerts())["triggered"] == []
        finally:
            sql1(s.dsn(), "SELECT pg_wal_replay_resume()")
        poll("replay caught up", lambda: lag() < 2**20, 120)
        assert lag_alerts() == []
        resolved = alerts.dispatch(get_settings(), [])
        assert resolved["resolved"] == [raised[0].dedup_key]
        paged = [e for e in receiver.events if "ReplicationLagHigh" in e["dedup_key"]]
        assert [e["event_action"] for e in paged] == ["trigger", "resolve"]
        assert paged[0]["payload"]["severity"] == "warning"
        assert not receiver.invalid, receiver.invalid
    sql1(p.dsn(), "DROP TABLE lag_fill")


def test_failover_break_glass_fences_the_old_primary_and_archives_timeline_2(pair, settings):
    from flows.failover import failover

    p, s, prefix = pair["primary"], pair["standby"], pair["prefix"]
    params = {
        "operator": "pytest",
        "justification": "drill",
        "primary": PRIMARY,
        "standby": STANDBY,
    }
    one = {"approve": True, "approvers": ["alice"], "emergency_declared": False}
    with pytest.raises(ApprovalRefused, match="emergency must be declared"):
        run_approved(failover, one, **params)
    assert p.is_running() and sql1(s.dsn(), "SELECT pg_is_in_recovery()") is True

    result = run_approved(failover, BREAK_GLASS, **params)
    assert result["new_primary"] == STANDBY and result["timeline"] == 2
    assert result["approvers"] == ["alice", "bob"]
    sql1(s.dsn(), "INSERT INTO acks VALUES (10, 'written on the new primary')")
    assert sql1(s.dsn(), "SELECT count(*) FROM acks WHERE n = 10") == 1

    assert not p.is_running() and result["fence"]["fenced"] is True
    roles = read_clusters(pair["clusters"])
    assert (roles[STANDBY].production, roles[STANDBY].fenced) == (True, False)
    assert (roles[PRIMARY].production, roles[PRIMARY].fenced) == (False, True)
    assert roles[PRIMARY].replaced_by == STANDBY
    assert result["clusters_file"]["written"] is True
    assert f"--old-primary {PRIMARY} --new-primary {STANDBY}" in result["next_steps"]
    assert (p.data_dir / "standby.signal").exists() and (p.data_dir / FENCE_MARKER).exists()
    with pytest.raises(ClusterFenced, match="fenced by a failover"):
        p.start()
    assert not p.is_running()

    archive = wal.Archive(get_settings())
    assert archive.head("00000002.history") is not None
    names = poll(
        "a timeline-2 segment archived",
        lambda: [
            n for n in archive.list_names() if wal.SEGMENT_RE.match(n) and n[:8] == "00000002"
        ],
    )
    assert names and result["last_archived_wal"].startswith("00000002")
    assert get_settings().prefix == prefix


def new_timeline_fork_segment(primary: ClusterHandle) -> str:
    """The new timeline's first segment: the one holding the switch point, which the old
    primary's own WAL also has under its old timeline with a divergent tail."""
    timeline = int(sql1(primary.dsn(), "SELECT pg_walfile_name(pg_current_wal_lsn())")[:8], 16)
    history = (primary.data_dir / "pg_wal" / f"{timeline:08X}.history").read_text()
    switch_lsn = history.strip().splitlines()[-1].split()[1]
    return walnames.segment_of(timeline, switch_lsn, get_settings().wal_segment_bytes)


def recycle_past(primary: ClusterHandle, segment: str) -> None:
    """Archive and checkpoint ``primary`` past ``segment`` until its pg_wal no longer holds
    it, as a busy new primary does before an old one is rejoined."""
    wal_dir = primary.data_dir / "pg_wal"

    def gone() -> bool:
        sql1(
            primary.dsn(),
            "INSERT INTO acks VALUES (1000 + (random() * 1e6)::int, 'churn')"
            " ON CONFLICT DO NOTHING",
        )
        sql1(primary.dsn(), "SELECT pg_switch_wal()")
        sql1(primary.dsn(), "CHECKPOINT")
        return not (wal_dir / segment).exists()

    poll(f"{segment} archived and recycled on {primary.name}", gone, timeout=90)


def test_rejoin_rewinds_the_fenced_old_primary_into_a_streaming_standby_keeping_its_wal(pair):
    """The old primary wrote a row the new one never received (a standby that lagged):
    pg_rewind discards it from the data directory, the WAL holding it is kept aside, and
    the old primary streams from the new one with the new rows."""
    from flows.rejoin import rejoin as rejoin_flow

    p, s = pair["primary"], pair["standby"]
    with pytest.raises(InvalidInput, match="is not fenced"):
        rejoin.check_request(s, p, "wedefi_standby")
    (p.data_dir / FENCE_MARKER).unlink()
    (p.data_dir / "standby.signal").unlink()
    with (p.data_dir / "postgresql.auto.conf").open("a") as f:
        f.write("archive_command = '/bin/false'\n")  # its divergent WAL stays .ready
    p.start()
    divergent = f"divergent-{uuid.uuid4().hex}"
    sql1(p.dsn(), f"INSERT INTO acks VALUES (20, '{divergent}')")
    standby.fence(p, s, reason="pytest: the divergent old primary stopped again")
    with pytest.raises(InvalidInput, match="not fenced"):
        rejoin.check_request(s, p, "wedefi_standby")
    sql1(s.dsn(), "INSERT INTO acks VALUES (11, 'after the failover')")
    fork = new_timeline_fork_segment(s)
    recycle_past(s, fork)

    result = rejoin_flow(
        operator="pytest", justification="drill", old_primary=PRIMARY, new_primary=STANDBY
    )
    assert result["method"] == "pg_rewind" and result["fallback"] is None
    assert result["diverged"] and "diverged at" in result["diverged"]
    assert result["rewind"] == result["diverged"]
    assert result["state"] == "streaming"
    # The new timeline's first segment had left the new primary: it came from the archive,
    # and the old timeline's divergent copy of it left pg_wal.
    assert fork in result["new_timeline_wal"]["fetched"]
    assert f"00000001{fork[8:]}" in result["new_timeline_wal"]["removed"]
    # The divergent row's WAL was never archived (.ready): pushed before the rewind, and
    # copied aside as well.
    at = result["diverged"].split("WAL location ")[1].split()[0]
    segment = walnames.segment_of(1, at, get_settings().wal_segment_bytes)
    assert segment in result["wal_kept"]["pushed"]
    assert divergent.encode() in (Path(result["wal_kept"]["aside"]) / segment).read_bytes()
    fetched = p.home / "divergent-from-the-archive"
    assert wal.fetch(get_settings(), segment, fetched) is True
    assert divergent.encode() in fetched.read_bytes()

    assert p.is_running() and not (p.data_dir / FENCE_MARKER).exists()
    assert sql1(p.dsn(), "SELECT pg_is_in_recovery()") is True
    assert sql1(p.dsn(), "SELECT count(*) FROM acks WHERE n IN (10, 11)") == 2
    assert sql1(p.dsn(), "SELECT count(*) FROM acks WHERE n = 20") == 0
    sql1(s.dsn(), "INSERT INTO acks VALUES (12, 'streamed to the rejoined standby')")
    poll(
        "row 12 on the rejoined standby",
        lambda: sql1(p.dsn(), "SELECT count(*) FROM acks WHERE n = 12"),
    )
    status = standby.replication_status(s, p, result["slot"])
    assert status["state"] == "streaming" and status["application_name"] == PRIMARY
    roles = read_clusters(pair["clusters"])
    assert (roles[PRIMARY].production, roles[PRIMARY].fenced) == (False, False)
    assert roles[STANDBY].production is True


def test_base_backup_source_follows_the_failover_to_the_rejoined_standby(pair, env_override):
    """The setting still names the standby the failover promoted: the base backup reads
    from the rejoined old primary, which streams from it, and from the primary itself when
    no standby streams (said in the log); it is never refused for the promotion."""
    p, s = pair["primary"], pair["standby"]
    env_override(WEDEFI_DR_BASE_BACKUP_SOURCE_CLUSTER=STANDBY)
    assert f"port={p.port}" in standby.backup_source(get_settings())
    p.stop()
    try:
        poll(
            "the rejoined standby gone from pg_stat_replication",
            lambda: not standby.streaming_standbys(s, read_clusters(pair["clusters"])),
        )
        assert f"port={s.port}" in standby.backup_source(get_settings())
    finally:
        p.start()


def test_rejoin_falls_back_to_a_fresh_base_backup_and_keeps_the_old_directory(pair):
    """When pg_rewind cannot work (here: told the cluster has no hint bits logged), the old
    directory is moved aside still fenced and pg_basebackup re-provisions the standby."""
    p, s = pair["primary"], pair["standby"]
    p.stop()
    done = rejoin.rewind_or_reprovision(
        get_settings(),
        p,
        s,
        "wedefi_standby",
        not_rewindable="pytest: no wal_log_hints",
        archive_command=None,
        timeout=300,
    )
    assert done["method"] == "pg_basebackup"
    assert done["fallback"].startswith("pytest: no wal_log_hints; re-provisioned")
    kept = Path(done["kept_at"])
    assert (kept / "PG_VERSION").exists() and (kept / FENCE_MARKER).exists()
    assert (kept / "standby.signal").exists()
    status = standby.wait_streaming(s, p, "wedefi_standby")
    assert status["state"] == "streaming"
    assert sql1(p.dsn(), "SELECT count(*) FROM acks WHERE n IN (10, 11, 12)") == 3
    # A crashed old primary is refused before anything changes: pg_rewind needs a clean stop.
    (p.data_dir / FENCE_MARKER).write_text("{}\n")
    p.stop("immediate")
    with pytest.raises(InvalidInput, match="was not stopped cleanly"):
        rejoin.check_request(p, s, "wedefi_standby")


def test_after_the_failover_backups_locks_and_monitoring_follow_the_new_primary(pair, env_override):
    """WEDEFI_DR_PRIMARY_DSN still names the old primary (stopped, fenced): the backup dumps
    the new primary, the lock and `wedefi-dr status` name it; with no production cluster in
    the file the backup is refused before anything runs."""
    import psycopg2
    from typer.testing import CliRunner

    from flows.backup import logical_backup
    from tasks.common import protected_database
    from tasks.failover import next_steps
    from tests.test_cli import assert_one_line_error, cli
    from wedefi_dr.catalog import listing
    from wedefi_dr.postgres import clusters_file
    from wedefi_dr.postgres.fingerprint import fingerprint_tables
    from wedefi_dr.postgres.primary import PrimaryUnresolved
    from wedefi_dr.storage.repository import open_store
    from wedefi_dr_cli.app import app

    p, s = pair["primary"], pair["standby"]
    clusters_file.after_failover(pair["clusters"], PRIMARY, STANDBY)  # as the failover left it
    if p.is_running():
        p.stop("immediate")
    env_override(WEDEFI_DR_PRIMARY_DSN=p.dsn())
    marker = f"only-on-the-new-primary-{uuid.uuid4().hex[:8]}"
    sql1(s.dsn(), f"INSERT INTO acks VALUES (30, '{marker}')")

    backup_id = logical_backup(operator="pytest")
    manifest = listing.resolve(open_store(get_settings()), backup_id)
    assert (manifest.source.host, manifest.source.port) == (s.host, s.port)
    with psycopg2.connect(s.dsn()) as conn:
        on_new = fingerprint_tables(conn, sequences=False)["public.acks"]
    conn.close()
    assert manifest.tables["public.acks"] == on_new
    assert on_new["rows"] == sql1(s.dsn(), "SELECT count(*) FROM acks")
    assert protected_database() == f"{s.host}:{s.port}/postgres"
    shown = CliRunner().invoke(app, ["status", "--json"])
    assert shown.exit_code in (0, 1), shown.output  # 1: an alert fires (this pair's archive)
    assert json.loads(shown.stdout)["primary"] == {
        "location": f"{s.host}:{s.port}/postgres",
        "cluster": STANDBY,
        "followed_from": PRIMARY,
        "in_recovery": False,
    }
    assert "nothing to change for backups" in next_steps(PRIMARY, STANDBY, f"{s.host}:{s.port}")

    clusters_file.set_roles(pair["clusters"], {STANDBY: {"production": False}})
    try:
        refused = cli("backup", "--operator", "pytest", env=dict(os.environ))
        assert_one_line_error(refused, 2)
        assert f"names cluster {PRIMARY}, replaced by a failover" in refused.stderr
        assert f"{STANDBY} is not an unfenced production cluster" in refused.stderr
        with pytest.raises(PrimaryUnresolved):  # a scheduled run: failed, audited, notified
            logical_backup(operator="pytest")
    finally:
        clusters_file.set_roles(pair["clusters"], {STANDBY: {"production": True}})
