"""The local stack starts idempotently and stops exactly what it started."""

from __future__ import annotations

import getpass
import stat
import tempfile
from pathlib import Path

from wedefi_dr_dev.stack import Stack, pid_alive


def test_stack_up_is_idempotent_and_down_stops_by_pid(stack: Stack):
    root = Path(tempfile.mkdtemp(prefix="wedefi-dr-stack-"))
    root.chmod(0o755)
    other = Stack(root, fast=True, control_plane=False)  # its Prefect: test_control_plane
    other.up()
    pids = [
        other.primary.pid(),
        other.ops.pid(),
        other.state["s3_pid"],
        other.state["pushgateway_pid"],
    ]
    assert all(pid_alive(p) for p in pids)
    other.up()  # again: nothing restarted
    assert [
        other.primary.pid(),
        other.ops.pid(),
        other.state["s3_pid"],
        other.state["pushgateway_pid"],
    ] == pids
    assert other.env()["WEDEFI_DR_PUSHGATEWAY_URL"] == other.pushgateway_url
    assert set(other.env()) >= {
        "WEDEFI_DR_PRIMARY_DSN",
        "WEDEFI_DR_OPS_DSN",
        "WEDEFI_DR_AWS_ENDPOINT_URL",
        "WEDEFI_DR_GPG_PASSPHRASE",
    }
    assert "password" not in other.env()["WEDEFI_DR_PRIMARY_DSN"]
    # A cluster recovered into by PITR lives in the stack's folder: down stops it too.
    recovered = other.cluster("recovered-by-pitr")
    recovered.init()
    recovered.start()
    pids.append(recovered.pid())
    assert "postgres recovered-by-pitr" in other.status()
    stopped = other.down()
    assert sorted(stopped) == sorted(
        [
            "postgres primary",
            "postgres ops",
            "postgres recovered-by-pitr",
            "s3 (moto)",
            "pushgateway",
        ]
    )
    assert not any(pid_alive(p) for p in pids)
    # The session's own stack is untouched by another stack's down.
    assert all(state.startswith("running") for state in stack.status().values())


def test_state_and_passfile_are_new_private_files_naming_each_port(tmp_path: Path):
    """``state.json`` and ``pgpass`` are swapped in as new 0600 files, never written through
    a link planted in their place; the passfile names each cluster's port, no wildcard."""
    root, outside = tmp_path / "stack", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    for name in ("state.json", "pgpass"):
        (root / name).symlink_to(outside / name)
    other = Stack(root, fast=True, control_plane=False)
    primary = other.primary  # describing a cluster saves its port in the state file
    other._write_pgpass()
    later = other.cluster("recovered-later")  # described afterwards: the passfile follows
    for name in ("state.json", "pgpass"):
        path = root / name
        assert not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert not (outside / name).exists()
    ports = {line.split(":")[1] for line in other.pgpass.read_text().splitlines()}
    assert "*" not in ports
    assert {str(primary.port), str(other.ops.port), str(later.port)} <= ports


def test_approver_and_replication_passfiles_never_write_through_what_is_there(tmp_path: Path):
    """A passfile rewritten over a world-readable file or a planted link: the new file is
    0600 from its first byte, and neither the old file's mode nor the link's target sees the
    password."""
    from wedefi_dr.physical.standby import _write_passfile
    from wedefi_dr.postgres.cluster import ClusterHandle
    from wedefi_dr_dev.approvers import write_passfile

    decoy = tmp_path / "decoy"
    decoy.write_text("")
    wide = tmp_path / "approver.pgpass"
    wide.write_text("old\n")
    wide.chmod(0o644)
    linked = tmp_path / "replication.pgpass"
    linked.symlink_to(decoy)
    write_passfile(wide, "127.0.0.1", 5432, "ops", "alice", "s3cret-approver")
    upstream = ClusterHandle(name="up", data_dir=tmp_path / "data", port=5433)
    _write_passfile(linked, upstream, "s3cret-replication", os_user=getpass.getuser())
    for path, secret in ((wide, "s3cret-approver"), (linked, "s3cret-replication")):
        assert not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert secret in path.read_text()
    assert decoy.read_text() == ""
