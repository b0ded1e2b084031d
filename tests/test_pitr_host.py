"""PITR of a cluster the local stack did not create, as on a real host.

The test makes its own cluster in its own folder (initdb as the server's OS user), wires its
``archive_command`` from the settings, and describes it to the system only through the
settings: a clusters file named by ``WEDEFI_DR_CLUSTERS_FILE``, as an operator would write
it, with the host's own start and stop commands and ``production: true``. The session stack
serves only as the object store and the ops database.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.test_pitr import BREAK_GLASS, ONE, EnvPatch, markers, recover, sql1
from tests.test_pitr import switch_and_wait_archived as archived
from wedefi_dr.config import get_settings
from wedefi_dr.physical import archiving
from wedefi_dr.physical.pitr.approval import ApprovalRefused
from wedefi_dr.postgres.cluster import cluster_handle, free_port, read_clusters
from wedefi_dr.postgres.tools import running_as_root, tool

CTL = """#!/bin/sh
# The host's own server control (a stand-in for systemctl): logs each call, then pg_ctl.
echo "$1" >> {calls}
case "$1" in
  start) set -- -l {log} -w -t 60 -o "-p {port}" start ;;
  *) set -- -m fast -w stop ;;
esac
exec {as_postgres} {pg_ctl} -D {data} "$@"
"""


@pytest.fixture
def host(settings, prefect_api):
    """A folder of its own, as a host's /var/lib/postgresql would be."""
    root = Path(tempfile.mkdtemp(prefix="wedefi-dr-host-"))
    root.chmod(0o755)
    env = EnvPatch()
    box: dict = {"root": root, "env": env}
    try:
        yield box
    finally:
        if "handle" in box:
            box["handle"].stop()
        env.restore()
        shutil.rmtree(root, ignore_errors=True)


def test_pitr_of_a_cluster_described_only_by_settings(host, settings):
    root: Path = host["root"]
    name = f"host-{uuid.uuid4().hex[:6]}"
    home, port, calls = root / "pg", free_port(), root / "ctl.calls"
    ctl = root / "ctl.sh"
    ctl.write_text(
        CTL.format(
            calls=calls,
            log=home / "postgresql.log",
            port=port,
            as_postgres="runuser -u postgres --" if running_as_root() else "",
            pg_ctl=tool("pg_ctl"),
            data=home / "data",
        )
    )
    clusters = root / "clusters.yaml"
    clusters.write_text(
        f"{name}:\n"
        f"  data_dir: {home / 'data'}\n"
        f"  port: {port}\n"
        f"  log_file: {home / 'postgresql.log'}\n"
        f"  start_command: [sh, {ctl}, start]\n"
        f"  stop_command: [sh, {ctl}, stop]\n"
        "  production: true\n"
    )
    password = secrets.token_urlsafe(16)
    pgpass = root / "pgpass"
    pgpass.write_text(
        f"127.0.0.1:{port}:*:postgres:{password}\n" + Path(os.environ["PGPASSFILE"]).read_text()
    )
    pgpass.chmod(0o600)
    prefix = f"host-{uuid.uuid4().hex[:6]}"
    host["env"].set(
        WEDEFI_DR_CLUSTERS_FILE=str(clusters),
        WEDEFI_DR_PRIMARY_DSN=f"host=127.0.0.1 port={port} user=postgres dbname=postgres",
        WEDEFI_DR_PREFIX=prefix,
        WEDEFI_DR_PITR_REPLAY_TIMEOUT_SECONDS="120",
        WEDEFI_DR_DR_RTO_OBJECTIVE_SECONDS="600",
        PGPASSFILE=str(pgpass),
    )

    # The operator's side: a cluster made by hand, archiving as the settings say.
    handle = cluster_handle(get_settings().clusters_file, name)
    env_file = archiving.write_wal_env(get_settings(), home / archiving.ARCHIVE_ENV_NAME)
    handle.initdb(password, archiving.archiving_conf(env_file), fast=True)
    handle.start()
    host["handle"] = handle
    dsn = handle.dsn()

    from flows.base_backup import base_backup

    sql1(dsn, "CREATE TABLE markers (id int PRIMARY KEY)")
    base_backup(operator="pytest")
    sql1(dsn, "INSERT INTO markers VALUES (1)")
    time.sleep(0.3)
    target = sql1(dsn, "SELECT clock_timestamp()")
    time.sleep(0.3)
    sql1(dsn, "INSERT INTO markers VALUES (2)")
    archived(dsn)

    # Production because its description says so: one approver is not enough.
    pid = handle.pid()
    with pytest.raises(ApprovalRefused, match="emergency must be declared"):
        recover(ONE, target_kind="time", target_value=target.isoformat(), cluster=name)
    assert handle.pid() == pid and not list(home.glob("data.before-pitr-*"))

    calls.unlink()
    result = recover(BREAK_GLASS, target_kind="time", target_value=target.isoformat(), cluster=name)
    assert markers(dsn) == [1]  # the row before the target is there, the one after is not
    assert sql1(dsn, "SELECT pg_is_in_recovery()") is False
    assert result["timeline"] == 2 and result["port"] == port
    assert calls.read_text().split() == ["stop", "start"]  # the host's commands, not pg_ctl
    kept = list(home.glob("data.before-pitr-*"))
    assert len(kept) == 1 and result["kept_aside"] == str(kept[0])
    assert sql1(dsn, "SHOW archive_mode") == "on"  # it is production again
    assert not (home / archiving.RESTORE_ENV_NAME).exists()  # replay is over
    assert set(result["timings"]) >= {"approval", "validate the recovered data"}
    report = latest_pitr_report()
    assert f"of {name}: promoted" in report and "of the 600 s RTO objective" in report
    assert "| start the server and wait for replay to reach the target |" in report


def latest_pitr_report() -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pitr-report"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    return str(artifacts[0].data)


def test_the_stack_describes_its_clusters_the_same_way_without_secrets(stack, settings):
    """The stack is one more writer of the clusters file: production is its primary."""
    assert settings.clusters_file == stack.clusters_file
    described = read_clusters(stack.clusters_file)
    assert described["primary"].production and described["primary"].port == stack.primary.port
    assert not described["pitr-scratch"].production
    text = stack.clusters_file.read_text()
    assert stack.primary.password not in text and "password" not in text
