"""Point-in-time recovery end to end: real clusters, real archive, real Prefect pauses.

A source cluster of its own (never the session primary, which other tests use) archives
into its own prefix; marker rows are committed at known times around a named restore
point; the ``base-backup`` and ``point-in-time-recovery`` flows then run for real, and a
helper thread approves the paused run through the Prefect API, as an approver would.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from unittest.mock import ANY

import pytest
from prefect import tags

from tests.helpers import approve_when_paused
from wedefi_dr.config import get_settings
from wedefi_dr.physical import archiving, basebackup, prefetch, wal
from wedefi_dr.physical.pitr import recovery
from wedefi_dr.physical.pitr.approval import ApprovalRefused
from wedefi_dr.physical.pitr.recovery import RecoveryFailed
from wedefi_dr.physical.pitr.window import TargetOutsideWindow
from wedefi_dr.postgres.cluster import read_clusters
from wedefi_dr.postgres.clusters_file import set_roles
from wedefi_dr.postgres.tools import connect, tool
from wedefi_dr.storage.repository import open_store
from wedefi_dr_dev.stack import Cluster, Stack

ONE = {"approve": True, "approvers": ["alice"]}
BREAK_GLASS = {"approve": True, "approvers": ["alice", "bob"], "emergency_declared": True}


# ---- helpers -----------------------------------------------------------------------------
class EnvPatch:
    """Module-wide settings for the flows (they read get_settings() in-process)."""

    def __init__(self) -> None:
        self.saved: dict[str, str | None] = {}

    def set(self, **values: str) -> None:
        for k, v in values.items():
            self.saved.setdefault(k, os.environ.get(k))
            os.environ[k] = v
        get_settings.cache_clear()

    def restore(self) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_settings.cache_clear()


def source_cluster(stack: Stack, name: str, prefix: str, fast: bool = True) -> Cluster:
    c = stack.cluster(name)
    c.fast = fast
    c.extra_conf = stack.archiving_conf(c, prefix=prefix)
    c.init()
    c.start()
    return c


def sql1(dsn: str, query: str, args: tuple = ()) -> object:
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(query, args)
        return cur.fetchone()[0] if cur.description else None


def switch_and_wait_archived(dsn: str, timeout: float = 90) -> str:
    """Close the current segment and wait until the archiver has stored it."""
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
        segment = cur.fetchone()[0]
        cur.execute("SELECT pg_switch_wal()")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cur.execute("SELECT last_archived_wal FROM pg_stat_archiver")
            last = cur.fetchone()[0]
            if last and last[8:] >= segment[8:] and last[:8] == segment[:8]:
                return segment
            time.sleep(0.3)
    raise AssertionError(f"segment {segment} was not archived within {timeout} s")


def markers(dsn: str) -> list[int]:
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM markers ORDER BY id")
        return [r[0] for r in cur.fetchall()]


def recover(run_input: dict | None, **params) -> dict:
    """Run the PITR flow in this thread; a helper thread approves it when it pauses."""
    from flows.pitr import point_in_time_recovery

    tag = f"pitr-test-{uuid.uuid4().hex[:8]}"
    box: dict = {}
    helper = approve_when_paused(tag, run_input, box) if run_input is not None else None
    params.setdefault("operator", "pytest-operator")
    params.setdefault("justification", "pitr test")
    try:
        with tags(tag):
            return point_in_time_recovery(**params)
    finally:
        if helper is not None:
            helper.join(timeout=10)
        assert "error" not in box, box.get("error")


def audit_rows(ops_dsn: str) -> list[tuple]:
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT recovery_type, status, error_message, target FROM recovery_audit_log"
            " WHERE recovery_type = 'pitr' ORDER BY start_time"
        )
        return cur.fetchall()


# ---- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def history(stack: Stack, prefect_api: None) -> Iterator[dict]:
    """A source cluster with a base backup, then markers 1..4 at known times and two
    named restore points, all archived."""
    from flows.base_backup import base_backup

    hexid = uuid.uuid4().hex[:6]
    prefix = f"pitr-{hexid}"
    env = EnvPatch()
    src = source_cluster(stack, f"pitrsrc-{hexid}", prefix)
    dsn = src.dsn("postgres")
    env.set(
        WEDEFI_DR_PRIMARY_DSN=dsn,
        WEDEFI_DR_PREFIX=prefix,
        WEDEFI_DR_PITR_REPLAY_TIMEOUT_SECONDS="120",
    )
    recovered: list[Cluster] = []
    try:
        sql1(dsn, "CREATE TABLE markers (id int PRIMARY KEY, at timestamptz DEFAULT now())")
        base = base_backup(operator="pytest")
        marks: dict = {"base": base}
        sql1(dsn, "INSERT INTO markers (id) VALUES (1)")
        marks["segment_of_1"] = switch_and_wait_archived(dsn)
        sql1(dsn, "INSERT INTO markers (id) VALUES (2)")
        time.sleep(0.3)
        marks["between_2_and_3"] = sql1(dsn, "SELECT clock_timestamp()")
        time.sleep(0.3)
        sql1(dsn, "INSERT INTO markers (id) VALUES (3)")
        sql1(dsn, "SELECT pg_create_restore_point('before-m4')")
        sql1(dsn, "INSERT INTO markers (id) VALUES (4)")
        sql1(dsn, "SELECT pg_create_restore_point('after-m4')")
        sql1(dsn, "INSERT INTO markers (id) VALUES (5)")
        switch_and_wait_archived(dsn)
        yield {
            "stack": stack,
            "src": src,
            "dsn": dsn,
            "prefix": prefix,
            "env": env,
            "recovered": recovered,
            **marks,
        }
    finally:
        for c in [src, *recovered]:
            c.stop()
        env.restore()


def recovered_cluster(history: dict, name: str) -> Cluster:
    c = history["stack"].cluster(name)
    history["recovered"].append(c)
    return c


# ---- tests -------------------------------------------------------------------------------
def test_window_and_target_before_earliest_base_backup_refused(history, settings):
    from typer.testing import CliRunner

    from wedefi_dr_cli.app import app

    shown = CliRunner().invoke(app, ["pitr", "window", "--json"])
    assert shown.exit_code == 0, shown.output
    assert history["base"]["backup_id"] in shown.output

    before = history["base"]["started_at"]
    never = history["stack"].cluster(f"never-{uuid.uuid4().hex[:6]}")  # described, not made
    name = never.name
    rows_before = audit_rows(settings.ops_dsn.get_secret_value())
    with pytest.raises(TargetOutsideWindow, match="before the earliest base backup"):
        recover(
            None,
            target_kind="time",
            target_value=(datetime.fromisoformat(before) - timedelta(seconds=5)).isoformat(),
            cluster=name,
        )
    assert not never.home.exists()  # nothing was created
    assert audit_rows(settings.ops_dsn.get_secret_value()) == rows_before


def test_recovery_to_a_time_between_markers_is_exact(history, settings):
    c = recovered_cluster(history, f"pitr-time-{uuid.uuid4().hex[:6]}")
    result = recover(
        ONE,
        target_kind="time",
        target_value=history["between_2_and_3"].isoformat(),
        cluster=c.name,
    )
    assert markers(c.dsn()) == [1, 2]  # exactly the rows committed before the target
    assert result["recovery_point"]["paused"] is True
    assert result["recovery_point"]["prefetch_primed"] is True
    assert result["timeline"] == 2
    assert sql1(c.dsn(), "SELECT pg_is_in_recovery()") is False
    assert sql1(c.dsn(), "SHOW archive_mode") == "off"  # a copy never archives
    assert not (c.home / archiving.ARCHIVE_ENV_NAME).exists()  # nor could it
    auto_conf = (c.data_dir / "postgresql.auto.conf").read_text()
    assert "prefetch.py" in auto_conf  # restore_command: the spool's hand-over, then wal-fetch
    assert settings.gpg_passphrase.get_secret_value() not in auto_conf  # it is in a 600 file
    assert not (c.home / archiving.RESTORE_ENV_NAME).exists()  # its keys go with the replay
    assert not (c.data_dir / "recovery.signal").exists()  # promoted: recovery is over
    rows = audit_rows(settings.ops_dsn.get_secret_value())
    assert rows[-1][0:2] == ("pitr", "success") and c.name in rows[-1][3]
    c.stop()


def test_replay_prefetch_is_primed_before_the_server_starts(history, tmp_path):
    """The base backup's first segment is in the spool, verified and readable by the
    server's OS user, before the recovering server asks for anything."""
    settings = get_settings()
    c = recovered_cluster(history, f"pitr-prime-{uuid.uuid4().hex[:6]}")
    manifest = basebackup.resolve(open_store(settings), history["base"]["backup_id"])
    staged = recovery.stage_base_backup(settings, manifest, c, tmp_path / "spool")
    recovery.install_staged(c, staged)
    env = archiving.write_wal_env(settings, c.home / archiving.RESTORE_ENV_NAME, os_user=c.os_user)
    first = recovery.first_segment(c.data_dir)
    assert first == manifest.start_wal_file
    spool = c.data_dir / "pg_wal" / wal.PREFETCH_DIR
    assert recovery.prime_prefetch(c, env, settings.wal_segment_bytes) is True
    deadline = time.monotonic() + 60
    while (
        not (spool / f"{first}{prefetch.SPOOLED_SUFFIX}").exists() and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert (spool / f"{first}{prefetch.SPOOLED_SUFFIX}").exists(), sorted(
        p.name for p in spool.iterdir()
    )
    assert (spool / first).stat().st_uid == pwd.getpwnam(c.os_user).pw_uid
    assert not c.is_running()
    shutil.rmtree(spool, ignore_errors=True)  # the prefetcher idles out without its spool


def test_recovery_to_a_named_restore_point_is_exact_then_delta_to_the_next(history):
    """A full recovery, then the same copy refreshed by delta to a later point: only what
    differs is rewritten in its own directory, nothing staged or kept beside it."""
    from tasks.pitr import check_request
    from wedefi_dr.errors import InvalidInput

    c = recovered_cluster(history, f"pitr-name-{uuid.uuid4().hex[:6]}")
    recover(ONE, target_kind="name", target_value="before-m4", cluster=c.name)
    assert markers(c.dsn()) == [1, 2, 3]

    other = recovered_cluster(history, f"pitr-other-{uuid.uuid4().hex[:6]}")
    other.fast = True
    other.init()  # a data directory of another system, stopped
    for cluster, becomes_production, message in [
        (c.name, False, "is running: stop it before a delta restore"),
        ("primary", False, "is production"),
        (c.name, True, "a cluster that becomes production"),
        (other.name, False, "holds database system"),
    ]:
        with pytest.raises(InvalidInput, match=message):  # the flow's first step, as it runs
            check_request.fn(
                "name", "after-m4", False, "1", cluster, "op", "why", becomes_production, 60, True
            )
    assert markers(c.dsn()) == [1, 2, 3]
    c.stop()

    result = recover(
        ONE, cluster=c.name, delta=True, target_kind="name", target_value="after-m4", timeline="1"
    )
    assert markers(c.dsn()) == [1, 2, 3, 4]
    assert result["delta"]["written"] > 0 and result["delta"]["kept"] > result["delta"]["written"]
    assert result["kept_aside"] is None and not list(c.home.glob("data.*"))
    assert sql1(c.dsn(), "SELECT pg_is_in_recovery()") is False
    c.stop()


def test_new_timeline_archives_beside_the_old_and_old_timeline_still_recovers(history, store):
    settings = get_settings()
    prefix = wal.archive_prefix(settings) + "/"
    old = {
        o["Key"]: o["ETag"]
        for o in store.list_keys(prefix)
        if o["Key"][len(prefix) :][:8] == "00000001"
    }
    c = recovered_cluster(history, f"pitr-tl-{uuid.uuid4().hex[:6]}")
    clusters = settings.clusters_file
    assert clusters is not None and not read_clusters(clusters)[c.name].production
    try:
        result = recover(
            BREAK_GLASS,
            target_kind="time",
            target_value=history["between_2_and_3"].isoformat(),
            cluster=c.name,
            becomes_production=True,
        )
        described = read_clusters(clusters)
        assert described[c.name].production  # restore policy and break-glass follow it
        assert described["primary"].production  # neither stopped nor fenced: kept
    finally:
        set_roles(clusters, {c.name: {"production": False}})
    assert result["clusters_file"]["changes"] == [f"{c.name}.production: true"]
    with connect(settings.ops_dsn.get_secret_value()) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT status, target, operator_id FROM recovery_audit_log"
            " WHERE recovery_type = 'clusters_file' AND target LIKE %s",
            (f"%{c.name}.production: true%",),
        )
        assert cur.fetchall() == [("success", ANY, "pytest-operator")]
    assert result["timeline"] == 2
    sql1(c.dsn(), "INSERT INTO markers (id) VALUES (100)")
    segment = switch_and_wait_archived(c.dsn())
    assert segment.startswith("00000002")
    names = set(wal.Archive(settings).list_names())
    assert "00000002.history" in names and segment in names
    after = {o["Key"]: o["ETag"] for o in store.list_keys(prefix) if o["Key"] in old}
    assert after == old  # nothing of timeline 1 was overwritten
    c.stop()

    # A point on the old timeline after the fork: recovery follows timeline 1 on request.
    c1 = recovered_cluster(history, f"pitr-tl1-{uuid.uuid4().hex[:6]}")
    recover(ONE, target_kind="name", target_value="after-m4", timeline="1", cluster=c1.name)
    assert markers(c1.dsn()) == [1, 2, 3, 4]
    c1.stop()


