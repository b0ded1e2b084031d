"""Cluster handles and the clusters file: what a description may say, and what it means.

No server is needed: these check the refusals (before any side effect) and the rule that a
second name for production's data directory is production too.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from wedefi_dr.config import PROJECT_ROOT
from wedefi_dr.errors import InvalidInput
from wedefi_dr.postgres.cluster import (
    ClusterHandle,
    ClustersFileInvalid,
    UnknownCluster,
    cluster_handle,
    read_clusters,
    write_clusters,
)


def write(path: Path, body: dict) -> Path:
    path.write_text(json.dumps(body))
    return path


def test_a_described_cluster_comes_back_with_its_defaults(tmp_path: Path) -> None:
    f = tmp_path / "clusters.yaml"
    f.write_text(
        "main:\n"
        "  data_dir: /var/lib/postgresql/15/main\n"
        "  port: 5432\n"
        "  socket_dir: /var/run/postgresql\n"
        "  start_command: [systemctl, start, postgresql@15-main]\n"
        "  production: true\n"
    )
    h = cluster_handle(f, "main")
    assert h.production and h.start_command == ["systemctl", "start", "postgresql@15-main"]
    assert h.home == Path("/var/lib/postgresql/15")
    assert h.log == Path("/var/lib/postgresql/15/server.log")
    assert h.sockets == Path("/var/run/postgresql")
    assert h.dsn("wedefi") == "host=127.0.0.1 port=5432 user=postgres dbname=wedefi"


def test_written_and_read_back_is_the_same_handle(tmp_path: Path) -> None:
    h = ClusterHandle(name="a", data_dir=tmp_path / "a" / "data", port=5999, production=True)
    write_clusters(tmp_path / "c.json", {"a": h})
    assert read_clusters(tmp_path / "c.json") == {"a": h}


def test_a_second_name_for_production_data_is_production(tmp_path: Path) -> None:
    f = write(
        tmp_path / "c.json",
        {
            "primary": {"data_dir": "/srv/pg/main", "port": 5432, "production": True},
            "scratch": {"data_dir": "/srv/pg/../pg/main", "port": 5433},
            "other": {"data_dir": "/srv/pg/other", "port": 5434},
        },
    )
    handles = read_clusters(f)
    assert handles["scratch"].production is True
    assert handles["other"].production is False


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"x": {"port": 5432}}, "cluster 'x'.*data_dir"),
        ({"x": {"data_dir": "/d", "port": "high"}}, "cluster 'x'.*port"),
        ({"x": {"data_dir": "/d", "port": 5432, "pasword": "s"}}, "cluster 'x'.*pasword"),
        ({"x": "/d"}, "'x' is not a mapping"),
        (["x"], "expected a mapping"),
    ],
)
def test_malformed_descriptions_are_refused_with_the_reason(tmp_path, body, message) -> None:
    with pytest.raises(ClustersFileInvalid, match=message):
        read_clusters(write(tmp_path / "c.json", body))


def test_unknown_cluster_and_missing_file_are_refused(tmp_path: Path) -> None:
    f = write(tmp_path / "c.json", {"a": {"data_dir": "/d", "port": 5432}})
    with pytest.raises(UnknownCluster, match="'b' is not described.*described: a"):
        cluster_handle(f, "b")
    with pytest.raises(UnknownCluster, match="WEDEFI_DR_CLUSTERS_FILE"):
        cluster_handle(None, "a")
    with pytest.raises(ClustersFileInvalid, match="nope.json"):
        cluster_handle(tmp_path / "nope.json", "a")


def test_a_bad_stop_mode_is_refused_before_touching_the_server(tmp_path: Path) -> None:
    h = ClusterHandle(name="a", data_dir=tmp_path / "data", port=5999)
    with pytest.raises(InvalidInput, match="stop mode"):
        h.stop("now")


def test_production_code_never_imports_the_dev_package() -> None:
    """The core, the tasks and the flows work on real hosts: the dev stack is optional."""
    offenders = []
    for top in ("wedefi_dr", "tasks", "flows"):
        for path in (PROJECT_ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                offenders += [
                    f"{path.relative_to(PROJECT_ROOT)}: {n}"
                    for n in names
                    if n.split(".")[0] == "wedefi_dr_dev"
                ]
    assert offenders == []
