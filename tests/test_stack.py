"""The local stack starts idempotently and stops exactly what it started."""

from __future__ import annotations

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