def test_missing_segment_stops_recovery_naming_the_gap(history, store, settings):
    """A copy of the archive with the segment of marker 1 missing."""
    src_prefix = history["prefix"]
    gap_prefix = f"{src_prefix}-gap"
    missing = history["segment_of_1"]
    for obj in store.list_keys(src_prefix + "/"):
        key = obj["Key"]
        if key.endswith("/" + missing) or key.endswith("base.tar.gz.gpg"):
            continue  # the base backup's manifest still points at the original object
        store.client.copy_object(
            Bucket=store.bucket,
            Key=gap_prefix + key[len(src_prefix) :],
            CopySource={"Bucket": store.bucket, "Key": key},
        )
    history["env"].set(WEDEFI_DR_PREFIX=gap_prefix)
    try:
        c = recovered_cluster(history, f"pitr-gap-{uuid.uuid4().hex[:6]}")
        with pytest.raises(RecoveryFailed) as err:
            recover(
                ONE,
                target_kind="time",
                target_value=history["between_2_and_3"].isoformat(),
                cluster=c.name,
            )
        assert "GAP" in str(err.value) and missing in str(err.value)
        assert not c.is_running()
        rows = audit_rows(get_settings().ops_dsn.get_secret_value())
        assert rows[-1][1] == "failed" and missing in rows[-1][2]
    finally:
        history["env"].set(WEDEFI_DR_PREFIX=src_prefix)


