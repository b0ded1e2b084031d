"""The fleet backup: three databases on two clusters, one of which cannot be backed up.

The stack's primary plus a second cluster started here (a real initdb/pg_ctl through the
stack's cluster handle). The two good databases complete, each in its own catalog; the
failing one is named in the run's error and its audit row; the run ends Failed.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator

import pytest
import yaml

from flows.backup import fleet_backup
from wedefi_dr.catalog import listing
from wedefi_dr.errors import BackupFailed, InvalidInput
from wedefi_dr.fleet import load_fleet
from wedefi_dr.postgres.tools import connect
from wedefi_dr.storage.s3 import ObjectStore


@pytest.fixture(scope="module")
def second_cluster(stack) -> Iterator:
    c = stack.cluster(f"fleet-{uuid.uuid4().hex[:4]}")
    c.fast = True
    c.init()
    c.start()
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.home, ignore_errors=True)


def _small_database(cluster, name: str) -> str:
    cluster.create_database(name)
    with connect(cluster.admin_dsn(name)) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        cur.execute("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 500) g")
    return cluster.dsn(name)


def test_fleet_backs_up_the_rest_and_names_the_failure(
    stack, settings, prefect_api, second_cluster, tmp_path
):
    tag = uuid.uuid4().hex[:6]
    entries = [
        ("a", "primary", _small_database(stack.primary, f"fleet_a_{tag}")),
        ("b", "second", _small_database(second_cluster, f"fleet_b_{tag}")),
        ("gone", "second", second_cluster.dsn(f"fleet_gone_{tag}")),  # no such database
    ]
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(
        yaml.safe_dump(
            {
                "hosts": {
                    "primary": {"max_concurrent_backups": 1},
                    "second": {"max_concurrent_backups": 2},
                },
                "databases": [
                    {"name": f"{n}-{tag}", "host": h, "dsn": d, "prefix": f"fleet/{tag}/{n}"}
                    for n, h, d in entries
                ],
            }
        )
    )
    state = fleet_backup(str(fleet_file), operator="pytest-fleet", return_state=True)
    assert state.is_failed()
    with pytest.raises(BackupFailed) as err:
        state.result()
    message = str(err.value)
    assert f"gone-{tag} failed" in message and "fleet_gone" in message
    assert f"completed: a-{tag}, b-{tag}" in message
    for name in ("a", "b"):
        store = ObjectStore(settings.model_copy(update={"prefix": f"fleet/{tag}/{name}"}))
        [manifest] = listing.list_backups(store)
        assert manifest.total_rows == 500
    store = ObjectStore(settings.model_copy(update={"prefix": f"fleet/{tag}/gone"}))
    assert listing.list_backups(store) == []
    with connect(settings.ops_dsn.get_secret_value()) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT status, error_message FROM backup_audit_log WHERE operator_id = 'pytest-fleet'"
            " ORDER BY status"
        )
        rows = cur.fetchall()
    assert [r[0] for r in rows] == ["failed", "success", "success"]
    assert rows[0][1].startswith(f"gone-{tag}: ")


def test_a_bad_fleet_file_is_refused_before_anything_runs(tmp_path):
    bad = tmp_path / "fleet.yaml"
    bad.write_text(
        "databases:\n  - {name: a, host: h, dsn: 'host=x dbname=a password=hunter2', prefix: a}\n"
    )
    with pytest.raises(InvalidInput, match="password"):
        load_fleet(bad)
    bad.write_text(
        "databases:\n"
        "  - {name: a, host: h, dsn: 'host=x dbname=a', prefix: p}\n"
        "  - {name: b, host: h, dsn: 'host=x dbname=b', prefix: p}\n"
    )
    with pytest.raises(InvalidInput, match="own catalog prefix"):
        load_fleet(bad)
    assert load_fleet("deployments/fleet.yaml").databases[0].dsn_env == "WEDEFI_DR_PRIMARY_DSN"
