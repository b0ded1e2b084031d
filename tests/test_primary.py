"""The primary followed through a failover: the resolver's rules on clusters files alone.

No server is needed: the rules read only the DSN and the clusters file. That backups and
monitoring really use the resolver after a real failover is shown at the end of
tests/test_standby.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from psycopg2.extensions import parse_dsn
from pydantic import SecretStr

from wedefi_dr.config import Settings
from wedefi_dr.errors import InvalidInput
from wedefi_dr.postgres import clusters_file
from wedefi_dr.postgres.cluster import ClusterHandle, ClustersFileInvalid, write_clusters
from wedefi_dr.postgres.primary import PrimaryUnresolved, current_primary, primary_dsn, resolve

OLD_PORT, NEW_PORT, OTHER_PORT = 5432, 5433, 5434
DSN = (
    f"host=127.0.0.1 port={OLD_PORT} user=backup_operator dbname=wedefi "
    "passfile=/etc/wedefi/pgpass sslmode=require application_name=nightly"
)


def write(tmp_path: Path, **roles: dict) -> Path:
    """A clusters file of ``old`` (5432), ``new`` (5433) and ``other`` (5434) with ``roles``."""
    ports = {"old": OLD_PORT, "new": NEW_PORT, "other": OTHER_PORT}
    handles = {
        name: ClusterHandle(
            name=name, data_dir=tmp_path / name / "data", port=port, **roles.get(name, {})
        )
        for name, port in ports.items()
    }
    path = tmp_path / "clusters.json"
    write_clusters(path, handles)
    return path


@pytest.fixture
def failed_over(tmp_path: Path) -> Path:
    """The file as the failover flow leaves it: old fenced, new production."""
    path = write(tmp_path, old={"production": True})
    clusters_file.after_failover(path, "old", "new")
    return path


def test_after_a_failover_the_dsn_follows_to_the_new_primary_keeping_every_other_key(
    failed_over: Path,
) -> None:
    chosen = resolve(DSN, failed_over)
    assert (chosen.cluster, chosen.followed_from) == ("new", "old")
    params = parse_dsn(chosen.dsn)
    assert (params["host"], params["port"]) == ("127.0.0.1", str(NEW_PORT))
    before = parse_dsn(DSN)
    for key in ("user", "dbname", "passfile", "sslmode", "application_name"):
        assert params[key] == before[key]
    assert "fenced by a failover" in chosen.note and f"127.0.0.1:{NEW_PORT}" in chosen.note


def test_a_rejoined_old_primary_is_followed_too_a_standby_is_not_what_is_backed_up(
    failed_over: Path,
) -> None:
    clusters_file.after_rejoin(failed_over, "old")
    chosen = resolve(DSN, failed_over)
    assert chosen.cluster == "new" and chosen.why == "replaced by a failover"


def test_another_non_production_cluster_is_used_as_written(tmp_path: Path) -> None:
    """A fleet database on a cluster the file describes but does not mark production (no
    failover replaced it) stays where the operator pointed, whatever else is production."""
    path = write(tmp_path, new={"production": True})
    assert resolve(DSN, path).dsn == DSN


def test_the_recorded_successor_is_followed_among_several_production_clusters(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, old={"production": True}, other={"production": True})
    clusters_file.after_failover(path, "old", "new")
    assert resolve(DSN, path).cluster == "new"


def test_two_failovers_in_a_row_lead_to_the_last_primary(tmp_path: Path) -> None:
    path = write(tmp_path, old={"production": True})
    clusters_file.after_failover(path, "old", "new")
    clusters_file.after_rejoin(path, "old")
    clusters_file.after_failover(path, "new", "other")
    chosen = resolve(DSN, path)
    assert (chosen.cluster, parse_dsn(chosen.dsn)["port"]) == ("other", str(OTHER_PORT))


def test_failing_back_makes_the_old_primary_the_primary_again(failed_over: Path) -> None:
    clusters_file.after_rejoin(failed_over, "old")
    clusters_file.after_failover(failed_over, "new", "old")
    chosen = resolve(DSN, failed_over)
    assert chosen.dsn == DSN and not chosen.followed
    new_dsn = f"host=127.0.0.1 port={NEW_PORT} dbname=wedefi"
    assert resolve(new_dsn, failed_over).cluster == "old"


def test_a_password_in_the_setting_stays_in_the_dsn_and_out_of_the_note(
    failed_over: Path,
) -> None:
    chosen = resolve(f"{DSN} password=s3cret-pw", failed_over)
    assert parse_dsn(chosen.dsn)["password"] == "s3cret-pw"
    assert "s3cret-pw" not in chosen.note and "s3cret-pw" not in repr(chosen)


def test_a_socket_directory_dsn_moves_to_the_new_clusters_socket(failed_over: Path) -> None:
    old_sockets = failed_over.parent / "old"
    chosen = resolve(f"host={old_sockets} port={OLD_PORT} dbname=wedefi", failed_over)
    params = parse_dsn(chosen.dsn)
    assert (params["host"], params["port"]) == (str(failed_over.parent / "new"), str(NEW_PORT))


def test_localhost_names_the_loopback_cluster_and_hostaddr_is_what_libpq_connects_to(
    failed_over: Path,
) -> None:
    assert resolve(f"host=localhost port={OLD_PORT}", failed_over).cluster == "new"
    chosen = resolve(f"host=db.example hostaddr=127.0.0.1 port={OLD_PORT}", failed_over)
    params = parse_dsn(chosen.dsn)
    assert "hostaddr" not in params and params["port"] == str(NEW_PORT)


@pytest.mark.parametrize(
    "dsn",
    [
        f"host=127.0.0.1 port={NEW_PORT} dbname=wedefi",  # already the production cluster
        "host=db.internal port=5432 dbname=wedefi",  # a name the file does not describe
        "host=127.0.0.1 port=6000 dbname=wedefi",  # a port the file does not describe
        f"host=127.0.0.1,127.0.0.2 port={OLD_PORT} target_session_attrs=read-write",
        "service=wedefi dbname=wedefi",  # the service file chooses the host
    ],
)
def test_dsns_the_file_does_not_redirect_are_used_as_written(failed_over: Path, dsn: str) -> None:
    chosen = resolve(dsn, failed_over)
    assert chosen.dsn == dsn and not chosen.followed


def test_without_a_clusters_file_the_dsn_is_used_as_written() -> None:
    assert resolve(DSN, None).dsn == DSN


def test_a_file_that_marks_no_cluster_production_leaves_an_unfenced_dsn_alone(
    tmp_path: Path,
) -> None:
    assert resolve(DSN, write(tmp_path)).dsn == DSN


@pytest.mark.parametrize(
    ("roles", "words"),
    [
        # fenced by hand, and no cluster is production
        ({"old": {"fenced": True}}, "production: none"),
        # fenced by hand, and two clusters claim to be production
        (
            {"old": {"fenced": True}, "new": {"production": True}, "other": {"production": True}},
            "production: new, other",
        ),
        # the recorded successor is not production (any more)
        ({"old": {"fenced": True, "replaced_by": "new"}}, "new is not an unfenced production"),
        # the chain names a cluster the file does not describe, or loops
        ({"old": {"fenced": True, "replaced_by": "gone"}}, "is broken"),
        (
            {"old": {"fenced": True, "replaced_by": "new"}, "new": {"replaced_by": "old"}},
            "is broken",
        ),
    ],
)
def test_a_demoted_cluster_with_no_successor_to_follow_is_refused(
    tmp_path: Path,
    roles: dict,
    words: str,
) -> None:
    with pytest.raises(PrimaryUnresolved, match=words) as info:
        resolve(DSN, write(tmp_path, **roles))
    assert isinstance(info.value, InvalidInput)  # the CLI's bad-input exit code, 2


def test_a_hand_fenced_cluster_follows_the_one_production_cluster(tmp_path: Path) -> None:
    path = write(tmp_path, old={"fenced": True}, other={"production": True})
    chosen = resolve(DSN, path)
    assert chosen.cluster == "other" and chosen.why == "fenced by a failover"


def test_a_fenced_production_cluster_is_not_a_successor(tmp_path: Path) -> None:
    path = write(tmp_path, old={"fenced": True}, new={"production": True, "fenced": True})
    with pytest.raises(PrimaryUnresolved, match="production: none"):
        resolve(DSN, path)


def test_a_configured_clusters_file_that_is_missing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ClustersFileInvalid):
        resolve(DSN, tmp_path / "absent.yaml")


def test_the_choice_is_logged_once_per_process(
    failed_over: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(primary_dsn=SecretStr(DSN), clusters_file=failed_over)
    with caplog.at_level(logging.WARNING, logger="wedefi_dr.postgres.primary"):
        for _ in range(3):
            assert parse_dsn(primary_dsn(settings))["port"] == str(NEW_PORT)
    said = [r.getMessage() for r in caplog.records if r.name == "wedefi_dr.postgres.primary"]
    assert len(said) == 1 and "connecting to the production cluster new" in said[0]
    assert current_primary(settings).cluster == "new"
