"""The operator-caused error classes keep their promises outside the CLI too."""

from __future__ import annotations

import pickle
import socket

import psycopg2
import pytest

from wedefi_dr.config import Settings
from wedefi_dr.errors import DRError, ServerUnreachable, SettingsMissing
from wedefi_dr.observability.stats import percentile
from wedefi_dr.postgres.tools import connect


def test_connect_failure_is_server_unreachable_and_still_an_operational_error():
    """Polling loops (recovery start-up, a DR container) catch psycopg2.OperationalError
    while a server comes up; the CLI maps ServerUnreachable to exit 5. Both must hold."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dsn = f"host=127.0.0.1 port={port} dbname=ops user=u password=hunter2 connect_timeout=5"
    with pytest.raises(psycopg2.OperationalError) as caught, connect(dsn):
        pass
    assert isinstance(caught.value, ServerUnreachable)
    message = str(caught.value)
    assert f"port={port}" in message and "password=***" in message
    assert "hunter2" not in message and "\n" not in message
    copy = pickle.loads(pickle.dumps(caught.value))  # Prefect persists task exceptions
    assert type(copy) is type(caught.value) and str(copy) == message


def test_require_names_every_missing_setting_and_survives_pickling():
    with pytest.raises(SettingsMissing) as caught:
        Settings(primary_dsn="", ops_dsn="", gpg_passphrase="x").require(
            "primary_dsn", "ops_dsn", "gpg_passphrase"
        )
    assert isinstance(caught.value, DRError)
    assert caught.value.names == ["WEDEFI_DR_PRIMARY_DSN", "WEDEFI_DR_OPS_DSN"]
    assert 'eval "$(wedefi-dr stack env)"' in str(caught.value)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert copy.names == caught.value.names and str(copy) == str(caught.value)


def test_percentile_interpolates_inclusively_and_never_extrapolates():
    samples = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(samples, 50) == 3.0
    assert percentile(samples, 95) == pytest.approx(4.8)
    assert percentile(samples, 99) <= max(samples)
    assert percentile([7.0], 95) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