def test_production_target_with_one_approver_is_refused(history, stack, settings):
    primary = stack.primary
    pid = primary.pid()
    with pytest.raises(ApprovalRefused, match="two distinct approvers"):
        recover(
            {
                "approve": True,
                "approvers": ["alice", "pytest-operator"],
                "emergency_declared": True,
            },
            target_kind="latest",
            cluster="primary",
        )
    assert primary.pid() == pid and primary.is_running()  # untouched
    assert not list(primary.home.glob("data.before-pitr-*"))
    row = audit_rows(settings.ops_dsn.get_secret_value())[-1]
    assert row[1] == "failed" and "two distinct approvers" in row[2]


# ---- the RPO drill -----------------------------------------------------------------------
def _kill_cluster(c: Cluster) -> None:
    """kill -9 the postmaster and every child: what a host crash looks like to the WAL."""
    pid = c.pid()
    assert pid
    children = subprocess.run(
        ["pgrep", "-P", str(pid)], capture_output=True, text=True
    ).stdout.split()
    for p in [pid, *map(int, children)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def test_rpo_drill_kill_9_under_pgbench_then_recover_latest(history, stack):
    """pgbench load, base backup, kill -9, recover 'latest' into a new cluster; the loss
    (seconds of committed transactions) is printed and bounded by archive_timeout."""
    from flows.base_backup import base_backup

    hexid = uuid.uuid4().hex[:6]
    prefix = f"rpo-{hexid}"
    src = source_cluster(stack, f"rposrc-{hexid}", prefix, fast=False)
    history["recovered"].append(src)
    dsn = src.dsn("postgres")
    history["env"].set(WEDEFI_DR_PRIMARY_DSN=dsn, WEDEFI_DR_PREFIX=prefix)
    try:
        bench = [tool("pgbench"), "-h", "127.0.0.1", "-p", str(src.port), "-U", "postgres"]
        env = {**os.environ, "PGPASSWORD": src.password}
        subprocess.run(
            [*bench, "-i", "-s", "2", "-q", "postgres"], env=env, check=True, capture_output=True
        )
        base_backup(operator="pytest")
        load = subprocess.Popen(
            [*bench, "-c", "4", "-T", "30", "-n", "postgres"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(15)
        _kill_cluster(src)
        load.wait(timeout=60)
        c = recovered_cluster(history, f"rpo-rec-{hexid}")
        result = recover(ONE, target_kind="latest", cluster=c.name)
        count = "SELECT max(mtime), count(*) FROM pgbench_history"
        with connect(c.dsn("postgres"), autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(count)
            recovered_last, recovered_rows = cur.fetchone()
        c.stop()
        # The truth: crash-recover the killed cluster from its own pg_wal (not archiving).
        subprocess.run(
            [
                tool("pg_ctl"),
                "-D",
                str(src.data_dir),
                "-l",
                str(src.log),
                "-w",
                "-o",
                f"-p {src.port} -c archive_mode=off",
                "start",
            ],
            check=True,
            capture_output=True,
            cwd="/",
            user="postgres",
            group="postgres",
            extra_groups=[],
        )
        with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(count)
            primary_last, primary_rows = cur.fetchone()
        lost = (primary_last - recovered_last).total_seconds()
        print(
            f"\nRPO drill: {lost:.1f} s and {primary_rows - recovered_rows} of {primary_rows} "
            f"committed transactions lost (archive_timeout 60 s); recovery to latest took "
            f"{result['recovery_seconds']:.1f} s; steps {result['timings']}"
        )
        assert recovered_last is not None and lost >= 0
        assert 0 < recovered_rows <= primary_rows  # a prefix of the history, nothing invented
        assert lost <= 60 + 15, f"lost {lost:.1f} s: more than archive_timeout + margin"
    finally:
        src.stop()
        history["env"].set(WEDEFI_DR_PRIMARY_DSN=history["dsn"], WEDEFI_DR_PREFIX=history["prefix"])


# ---- production: break-glass recovery over the primary of a stack of its own -------------
def test_break_glass_recovery_of_production_keeps_old_data_and_archives_new_timeline(
    prefect_api,
):
    """Recovering over production (a second stack's primary: the session primary serves
    other tests): the old data directory is kept aside, the promoted primary archives on a
    new timeline into the production archive."""
    import shutil
    import tempfile

    from flows.base_backup import base_backup

    root = Path(tempfile.mkdtemp(prefix="wedefi-dr-pitr-prod-"))
    root.chmod(0o755)
    other = Stack(root / "stack", fast=True)
    env = EnvPatch()
    try:
        other.up()
        env.set(**{k: v for k, v in other.env().items() if k != "PREFECT_HOME"})
        dsn = other.primary.dsn("wedefi")
        sql1(dsn, "CREATE TABLE markers (id int PRIMARY KEY)")
        base_backup(operator="pytest")
        sql1(dsn, "INSERT INTO markers VALUES (1)")
        time.sleep(0.2)
        target = sql1(dsn, "SELECT clock_timestamp()")
        time.sleep(0.2)
        sql1(dsn, "INSERT INTO markers VALUES (2)")
        switch_and_wait_archived(dsn)
        archive_env = other.primary.home / archiving.ARCHIVE_ENV_NAME
        production_env = archive_env.read_text()
        env.set(AWS_SESSION_TOKEN="the-workers-short-lived-token")  # never production's

        result = recover(
            BREAK_GLASS, target_kind="time", target_value=target.isoformat(), cluster="primary"
        )
        assert markers(dsn) == [1]
        assert archive_env.read_text() == production_env  # production's settings, as they were
        kept = list(other.primary.home.glob("data.before-pitr-*"))
        assert len(kept) == 1 and result["kept_aside"] == str(kept[0])  # nothing lost
        assert (kept[0] / "PG_VERSION").exists()
        assert sql1(dsn, "SHOW archive_mode") == "on"  # it is production again
        sql1(dsn, "INSERT INTO markers VALUES (3)")
        segment = switch_and_wait_archived(dsn)
        assert segment.startswith("00000002")
        names = set(wal.Archive(get_settings()).list_names())
        assert {"00000002.history", segment} <= names
    finally:
        env.restore()
        other.down()
        shutil.rmtree(root, ignore_errors=True)


# ---- bad input: refused with a specific message, before anything ----------------------
@pytest.mark.parametrize(
    ("kind", "value", "timeline", "message"),
    [
        ("yesterday", "", "latest", "target kind must be one of"),
        ("time", "2026-11-24 14:05", "latest", "needs a time zone"),
        ("time", "last tuesday", "latest", "not ISO 8601"),
        ("lsn", "5A000028", "latest", "not of the form"),
        ("name", "", "latest", "needs its name"),
        ("name", "before\nm4", "latest", "control character or a backslash"),
        ("name", "before\\m4", "latest", "control character or a backslash"),
        ("latest", "now", "latest", "takes no value"),
        ("latest", "", "newest", "timeline must be"),
    ],
)
def test_bad_targets_are_refused_with_the_reason(kind, value, timeline, message):
    from wedefi_dr.errors import InvalidInput
    from wedefi_dr.physical.pitr.target import RecoveryTarget

    with pytest.raises(InvalidInput, match=message):
        RecoveryTarget.parse(kind, value, timeline=timeline)


@pytest.mark.parametrize(
    ("production", "approval", "message"),
    [
        (False, {"approve": False, "approvers": ["alice"]}, "rejected"),
        (False, {"approve": True, "approvers": ["op", " OP "]}, "one approver other than"),
        (True, {"approve": True, "approvers": ["alice", "bob"]}, "emergency must be declared"),
        (
            True,
            {"approve": True, "approvers": ["alice", "Alice"], "emergency_declared": True},
            "two distinct approvers",
        ),
    ],
)
def test_approval_rules(production, approval, message):
    from wedefi_dr.physical.pitr.approval import check_approval

    with pytest.raises(ApprovalRefused, match=message):
        check_approval(
            production=production,
            approve=approval["approve"],
            approvers=approval["approvers"],
            emergency_declared=approval.get("emergency_declared", False),
            operator="op",
        )
    assert check_approval(
        production=production,
        approve=True,
        approvers=["alice", "bob"],
        emergency_declared=True,
        operator="op",
    ) == ["alice", "bob"]


@pytest.mark.parametrize("name", ["ops", "Primary", "../etc", ""])
def test_reserved_or_malformed_cluster_names_are_refused(name):
    from wedefi_dr.errors import InvalidInput
    from wedefi_dr.physical.pitr.approval import validate_cluster_name

    with pytest.raises(InvalidInput):
        validate_cluster_name(name)


# ---- what PITR restores is what this system wrote; a failure puts the cluster back ------
def live_cluster(history: dict, name: str) -> Cluster:
    """A running cluster with data of its own: what a recovery must not lose or stop."""
    c = recovered_cluster(history, name)
    c.fast = True
    c.init()
    c.start()
    sql1(c.dsn(), "CREATE TABLE own (id int PRIMARY KEY)")
    sql1(c.dsn(), "INSERT INTO own SELECT generate_series(1, 7)")
    return c


def own_rows(c: Cluster) -> list[int]:
    with connect(c.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM own ORDER BY id")
        return [r[0] for r in cur.fetchall()]


def forge_base_backup(history: dict, store, planted: str | None, *, fix_plaintext_sum: bool) -> str:
    """A copy of the archive whose base backup carries ``planted`` appended to its
    ``postgresql.auto.conf`` (None: one data file under ``base/`` changed instead),
    re-encrypted with the real passphrase and its manifest re-signed: every object checksum
    and MAC is consistent; only the plaintext sha256 (unless ``fix_plaintext_sum``) and
    the backup_manifest checks can tell."""
    import gzip
    import io
    import tarfile

    from wedefi_dr.catalog import listing
    from wedefi_dr.catalog.manifest import ObjectInfo
    from wedefi_dr.physical import basebackup
    from wedefi_dr.storage import encryption
    from wedefi_dr.storage.s3 import ObjectStore

    src_prefix = history["prefix"]
    forged_prefix = f"{src_prefix}-forged-{uuid.uuid4().hex[:4]}"
    for obj in store.list_keys(src_prefix + "/"):
        key = obj["Key"]
        if "/wal/" in key:  # a base backup of its own; WAL copied as it is
            store.client.copy_object(
                Bucket=store.bucket,
                Key=forged_prefix + key[len(src_prefix) :],
                CopySource={"Bucket": store.bucket, "Key": key},
            )
    history["env"].set(WEDEFI_DR_PREFIX=src_prefix)
    settings = get_settings()
    original = basebackup.list_base_backups(ObjectStore(settings))[0]
    body = store.client.get_object(Bucket=store.bucket, Key=original.object.key)["Body"].read()
    cipher_in = Path(settings.spool_path) / f"forge-{uuid.uuid4().hex[:6]}.gpg"
    cipher_in.parent.mkdir(parents=True, exist_ok=True)
    cipher_in.write_bytes(body)
    passphrase = settings.gpg_passphrase.get_secret_value()
    try:
        packed, _ = encryption.start_decrypt(passphrase, cipher_in).communicate()
    finally:
        cipher_in.unlink()
    unpack = basebackup.decompressor_argv(basebackup.compression_of(original))
    if unpack is None:
        raw = gzip.decompress(packed)
    else:
        raw = subprocess.run(unpack, input=packed, capture_output=True, check=True).stdout
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(raw)) as src,
        tarfile.open(fileobj=out, mode="w") as dst,
    ):
        flipped = False
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if planted is not None and member.name == "postgresql.auto.conf":
                data += planted.encode()
                member.size = len(data)
            if planted is None and not flipped and member.name.startswith("base/") and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
                flipped = True
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    tar = out.getvalue()
    params = encryption.GpgParams.from_settings(settings, compress_algo="none")
    cipher, _ = encryption.start_encrypt(passphrase, params).communicate(gzip.compress(tar))

    history["env"].set(WEDEFI_DR_PREFIX=forged_prefix)
    forged_store = ObjectStore(get_settings())
    key = basebackup.data_key(forged_store, original.backup_id)
    store.client.put_object(Bucket=store.bucket, Key=key, Body=cipher)
    import hashlib

    update: dict = {
        "object": ObjectInfo.stored(
            forged_store, key, len(cipher), hashlib.sha256(cipher).hexdigest()
        ),
        "compression": "gzip -1",  # re-packed as gzip: the earlier format stays readable
    }
    if fix_plaintext_sum:
        update["plaintext_sha256"] = hashlib.sha256(tar).hexdigest()
        update["plaintext_size_bytes"] = len(tar)
    listing.put_manifest(
        forged_store,
        basebackup.manifest_key(forged_store, original.backup_id),
        original.model_copy(update=update),
    )
    return forged_prefix


@pytest.mark.parametrize(
    ("plant", "fix_plaintext_sum", "check"),
    [
        (True, False, "plaintext check failed"),
        (True, True, "postgresql.auto.conf check failed"),
        (False, True, "pg_verifybackup check failed"),
    ],
)
def test_forged_base_backup_is_refused_before_the_cluster_is_stopped(
    history, store, tmp_path, plant, fix_plaintext_sum, check
):
    """A re-encrypted, re-signed base backup (a planted archive_command, or a changed data
    file): refused by the named check while the cluster still runs; its data untouched,
    the planted command never run."""
    from wedefi_dr.errors import IntegrityError  # the refusal is its BaseBackupRefused

    pwned = tmp_path / "pwned"
    tmp_path.chmod(0o777)
    planted = f"\narchive_mode = on\narchive_command = 'touch {pwned}'\n" if plant else None
    prefix = forge_base_backup(history, store, planted, fix_plaintext_sum=fix_plaintext_sum)
    c = live_cluster(history, f"pitr-forged-{uuid.uuid4().hex[:6]}")
    pid = c.pid()
    try:
        with pytest.raises(IntegrityError, match=check):
            recover(ONE, target_kind="latest", cluster=c.name)
        assert c.is_running() and c.pid() == pid  # never stopped
        assert own_rows(c) == [1, 2, 3, 4, 5, 6, 7]
        assert not list(c.home.glob("data.*"))  # no staging left, nothing moved aside
        assert not pwned.exists()
        row = audit_rows(get_settings().ops_dsn.get_secret_value())[-1]
        assert row[1] == "failed" and check in row[2]
    finally:
        c.stop()
        history["env"].set(WEDEFI_DR_PREFIX=history["prefix"])
        assert prefix != history["prefix"]


def test_failure_after_the_stop_rolls_back_to_the_running_original(history, tmp_path):
    """A drill fault once the recovered server runs: the original data directory is back,
    started, with its own rows; the failed recovery is kept aside; the audit says so."""
    from wedefi_dr.runbook import PITR

    c = live_cluster(history, f"pitr-rollback-{uuid.uuid4().hex[:6]}")
    marker = tmp_path / "fault-once"
    marker.write_text("")
    history["env"].set(
        WEDEFI_DR_DR_DRILL_FAULT_STEP=PITR.VALIDATE.value,
        WEDEFI_DR_DR_DRILL_FAULT_MARKER=str(marker),
    )
    try:
        with pytest.raises(RecoveryFailed, match="rolled back") as err:  # RolledBack
            recover(
                ONE,
                target_kind="time",
                target_value=history["between_2_and_3"].isoformat(),
                cluster=c.name,
            )
        assert "injected fault" in str(err.value)
        assert c.is_running()
        assert own_rows(c) == [1, 2, 3, 4, 5, 6, 7]
        failed = list(c.home.glob("data.failed-pitr-*"))
        assert len(failed) == 1 and (failed[0] / "recovery.signal").exists()
        assert not list(c.home.glob("data.before-pitr-*"))
        row = audit_rows(get_settings().ops_dsn.get_secret_value())[-1]
        assert row[1] == "failed" and "rolled back" in row[2]
        # The kept recovery replays again with the archiver's credential, never the worker's.
        restore_env = (c.home / archiving.RESTORE_ENV_NAME).read_text()
        archiver_key = get_settings().wal_archiver_aws_access_key_id.get_secret_value()
        assert f"AWS_ACCESS_KEY_ID={archiver_key}\n" in restore_env
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in restore_env
    finally:
        history["env"].set(WEDEFI_DR_DR_DRILL_FAULT_STEP="", WEDEFI_DR_DR_DRILL_FAULT_MARKER="")
        c.stop()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"target_kind": "lsn", "target_value": "FF/0"}, "beyond the newest archived WAL"),
        ({"target_kind": "latest", "timeline": "7"}, "00000007.history is not in the archive"),
    ],
)
def test_targets_the_archive_cannot_reach_are_refused_before_approval(history, params, message):
    """Refused by the request check: no pause, no audit row, nothing touched."""
    before = audit_rows(get_settings().ops_dsn.get_secret_value())
    with pytest.raises(TargetOutsideWindow, match=message):
        c = recovered_cluster(history, f"pitr-never-{uuid.uuid4().hex[:6]}")
        recover(None, cluster=c.name, approval_timeout_seconds=5, **params)
    assert audit_rows(get_settings().ops_dsn.get_secret_value()) == before


def test_approval_timeout_is_audited_and_changes_nothing(history):
    from wedefi_dr.errors import DRError  # ApprovalTimedOut

    c = live_cluster(history, f"pitr-timeout-{uuid.uuid4().hex[:6]}")
    pid = c.pid()
    try:
        with pytest.raises(DRError, match="approval timed out"):
            recover(None, target_kind="latest", cluster=c.name, approval_timeout_seconds=3)
        assert c.pid() == pid and own_rows(c) == [1, 2, 3, 4, 5, 6, 7]
        row = audit_rows(get_settings().ops_dsn.get_secret_value())[-1]
        assert row[1] == "failed" and "approval timed out" in row[2]
    finally:
        c.stop()


@pytest.mark.parametrize(
    ("operator", "message"),
    [("o" * 101, "101 characters long"), ("ops\x1b[31mforged", "control character (U+001B)")],
)
def test_operator_the_audit_cannot_keep_is_refused_first(history, operator, message):
    """Refused by the request check before anything else: no pause, no audit row."""
    from tasks import failover
    from wedefi_dr.errors import InvalidInput

    before = audit_rows(get_settings().ops_dsn.get_secret_value())
    with pytest.raises(InvalidInput, match=re.escape(message)):
        recover(None, operator=operator, target_kind="latest", cluster="pitr-never")
    assert audit_rows(get_settings().ops_dsn.get_secret_value()) == before
    with pytest.raises(InvalidInput, match=re.escape(message)):  # the failover's first step
        failover.check_request.fn("pitr-never", "pitr-never-2", operator, "why")


@pytest.mark.parametrize("seconds", [0, 8 * 24 * 3600])
def test_approval_timeout_outside_its_range_is_refused_before_the_pause(history, seconds):
    from wedefi_dr.errors import InvalidInput

    c = recovered_cluster(history, f"pitr-never-{uuid.uuid4().hex[:6]}")
    with pytest.raises(InvalidInput, match="approval_timeout_seconds must be"):
        recover(None, target_kind="latest", cluster=c.name, approval_timeout_seconds=seconds)
